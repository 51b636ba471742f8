"""A kernel model of the fused A-VPT path on CPU: every Triton launch of the fused ops at the
model's shape (ViT-B/16, B=32, T=197, D=768, K=6, R=3, r=8, 12 PIM layers, bf16), with its grid
(programs), CTAs per SM (from the AOT registers and shared memory, sm_90a, of the compile the
launch gets: a PIM launch at this shape compiles its ``spec=aligned`` row), waves on 132 SMs,
serial loop iterations per program, bytes and FLOPs, and an estimated time.

The launches are the real ones: each public op runs on CPU tensors at the model shape with the
Triton interpreter's launch intercepted (recorded, not executed), so grids and constexprs are
exactly what the launchers pick. Per kernel, ``COSTS`` gives the serial iterations, bytes and
FLOPs from the launch's sizes (the PIM kernels, from their loops); a kernel without an entry is
costed from its tensor arguments (each touched once) with one iteration a program.

Time model (latency + roofline), calibrated on the first H200 run (2026-12-04): the old PIM
kernels' times were reproduced by ~1.2 us per serial, unpipelined iteration (loads exposed) x
waves; a pipelined loop (num_stages > 1) hides about half of that; plus 2 us a launch; and no
launch is faster than its bytes at 4.8 TB/s or its FLOPs at 500 TFLOP/s (H200, bf16 dense, as
achieved)::

    est_us = max(waves * iterations * t_iter, bytes / BW, flops / PEAK) + LAUNCH_US

``python -m benchmarks.kernel_model [--out DIR]`` prints the table and writes JSON rows
(``kind: kernel_model``); ``tests/test_kernel_model.py`` asserts the structure.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

SMS = 132
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024
MAX_CTAS_PER_SM = 32
T_ITER_US = 1.2
LAUNCH_US = 2.0
BW = 4.8e12
PEAK = 500e12
MODEL = dict(B=32, T=197, D=768, K=6, R=3, r=8, H=4, dh=16, G=16, L=12, grid=14)


@dataclass
class Launch:
    """One recorded launch: the kernel, its grid, its constexprs and launch options, and the
    tensors and ints it was given (by parameter name)."""
    kernel: str
    grid: tuple
    meta: Dict[str, object]
    args: Dict[str, object] = field(repr=False)
    phase: str = ""
    programs: int = 0
    ctas_per_sm: int = 1
    waves: int = 1
    iterations: int = 1
    bytes: int = 0
    flops: int = 0
    est_us: float = 0.0
    registers: Optional[int] = None
    atomics: bool = False

    def row(self) -> dict:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "args"}
        d["grid"] = list(self.grid)
        d["meta"] = {k: (v if isinstance(v, (int, float, bool, str)) else str(v))
                     for k, v in self.meta.items()}
        return d


@contextlib.contextmanager
def record_launches(log: List[Launch]):
    """Intercept every Triton launch under TRITON_INTERPRET=1: record it, run nothing."""
    from triton.runtime import interpreter

    from avpt_kernels.ops.kernel_config import parameters

    real = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = [n for n, is_const in parameters(self) if not is_const]
        grid = grid(kwargs) if callable(grid) else grid
        grid = tuple(grid) + (1,) * (3 - len(tuple(grid)))
        log.append(Launch(self.fn.__name__, grid, dict(kwargs), dict(zip(names, args))))

    interpreter.InterpretedFunction.run = run
    try:
        yield log
    finally:
        interpreter.InterpretedFunction.run = real


def _nbytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


# ---- per-kernel costs: (iterations per program, bytes, flops) from a launch ------------------
def _pim_costs() -> Dict[str, Callable[[Launch], tuple]]:
    def cd(a, b):
        return -(-a // b)

    def project(l):
        a, d = l.args["A"], l.args["D"]
        rows = l.args["MZ"] + l.args["MP"]
        e = l.args["z_ptr"].element_size()
        return (cd(d, l.meta["BK"]), rows * d * e + l.args["MZ"] * 3 * a * 4,
                2 * (l.args["MZ"] * 3 + l.args["MP"]) * a * d * 3)

    def heads(passes, streams):
        def cost(l):
            t, a = l.args["T"], l.args["A"]
            b = l.grid[0]
            return passes * cd(t, l.meta["BT"]), streams * b * t * a * 4, 0
        return cost

    def prompt(l):
        mp, d, a = l.args["MP"], l.args["D"], l.args["A"]
        return 1, mp * d * (2 + 2 + 4) + l.grid[1] * mp * 4 * (2 * 64 + 2 * 64), 2 * mp * d * a * 4

    def tokens(l):  # output and dZ: one [BM, BN] tile over A (x 3 weights for dZ)
        mz, d, a = l.args["MZ"], l.args["D"], l.args["A"]
        e = (l.args.get("z_ptr") if "z_ptr" in l.args else l.args["y_ptr"]).element_size()
        k = 3 if l.kernel == "_grad_z_kernel" else 1
        return cd(k * a, l.meta["BKA"]), 2 * mz * d * e + k * mz * a * 4, 2 * mz * d * k * a * 3

    def grad_o2(l):
        mz, d, a = l.args["MZ"], l.args["D"], l.args["A"]
        return cd(d, l.meta["BK"]), mz * d * l.args["y_ptr"].element_size() + 2 * mz * a * 4, \
            2 * mz * d * a * 3

    def wgrad(l):
        m, na, nb = l.args["M"], l.args["NA"], l.args["NB"]
        iters = cd(l.args["chunk_rows"], l.meta["BR"])
        return iters, _nbytes(l.args["a_ptr"]) + _nbytes(l.args["b_ptr"]) + \
            l.grid[2] * (na * nb + na) * 4, 2 * m * na * nb * 3

    def reduce(l):  # both token-row weight gradients: dWz [3A, D] and dW'o [D, A], + biases
        d, a = l.args["D"], l.args["A"]
        jobs = ((3 * a * d + 3 * a, l.args["wz_chunks"]), (d * a + d, l.args["wo_chunks"]))
        return 1, sum((c + 1) * n * 4 for n, c in jobs), sum(n * c for n, c in jobs)

    def prompt_wgrad(l):
        mp, d = l.args["MP"], l.args["D"]
        return cd(mp, l.meta["BR"]), mp * d * 4 * 4, 2 * mp * d * l.args["A"] * 5

    return {"_project_kernel": project, "_t2p_attn_kernel": heads(1, 2),
            "_p2t_attn_kernel": heads(2, 2), "_prompt_kernel": prompt, "_output_kernel": tokens,
            "_grad_o2_kernel": grad_o2, "_p2t_attn_bwd_kernel": heads(2, 3),
            "_prompt_bwd_kernel": prompt, "_t2p_attn_bwd_kernel": heads(1, 4),
            "_grad_z_kernel": tokens, "_wgrad_kernel": wgrad, "_reduce_kernel": reduce,
            "_prompt_wgrad_kernel": prompt_wgrad}


COSTS = _pim_costs()


def _generic_cost(l: Launch) -> tuple:
    return 1, sum(_nbytes(x) for x in l.args.values()), 0


def _aot_rows() -> Dict[tuple, dict]:
    path = os.path.join(os.path.dirname(__file__), "results", "aot.json")
    with open(path) as fh:
        data = json.load(fh)
    rows = {}
    for entry in data.get("by_triton", {}).values():
        for r in entry.get("rows", []):
            if r.get("target") == "sm_90a":
                rows[(r["kernel"], r["config"])] = r
    return rows


# The interpreter's stand-ins for the 16-bit dot modes (``ops.pim.dots``): bf16 3 -> 2, fp16 4 -> 1
_COMPILED_DOT_MODE = {3: 2, 4: 1}


def launch_specialization(l: Launch) -> tuple:
    """(names of the pointer and int arguments that are not multiples of 16, names of the int
    arguments equal to 1): what the JIT specializes a launch with these arguments on
    (``triton.runtime.jit``'s own rule), as ``KernelConfig.divisible`` / ``ones`` compile it."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    odd, ones = set(), set()
    for name, value in l.args.items():
        if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
            continue
        kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":
            ones.add(name)
        elif attr != "D":
            odd.add(name)
    return odd, ones


@functools.lru_cache(maxsize=1)
def _aligned_hints() -> Dict[tuple, tuple]:
    """(kernel, generic label) -> (divisible, ones) of its ``aligned`` AOT twin."""
    from avpt_kernels import aot

    return {(c.kernel, c.label.replace(",spec=aligned", "")): (frozenset(c.divisible),
                                                              frozenset(c.ones))
            for c in aot.collect() if c.spec == "aligned"}


def is_aligned(l: Launch) -> bool:
    """Whether the launch compiles as its configuration's ``aligned`` AOT twin: no argument
    hinted there is off a multiple of 16 here, and the ints equal to 1 are the same ones."""
    hints = _aligned_hints().get((l.kernel, _base_label(l)))
    if hints is None:
        return False
    divisible, ones = hints
    odd, launch_ones = launch_specialization(l)
    return not (odd & divisible) and launch_ones == ones


def _base_label(l: Launch) -> str:
    """The generic AOT row label of the configuration a GPU launch would compile."""
    meta = dict(l.meta)
    if "DOT_MODE" in meta:
        meta["DOT_MODE"] = _COMPILED_DOT_MODE.get(meta["DOT_MODE"], meta["DOT_MODE"])
    warps, stages = meta.pop("num_warps", 4), meta.pop("num_stages", 2)
    maxnreg = meta.pop("maxnreg", None)
    parts = [f"{k}={v}" for k, v in sorted(meta.items())]
    extra = [f"maxnreg={maxnreg}"] if maxnreg else []
    return ",".join(parts + [f"num_warps={warps}", f"num_stages={stages}"] + extra)


def _label(l: Launch) -> str:
    """The AOT row label of the compile a GPU launch gets (recorded on CPU): its aligned twin's
    where the arguments give the same hints."""
    return _base_label(l) + (",spec=aligned" if is_aligned(l) else "")


def estimate(l: Launch, aot: Dict[tuple, dict]) -> Launch:
    """Fill in programs, occupancy, waves, iterations, bytes, FLOPs and the time estimate."""
    import inspect

    from triton.runtime import interpreter  # noqa: F401

    l.programs = math.prod(l.grid)
    warps = int(l.meta.get("num_warps", 4))
    row = aot.get((l.kernel, _label(l)))
    l.registers = row["registers"] if row else None
    regs = l.registers or 128
    by_regs = REGISTERS_PER_SM // (regs * 32 * warps)
    by_smem = SHARED_PER_SM // max(1, row["shared_bytes"]) if row and row.get("shared_bytes") else 32
    l.ctas_per_sm = max(1, min(by_regs, by_smem, MAX_CTAS_PER_SM, 64 // warps))
    l.waves = -(-l.programs // (SMS * l.ctas_per_sm))
    l.iterations, l.bytes, l.flops = COSTS.get(l.kernel, _generic_cost)(l)
    t_iter = T_ITER_US * (0.5 if int(l.meta.get("num_stages", 1)) > 1 else 1.0)
    l.est_us = max(l.waves * l.iterations * t_iter, l.bytes / BW * 1e6,
                   l.flops / PEAK * 1e6) + LAUNCH_US
    return l


def kernel_sources_with_atomics() -> Dict[str, bool]:
    """Kernel name -> whether its source uses an atomic (``tl.atomic_*``)."""
    import inspect
    import sys

    out = {}
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "")
        if not name.startswith("avpt_kernels.ops"):
            continue
        for attr, fn in vars(module).items():
            src_fn = getattr(fn, "fn", None)
            if attr.endswith("_kernel") and src_fn is not None:
                out[attr] = "tl.atomic" in inspect.getsource(src_fn)
    return out


def model_launches(shape: Optional[dict] = None, dtype=torch.bfloat16) -> List[Launch]:
    """Every Triton launch of the fused A-VPT forward and training step at ``shape``: region
    pooling and the prompt bank once, PIM once per layer (the recorded layer is repeated L
    times), each forward then backward, with phase "forward" / "backward"."""
    import avpt_kernels as ak
    from avpt_kernels.ops.pim.weights import random_pim_params

    s = dict(MODEL, **(shape or {}))
    b, t, d, k, r, rank, nl = s["B"], s["T"], s["D"], s["K"], s["R"], s["r"], s["L"]
    n = s["grid"] ** 2
    gen = torch.Generator().manual_seed(0)
    leaf = lambda *shape_, dt=dtype: torch.randn(*shape_, generator=gen).to(dt).requires_grad_(True)  # noqa: E731
    launches: List[Launch] = []

    def run(name, fn, repeat=1):
        log: List[Launch] = []
        with record_launches(log):
            outs = fn()
            mark = len(log)
            outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,))
                    if isinstance(o, torch.Tensor) and o.requires_grad]
            inputs = [x for x in _leaves if x.requires_grad]
            torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs],
                                allow_unused=True)
        for i, l in enumerate(log):
            l.phase = f"{name} {'forward' if i < mark else 'backward'}"
        launches.extend(log * repeat)

    feats = leaf(b, t, d)
    maps = torch.rand(b, n, r, generator=gen).to(dtype)
    _leaves = [feats]
    run("region_pool", lambda: ak.region_pool(feats, maps, backend="triton"))
    emb = leaf(b, r, d)
    bank = [leaf(k, d, dt=torch.float32), leaf(1, d, rank, dt=torch.float32),
            leaf(1, rank, d, dt=torch.float32), leaf(nl, d, dt=torch.float32),
            leaf(nl, d, dt=torch.float32), leaf(nl, d, dt=torch.float32)]
    _leaves = [emb, *bank]
    run("prompt_bank", lambda: ak.prompt_bank(emb, *bank, [0] * nl, backend="triton"))
    z, p = leaf(b, t, d), leaf(b, k, d)
    w = random_pim_params(d, s["H"] * s["dh"], s["G"], dtype=torch.float32, generator=gen)
    from avpt_kernels.ops.pim import pack_weights

    flat = pack_weights(w).detach().requires_grad_(True)
    _leaves = [z, p, flat]
    run("pim", lambda: ak.pim_packed(z, p, flat, s["H"], s["dh"], s["G"], backend="triton"),
        repeat=nl)
    aot = _aot_rows()
    atomics = kernel_sources_with_atomics()
    out = []
    for l in launches:
        l = Launch(l.kernel, l.grid, l.meta, l.args, l.phase)
        estimate(l, aot)
        l.atomics = atomics.get(l.kernel, False)
        out.append(l)
    return out


