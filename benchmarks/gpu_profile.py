"""Where a forward's time goes, per Table 10 row: wall time per forward against the summed CUDA
kernel time (the GPU's busy time; the rest is host-side launch and Python overhead) and the
kernels that take the most GPU time. A diagnosis tool for a GPU session, not a benchmark row:

    python -m benchmarks.gpu_profile [row ...] > profile.txt

GPU: ViT-B/16, batch 32, bf16 autocast (Table 10's setting); CPU: the tiny config, batch 2.
"""
import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import sync
from benchmarks.test_model import AUTOCAST, DEVICE, METHODS, MODEL, ON_GPU, _batch, _forward

DEFAULT_ROWS = ("backbone", "vpt", "avpt-fused", "avpt-eager")


def profile_row(row_name: str, method_name: str, overrides: dict, top: int = 15) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from avpt.methods import build_method
        method = build_method(method_name, model_name=MODEL, **overrides).to(DEVICE).eval()
    images, maps, _, _ = _batch(method)

    def forward():
        return _forward(row_name, method, images, maps)

    with torch.no_grad(), torch.autocast(**AUTOCAST):
        for _ in range(3):
            forward()
        sync()
        start = time.perf_counter()
        for _ in range(10):
            forward()
        sync()
        wall_ms = (time.perf_counter() - start) / 10 * 1e3
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
        with profile(activities=activities) as prof:
            forward()
            sync()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    launches = sum(e.count for e in kernels)
    print(f"## {row_name}: wall {wall_ms:.2f} ms/forward, GPU busy {busy_ms:.2f} ms, "
          f"{launches} kernels")
    table = prof.key_averages().table
    if ON_GPU:  # the GPU's side, then the host's (where the wall time beyond GPU busy goes)
        print(table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=70))
    print(table(sort_by="cpu_time_total", row_limit=top, max_name_column_width=70))
    sys.stdout.flush()


def main(argv) -> None:
    wanted = argv or DEFAULT_ROWS
    for row_name, method_name, overrides in METHODS:
        if row_name in wanted:
            profile_row(row_name, method_name, overrides)


if __name__ == "__main__":
    main(sys.argv[1:])
