"""Ahead-of-time compile check of every shippable kernel configuration, without a GPU.

Each op of the registry ``avpt_kernels.ops.OPS`` defines ``aot_configs() -> list[KernelConfig]``
(``ops.kernel_config``): every configuration its launchers (and autotuners) can select. This module compiles each one with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for sm_80 and sm_90a, runs
the ``ptxas -v`` bundled with triton over the PTX, and records registers, spill bytes and shared
memory. That catches what the interpreter forgives (dot shapes < 16, non-power-of-2 ranges,
shared-memory overflow). Each configuration comes twice: generic, and as a launch at the model's
shape compiles it (``KernelConfig.divisible`` / ``ones``: the divisibility hints and constant 1s
the JIT specializes on; label suffix ``spec=aligned``).

``python -m avpt_kernels.aot [--out benchmarks/results/aot.json]`` writes the table and exits
non-zero if any configuration fails to compile, spills, or overflows shared memory. It must run
without ``TRITON_INTERPRET=1`` (under the interpreter ``@triton.jit`` yields no compilable
function), so tests call it in a subprocess.

One file holds the tables of several Triton versions (``make aot`` runs the check in ``.venv``,
Triton 3.8, and in ``.venv-triton36``, Triton 3.6, the GPU machines' version): the output is
``{"targets": [...], "by_triton": {"<triton version>": {"torch": ..., "seconds": ..., "rows":
[...]}}}`` and a run replaces only its own version's entry (``load_rows`` reads one back);
``--ops NAME ...`` compiles only those ops (registry names) and replaces only their kernels' rows in it
(a new op checked without recompiling the rest: ``seconds`` is then that run's).

Register allocation differs between Triton versions, so a launch choice may have to depend on
the version: op modules pick such values with ``_compat.for_triton`` at import time, and both their
launchers and their ``aot_configs()`` read the picked values, so that ``aot_configs()`` lists
exactly what the launchers can select under the running Triton.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

from .ops import OPS
from .ops.kernel_config import KernelConfig

# target name -> (compute capability, max shared memory per block in bytes, opt-in)
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90a": (90, 227 * 1024)}


def collect() -> List[KernelConfig]:
    """Every configuration of every op of the registry (``OPS[name].aot_configs()``), op by op."""
    return [cfg for op in OPS.values() for cfg in op.aot_configs()]


def _ptxas(ptx: str, arch: str) -> Dict[str, int]:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        run = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o",
                              os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"ptxas failed for {arch}: {run.stderr.strip()[-2000:]}")
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_bytes": sum(int(a) + int(b) for a, b in spills)}


def compile_config(cfg: KernelConfig, target: str):
    """``cfg`` compiled for ``target`` (Triton's compiled kernel: ``.asm["ptx"]``, ``.metadata``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = cfg.compile_inputs()
    src = ASTSource(cfg.fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", TARGETS[target][0], 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                   **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {})})


def compile_one(cfg: KernelConfig, target: str) -> Dict[str, Any]:
    smem_limit = TARGETS[target][1]
    row = {"kernel": cfg.kernel, "config": cfg.label, "target": target}
    try:
        compiled = compile_config(cfg, target)
        row.update(_ptxas(compiled.asm["ptx"], target))
        row["shared_bytes"] = int(compiled.metadata.shared)
        row["ok"] = row["spill_bytes"] == 0 and row["shared_bytes"] <= smem_limit
        if not row["ok"]:
            row["error"] = (f"spills {row['spill_bytes']} bytes" if row["spill_bytes"] else
                            f"shared memory {row['shared_bytes']} > {smem_limit}")
    except Exception as exc:  # report every failing config, not just the first
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[-1500:]}")
    return row


def run(configs: List[KernelConfig], targets=tuple(TARGETS)) -> List[Dict[str, Any]]:
    return [compile_one(cfg, t) for cfg in configs for t in targets
            if cfg.targets is None or t in cfg.targets]


_COLLECTED: List[KernelConfig] = []


def sample(configs: Sequence[KernelConfig]) -> List[int]:
    """Indices of a representative subset of ``configs``: the first and the last configuration of
    each kernel (in ``collect()`` order: the smallest and the largest column / dtype layout). What
    CI compiles (``--sample``); the full list is ``make aot`` and the extended test."""
    first: Dict[str, int] = {}
    last: Dict[str, int] = {}
    for i, cfg in enumerate(configs):
        first.setdefault(cfg.kernel, i)
        last[cfg.kernel] = i
    return sorted(set(first.values()) | set(last.values()))


def _op_indices(configs: Sequence[KernelConfig], ops: Sequence[str]) -> List[int]:
    """Indices in ``configs`` (``collect()``) of the configurations of the ops named in ``ops``
    (registry names: "pim", "low_rank_project", ...)."""
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise SystemExit(f"avpt_kernels.aot: --ops {unknown} unknown; expected some of {sorted(OPS)}")
    indices, at = [], 0
    for name, op in OPS.items():
        count = len(op.aot_configs())
        if name in ops:
            indices.extend(range(at, at + count))
        at += count
    assert at == len(configs), "configs must be collect()'s list"
    return indices


def _compile_collected(job) -> Dict[str, Any]:
    """Worker: compile configuration ``index`` of ``collect()`` (rebuilt once per process, as
    jitted functions do not pickle) for ``target``."""
    index, target = job
    if not _COLLECTED:
        _COLLECTED.extend(collect())
    return compile_one(_COLLECTED[index], target)


def run_collected(workers: int = 0, targets=tuple(TARGETS),
                  only: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
    """Every collected configuration (or those at the indices ``only``) for every target, over
    ``workers`` processes (0: one per CPU); rows come back in the order of ``run(collect())``."""
    configs = collect()
    indices = range(len(configs)) if only is None else only
    jobs = [(i, t) for i in indices for t in targets
            if configs[i].targets is None or t in configs[i].targets]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < 2:
        return [_compile_collected(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_collected, jobs, chunksize=max(1, len(jobs) // (4 * workers))))


def format_table(rows: List[Dict[str, Any]]) -> str:
    lines = [f"{'kernel':<32} {'target':<7} {'regs':>5} {'spill':>6} {'smem':>7}  config"]
    for r in rows:
        if "registers" in r and "shared_bytes" in r:
            lines.append(f"{r['kernel']:<32} {r['target']:<7} {r['registers']:>5} "
                         f"{r['spill_bytes']:>6} {r['shared_bytes']:>7}  {r['config']}"
                         + ("" if r["ok"] else f"  FAIL: {r['error']}"))
        else:
            lines.append(f"{r['kernel']:<32} {r['target']:<7} FAIL {r['config']}: {r['error']}")
    return "\n".join(lines)


def load_rows(path: str, version: Optional[str] = None) -> List[Dict[str, Any]]:
    """The rows that ``path`` (an aot.json) records for Triton ``version`` (default: the installed
    one). Raises KeyError if that version was not checked."""
    if version is None:
        import triton

        version = triton.__version__
    with open(path) as fh:
        return json.load(fh)["by_triton"][version]["rows"]


def _merge(path: str, version: str, entry: Dict[str, Any]) -> Dict[str, Any]:
    """The aot.json at ``path`` (if it has the per-version layout) with ``version``'s entry
    replaced by ``entry``."""
    data: Dict[str, Any] = {}
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        pass
    if not isinstance(data.get("by_triton"), dict):
        data = {"by_triton": {}}
    data["targets"] = list(TARGETS)
    data["by_triton"][version] = entry
    data["by_triton"] = dict(sorted(data["by_triton"].items(), reverse=True))
    return {"targets": data["targets"], "by_triton": data["by_triton"]}


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("avpt_kernels.aot: unset TRITON_INTERPRET (the interpreter cannot compile)",
              file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(description="AOT-compile every kernel configuration")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "aot.json"))
    ap.add_argument("--workers", type=int, default=0, help="compile processes (0: one per CPU)")
    ap.add_argument("--sample", action="store_true",
                    help="compile only the first and last configuration of each kernel (CI)")
    ap.add_argument("--ops", nargs="+", metavar="OP",
                    help="compile only these ops (registry names, e.g. low_rank_project) and replace their "
                         "kernels' rows in the recorded entry, keeping the others (rows of "
                         "kernels that no op defines any more are dropped)")
    args = ap.parse_args(argv)
    import time

    import triton
    import torch

    configs = collect()
    only = sample(configs) if args.sample else None
    kept: List[Dict[str, Any]] = []
    if args.ops:
        only = _op_indices(configs, args.ops)
        mine = {configs[i].kernel for i in only}
        current = {cfg.kernel for cfg in configs}  # a recorded kernel no op defines is stale
        try:
            kept = [r for r in load_rows(args.out)
                    if r["kernel"] not in mine and r["kernel"] in current]
        except (OSError, KeyError, ValueError):
            kept = []
    start = time.perf_counter()
    rows = run_collected(args.workers, only=only)
    seconds = time.perf_counter() - start
    print(format_table(rows) if rows else "no Triton kernel configurations to compile")
    rows = kept + rows
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    failing = sum(not r["ok"] for r in rows)
    entry = {"torch": torch.__version__, "python": sys.version.split()[0],
             "workers": args.workers or os.cpu_count() or 1, "seconds": round(seconds, 1),
             "failing": failing, "spill_bytes": sum(r.get("spill_bytes", 0) for r in rows),
             "sample": args.sample,
             "last_ops": args.ops,  # None: every op compiled in this run; else only these
             "rows": rows}
    data = _merge(args.out, triton.__version__, entry)
    with open(args.out, "w") as fh:
        json.dump(data, fh, indent=1)
    print(f"wrote {args.out} (Triton {triton.__version__}, {seconds:.0f} s): {len(rows)} rows, "
          f"{failing} failing")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