def summary(launches: List[Launch]) -> dict:
    by_phase: Dict[str, dict] = {}
    for l in launches:
        s = by_phase.setdefault(l.phase, dict(launches=0, est_us=0.0, bytes=0, flops=0))
        s["launches"] += 1
        s["est_us"] += l.est_us
        s["bytes"] += l.bytes
        s["flops"] += l.flops
    return by_phase


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("AVPT_BENCH_RESULTS")
                    or os.path.join("benchmarks", "results"))
    args = ap.parse_args(argv)
    launches = model_launches()
    seen = set()
    print(f"{'phase':26s} {'kernel':24s} {'grid':>14s} {'progs':>6s} {'cta/SM':>6s} {'waves':>5s} "
          f"{'iters':>5s} {'MB':>7s} {'GFLOP':>7s} {'est us':>7s}")
    for l in launches:
        key = (l.phase, l.kernel, l.grid)
        if key in seen:
            continue
        seen.add(key)
        print(f"{l.phase:26s} {l.kernel:24s} {str(l.grid):>14s} {l.programs:6d} {l.ctas_per_sm:6d} "
              f"{l.waves:5d} {l.iterations:5d} {l.bytes / 1e6:7.2f} {l.flops / 1e9:7.3f} "
              f"{l.est_us:7.1f}")
    totals = summary(launches)
    for phase, s in totals.items():
        print(f"{phase:26s} {s['launches']:4d} launches, est {s['est_us']:.1f} us, "
              f"{s['bytes'] / 1e6:.1f} MB, {s['flops'] / 1e9:.2f} GFLOP")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"kernel_model_{time.strftime('%Y-%m-%d')}.json")
    with open(path, "w") as fh:
        json.dump(dict(kind="kernel_model", shape=MODEL, sms=SMS, t_iter_us=T_ITER_US,
                       launch_us=LAUNCH_US, bandwidth=BW, peak=PEAK, totals=totals,
                       rows=[l.row() for l in launches]), fh, indent=1, default=str)
    print(f"kernel_model: {len(launches)} launches -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
