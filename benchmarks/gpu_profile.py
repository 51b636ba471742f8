"""Where the time goes, per Table 10 row: inference eager and graphed (a CUDA graph replay,
``avpt.graphed.GraphedInference``) and one whole training step (forward, CLS + SEG loss,
backward, AdamW) eager and graphed (``WholeStep`` under ``torch.compile(mode=
"reduce-overhead")``). For each: wall time per call against the summed CUDA kernel time (the
GPU's busy time; the rest is host-side launch and Python overhead), the kernel count, and the
kernels that take the most GPU time (per kernel: forward and backward kernels of a step each
appear under their own name), then the host-side ops. A diagnosis tool for a GPU session, not a
benchmark row:

    python -m benchmarks.gpu_profile [--parts infer,infer-graphed,train,train-graphed] [row ...]

GPU: ViT-B/16, batch 32, bf16 autocast, frozen weights stored in bf16 (Table 10's setting).
CPU: the tiny config, batch 2, a smoke run (no CUDA kernels, so no GPU table; the graphed
inference goes through its eager fallback and the graphed step, an inductor compile, is
skipped). Ends with a summary: one line per row and part.
"""
import argparse
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from avpt.losses import method_loss
from benchmarks.harness import ON_GPU, sync
from benchmarks.model_setup import (AUTOCAST, DEVICE, METHODS, MODEL, MethodLossStep, graph_forward,
                                    make_batch, prepare_method, row_forward)

DEFAULT_ROWS = ("backbone", "vpt", "avpt-fused", "avpt-eager")
PARTS = ("infer", "infer-graphed", "train", "train-graphed")
ROUNDS, WARMUP = (10, 3) if ON_GPU else (1, 1)  # CPU: a smoke run


def profile_call(label: str, fn, top: int = 15, rounds: int = ROUNDS) -> Dict[str, Optional[float]]:
    """Warm ``fn`` up, time ``rounds`` calls (wall), profile one, print the tables; returns
    {wall_ms, busy_ms, kernels}."""
    for _ in range(WARMUP):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    sync()
    wall_ms = (time.perf_counter() - start) / rounds * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    with profile(activities=activities) as prof:
        fn()
        sync()
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3 if kernels else None
    launches = sum(e.count for e in kernels)
    busy = f"GPU busy {busy_ms:.2f} ms (wall / busy {wall_ms / busy_ms:.3f})" if busy_ms \
        else "no CUDA kernels"
    print(f"## {label}: wall {wall_ms:.2f} ms/call, {busy}, {launches} kernels")
    if ON_GPU:  # the GPU's side, kernel by kernel, then the host's
        print(averages.table(sort_by="self_device_time_total", row_limit=top,
                             max_name_column_width=70))
    print(averages.table(sort_by="cpu_time_total", row_limit=top, max_name_column_width=70))
    sys.stdout.flush()
    return {"wall_ms": wall_ms, "busy_ms": busy_ms, "kernels": launches}


def _build(method_name: str, overrides: dict):
    from avpt.methods import build_method

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = build_method(method_name, model_name=MODEL, **overrides).to(DEVICE)
    prepare_method(method)  # frozen weights in bf16 on a GPU, as every Table 10 row
    return method


def _infer(row_name, method, images, maps, top) -> Dict:
    method.eval()

    def forward():
        with torch.no_grad(), torch.autocast(**AUTOCAST):
            return row_forward(row_name, method, images, maps)
    return profile_call(f"{row_name} inference, eager", forward, top)


def _infer_graphed(row_name, method, images, maps, top) -> Dict:
    from avpt.graphed import GraphedInference

    method.eval()
    graphed = GraphedInference(graph_forward(row_name, method), DEVICE,
                               AUTOCAST["dtype"] if ON_GPU else None, batch_size=images.shape[0])
    graphed(images, maps)  # captures (on a GPU)
    mode = "graphed" if graphed.enabled else "graphed (off: eager fallback)"
    return profile_call(f"{row_name} inference, {mode}", lambda: graphed(images, maps), top)


def _train(row_name, method, images, maps, labels, masks, top) -> Dict:
    method.train()
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**AUTOCAST):
            loss = method_loss(method, row_forward(row_name, method, images, maps), labels,
                               masks)["loss"]
        loss.backward()
        opt.step()
    return profile_call(f"{row_name} training step (fwd + CLS/SEG loss + bwd + AdamW), eager",
                        step, top)


def _train_graphed(row_name, method, images, maps, labels, masks, top) -> Optional[Dict]:
    if not ON_GPU:
        print(f"## {row_name} training step, graphed: skipped (WholeStep with inductor's CUDA "
              f"graphs compiles on a GPU only)")
        return None
    from avpt.compiled_step import WholeStep
    from avpt.engine import make_optimizer

    method.train()
    params = [p for p in method.parameters() if p.requires_grad]
    opt = make_optimizer(params, 1e-4, 1e-4, "reduce-overhead", DEVICE)
    step = WholeStep(MethodLossStep(row_name, method), opt, DEVICE, AUTOCAST["dtype"], 0.0,
                     "reduce-overhead")
    batch = dict(image=images, maps=maps, label=labels, mask=masks)
    step(batch)  # compiles
    return profile_call(f"{row_name} training step, graphed (WholeStep, reduce-overhead)",
                        lambda: step(batch), top)


def profile_row(row_name: str, method_name: str, overrides: dict, parts=PARTS,
                top: int = 15) -> List[Dict]:
    """Profile the ``parts`` of one Table 10 row; returns one summary dict per part run."""
    out = []
    method = _build(method_name, overrides)
    images, maps, labels, masks = make_batch(method)
    for part in parts:
        if part.startswith("train") and row_name == "backbone":
            continue  # the frozen backbone has no training step
        if part == "infer":
            res = _infer(row_name, method, images, maps, top)
        elif part == "infer-graphed":
            res = _infer_graphed(row_name, method, images, maps, top)
        elif part == "train":
            res = _train(row_name, method, images, maps, labels, masks, top)
        else:
            res = _train_graphed(row_name, method, images, maps, labels, masks, top)
        if res is not None:
            out.append(dict(res, row=row_name, part=part))
    return out


def summary(rows: List[Dict]) -> str:
    """One markdown line per row and part: wall, GPU busy, their ratio, kernels."""
    lines = ["## summary", "", "| row | part | wall ms | GPU busy ms | wall / busy | kernels |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        wall, busy = r["wall_ms"], r["busy_ms"]
        busy_s, ratio_s = ("-", "-") if not busy else (f"{busy:.2f}", f"{wall / busy:.3f}")
        lines.append(f"| {r['row']} | {r['part']} | {wall:.2f} | {busy_s} | {ratio_s} | "
                     f"{r['kernels']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="*", help=f"Table 10 rows (default: {' '.join(DEFAULT_ROWS)})")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--top", type=int, default=15, help="kernels/ops per table")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        ap.error(f"--parts: unknown {bad}; expected a comma-separated subset of {','.join(PARTS)}")
    known = [m[0] for m in METHODS]
    unknown = [r for r in args.rows if r not in known]
    if unknown:
        ap.error(f"unknown rows {unknown}; expected any of {' '.join(known)}")
    wanted = args.rows or DEFAULT_ROWS
    results: List[Dict] = []
    for row_name, method_name, overrides in METHODS:
        if row_name in wanted:
            results += profile_row(row_name, method_name, overrides, parts, args.top)
    print(summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
