"""Benchmark harness shared by ``pytest benchmarks/``: environment capture (torch, triton, GPU
through NVML), timing through pytest-benchmark with CUDA synchronisation, peak memory, and one
JSON file per run named by device and date, ``<device>_<YYYY-MM-DD>.json``; a later run on the
same day never overwrites it but gets ``<device>_<YYYY-MM-DD>_<HHMMSS>.json`` (``_2``, ``_3``
... on a clash within the second).

Where: ``benchmarks/results/``, or the folder named by the environment variable
``AVPT_BENCH_RESULTS`` (``make test`` points it at a temporary folder so that its smoke run
leaves the tree clean; ``TABLE10.md`` is written beside the JSON).

No benchmark asserts a time: rows are facts about one run on one machine; ratios are computed
between rows of the same run.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
from typing import Any, Callable, Dict, List, Optional

import torch

RESULTS_DIR = os.environ.get("AVPT_BENCH_RESULTS") or os.path.join(os.path.dirname(__file__), "results")
ON_GPU = torch.cuda.is_available()


def environment() -> Dict[str, Any]:
    """torch/triton versions and, on NVIDIA machines, NVML's view of device 0."""
    env: Dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "cuda": torch.version.cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["device"] = torch.cuda.get_device_name(0) if ON_GPU else f"cpu ({env['cpu']})"
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        env["nvml"] = {
            "name": pynvml.nvmlDeviceGetName(handle),
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "memory_total_bytes": int(mem.total), "memory_used_bytes": int(mem.used),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
        }
    except Exception as exc:  # no NVIDIA driver, no pynvml: say so, don't fail
        env["nvml"] = {"unavailable": f"{type(exc).__name__}: {exc}"[:200]}
    return env


def device_slug(env: Dict[str, Any]) -> str:
    return re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40]


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def measure(benchmark, fn: Callable[[], Any], setup: Optional[Callable[[], Any]] = None,
            rounds: int = 20, warmup: int = 3) -> Dict[str, Any]:
    """Time ``fn`` with pytest-benchmark (warm-up rounds excluded, CUDA synchronised inside the
    timed call) and measure its peak CUDA memory: above what was allocated before it
    (``peak_mem_bytes``) and in all, weights included (``peak_mem_total_bytes``)."""
    def timed(*args):
        out = fn(*args) if args else fn()
        sync()
        return out

    def prepared():
        return ((setup(),), {}) if setup else ((), {})

    peak = peak_total = None
    if ON_GPU:
        args, _ = prepared()
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        timed(*args)
        peak_total = torch.cuda.max_memory_allocated()
        peak = peak_total - base
        del args
    benchmark.pedantic(timed, setup=prepared if setup else None, rounds=rounds,
                       warmup_rounds=warmup, iterations=1)
    if benchmark.disabled:  # --benchmark-disable: ran once as a smoke test, nothing timed
        return {"median_ms": None, "iqr_ms": None, "min_ms": None, "rounds": 0,
                "peak_mem_bytes": peak, "peak_mem_total_bytes": peak_total}
    stats = benchmark.stats.stats
    return {"median_ms": stats.median * 1e3, "iqr_ms": stats.iqr * 1e3, "min_ms": stats.min * 1e3,
            "rounds": stats.rounds, "peak_mem_bytes": peak, "peak_mem_total_bytes": peak_total}


class Results:
    """Rows of one ``pytest benchmarks/`` run; written as one JSON file at the end."""

    def __init__(self) -> None:
        self.env = environment()
        self.rows: List[Dict[str, Any]] = []
        self.started = _dt.datetime.now(_dt.timezone.utc)

    def add(self, **row: Any) -> Dict[str, Any]:
        self.rows.append(row)
        return row

    def write(self, directory: str = RESULTS_DIR) -> str:
        """Write the run's JSON under ``directory`` to a file name no earlier run holds
        (created exclusively: two runs finishing at once cannot overwrite each other)."""
        os.makedirs(directory, exist_ok=True)
        day, clock = self.started.strftime("%Y-%m-%d"), self.started.strftime("%H%M%S")
        names = [f"{device_slug(self.env)}_{day}.json", f"{device_slug(self.env)}_{day}_{clock}.json"]
        names += [f"{device_slug(self.env)}_{day}_{clock}_{n}.json" for n in range(2, 1000)]
        for name in names:
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"started": self.started.isoformat(), "environment": self.env,
                           "ratios": ratios(self.rows), "rows": self.rows}, fh, indent=1,
                          default=str)
            return path
        raise FileExistsError(f"{directory}: no free results file name for {names[1]}")


def ratios(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Speed-up of the fused provider over every other provider of the same (op, mode, shape,
    dtype) (eager, compiled, and the baselines a user would pick instead, e.g. ``expert``), and
    over the best (fastest) of them: ``speedup_vs_<provider>``, ``speedup_vs_best`` and
    ``best_baseline``."""
    timed = {(r["op"], r["mode"], json.dumps(r["shape"], sort_keys=True), r["dtype"], r["provider"]):
             r["median_ms"] for r in rows if r.get("kind") == "op" and r.get("median_ms")}
    out = []
    for (op, mode, shape, dtype, provider), ms in timed.items():
        if provider != "fused":
            continue
        entry = {"op": op, "mode": mode, "shape": json.loads(shape), "dtype": dtype}
        others = {key[4]: other_ms for key, other_ms in timed.items()
                  if key[:4] == (op, mode, shape, dtype) and key[4] != "fused"}
        for other, other_ms in sorted(others.items()):
            entry[f"speedup_vs_{other}"] = other_ms / ms
        if others:
            best = min(others, key=others.get)
            entry["best_baseline"], entry["speedup_vs_best"] = best, others[best] / ms
        out.append(entry)
    return out
