"""Model-level rows, Table 10: the frozen backbone alone, full fine-tuning, Adapter, LoRA,
VPT-deep, A-VPT on the eager reference ops and A-VPT on the fused ops, all on the same frozen
open_clip backbone. Per method: trainable parameters (% of the visual tower), inference latency
per batch and per image, training step time (forward, CLS+SEG loss, backward, AdamW step), peak
memory of inference and of a training step, and kernel launches per forward (profiler). Rows
``<method>+compile-<mode>`` time the same step compiled whole (``avpt.compiled_step.WholeStep``, modes
default and reduce-overhead = CUDA graphs) on a GPU; on CPU they are recorded as skipped unless
AVPT_BENCH_COMPILE=1 (aot_eager, tiny config). Rows of kind ``graphed`` replay the inference
forward from a CUDA graph (``avpt.graphed.GraphedInference``, what ``avpt eval`` runs) beside
the eager rows, with the graph's GPU-busy time (profiler); on CPU they are smoke-run through
the eager fallback and recorded as skipped. On a GPU every row stores the frozen backbone's
weights in bf16 (``avpt.frozen_weights``, bit-identical under bf16 autocast), so eager and
graphed rows of every method, the backbone's included, stand on the same footing.

GPU: ViT-B/16, batch 32, 224x224, bf16 autocast. CPU: the tiny config, batch 2 (smoke run).
Every method is trained on the same CLS + SEG objective so that step times compare like for like.
"""
import gc
import os as _os
import warnings

import pytest
import torch

from avpt.backbone import TINY_MODEL, VIT_B16
from avpt.losses import method_loss
from avpt.methods import build_method
from avpt.params import parameter_report
from benchmarks.harness import ON_GPU, measure, sync
from benchmarks.model_setup import (AUTOCAST, BATCH, DEVICE, METHODS, MODEL, MethodLossStep,
                                    graph_forward, make_batch, prepare_method, row_forward)

pytestmark = pytest.mark.filterwarnings("ignore")

ROUNDS = 10 if ON_GPU else 2


def _time_train_step(row: dict, method, params, forward, labels, masks) -> None:
    """Time forward + loss (autocast) + backward + AdamW step; the figures go into ``row``."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**AUTOCAST):
            loss = method_loss(method, forward(), labels, masks)["loss"]
        loss.backward()
        opt.step()

    train = _timed_again(step)
    row.update(train_step_ms=train["median_ms"], train_iqr_ms=train["iqr_ms"],
               train_peak_mem_bytes=train["peak_mem_bytes"])


def _launches(fn) -> dict:
    """Kernel launches of one forward: CUDA kernels on a GPU, dispatched aten ops on CPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    with profile(activities=activities) as prof:
        fn()
        sync()
    events = prof.events()
    if ON_GPU:
        count = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        return {"launches_per_forward": count, "launch_kind": "cuda kernels"}
    count = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
    return {"launches_per_forward": count, "launch_kind": "top-level aten ops (cpu)"}


@pytest.mark.parametrize("row_name,method_name,overrides", METHODS, ids=[m[0] for m in METHODS])
def test_table10_row(benchmark, results, row_name, method_name, overrides):
    row = dict(kind="model", method=row_name, model=MODEL, batch=BATCH, device=DEVICE,
               autocast="bf16" if ON_GPU else "off")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = build_method(method_name, model_name=MODEL, **overrides).to(DEVICE)
    report = parameter_report(method)
    row.update(prepare_method(method))
    row.update(trainable=report.trainable if row_name != "backbone" else 0,
               visual_params=report.visual,
               trainable_percent=report.percent_of_visual if row_name != "backbone" else 0.0)
    images, maps, labels, masks = make_batch(method)

    method.eval()
    with torch.no_grad(), torch.autocast(**AUTOCAST):
        infer = measure(benchmark, lambda: row_forward(row_name, method, images, maps), rounds=ROUNDS)
        row.update(_launches(lambda: row_forward(row_name, method, images, maps)))
    row.update(infer_ms=infer["median_ms"], infer_iqr_ms=infer["iqr_ms"],
               infer_ms_per_image=infer["median_ms"] / BATCH if infer["median_ms"] else None,
               infer_peak_mem_bytes=infer["peak_mem_total_bytes"])

    if row_name != "backbone":
        method.train()
        params = [p for p in method.parameters() if p.requires_grad]
        _time_train_step(row, method, params, lambda: row_forward(row_name, method, images, maps),
                         labels, masks)
    results.add(**row, status="ok")
    del method
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Backbone + injected PIM (issue 16): the drop-in API on the same frozen backbone, beside the
# backbone alone
# ----------------------------------------------------------------------------------------------
# A PIM before every block with learned prompts (A-VPT's sizes: K=6, 4 heads x 16, gate 16; one
# PIM per block, no anatomy branch): inference is open_clip's encode_image of the injected tower
# (compare the "backbone" row); the training step is the linear probe's (CLS + SEG) through the
# injected tower, training the head and the added weights.
PIM_ROWS = [("backbone+pim-eager", "torch"), ("backbone+pim-fused", "triton")]


@pytest.mark.parametrize("row_name,backend", PIM_ROWS, ids=[r[0] for r in PIM_ROWS])
def test_injected_pim_row(benchmark, results, row_name, backend):
    import avpt_kernels as ak

    row = dict(kind="model", method=row_name, model=MODEL, batch=BATCH, device=DEVICE,
               autocast="bf16" if ON_GPU else "off")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = build_method("linear", model_name=MODEL)
    ak.inject_pim(method.visual, num_prompts=6, num_heads=4, head_dim=16, gate_hidden=16,
                  backend=backend)
    method = method.to(DEVICE)
    report = parameter_report(method)
    row.update(prepare_method(method))
    added = sum(t.numel() for t in ak.pim_state_dict(method.visual).values())
    row.update(trainable=added, visual_params=report.visual,
               trainable_percent=100.0 * added / report.visual)
    images, maps, labels, masks = make_batch(method)

    method.eval()
    encode = lambda: method.backbone.encode_image(images)  # noqa: E731
    with torch.no_grad(), torch.autocast(**AUTOCAST):
        infer = measure(benchmark, encode, rounds=ROUNDS)
        row.update(_launches(encode))
    row.update(infer_ms=infer["median_ms"], infer_iqr_ms=infer["iqr_ms"],
               infer_ms_per_image=infer["median_ms"] / BATCH if infer["median_ms"] else None,
               infer_peak_mem_bytes=infer["peak_mem_total_bytes"])

    if backend == "triton" and not ON_GPU:
        # a step through the Triton interpreter takes ~15 s even at the tiny size: the smoke run
        # times the fused inference only
        results.add(**row, status="ok", train_step="skipped on CPU (Triton interpreter)")
        return
    method.train()
    _time_train_step(row, method, [p for p in method.parameters() if p.requires_grad],
                     lambda: method(images), labels, masks)
    results.add(**row, status="ok")
    del method
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


def _timed_again(fn):
    """A second timing in the same test (pytest-benchmark allows one per fixture): the same
    discipline by hand — warm-up excluded, synchronised, median and IQR of the rounds."""
    import statistics
    import time

    for _ in range(2):
        fn()
    sync()
    peak = None
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    if ON_GPU:
        peak = torch.cuda.max_memory_allocated()
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "iqr_ms": q[2] - q[0], "peak_mem_bytes": peak}


# ----------------------------------------------------------------------------------------------
# Compiled whole training step (issue 11, item 4): avpt.compiled_step.WholeStep, with and without CUDA graphs
# ----------------------------------------------------------------------------------------------
# Rows "<method>+compile-<mode>" (kind "compiled-step", in the JSON): the same step as test_table10_row's (CLS + SEG, AdamW) compiled
# as one graph; the uncompiled rows above are the "without". On a GPU: inductor, modes default and
# reduce-overhead (CUDA graphs). Without a GPU the rows are recorded as skipped (inductor's C++
# compile of the step takes minutes on 2 cores, the triton backend runs in the interpreter);
# AVPT_BENCH_COMPILE=1 runs them on CPU with backend aot_eager, the tiny config, torch-backend ops.
COMPILE_MODES = ("default", "reduce-overhead")
COMPILE_METHODS = [m for m in METHODS if m[0] in ("vpt", "avpt-eager", "avpt-fused")]


@pytest.mark.parametrize("mode", COMPILE_MODES)
@pytest.mark.parametrize("row_name,method_name,overrides", COMPILE_METHODS,
                         ids=[m[0] for m in COMPILE_METHODS])
def test_compiled_step_row(results, row_name, method_name, overrides, mode):
    from avpt.compiled_step import WholeStep
    from avpt.engine import make_optimizer

    cpu_opt_in = _os.environ.get("AVPT_BENCH_COMPILE") == "1"
    row = dict(kind="compiled-step", method=f"{row_name}+compile-{mode}", model=MODEL, batch=BATCH,
               device=DEVICE, autocast="bf16" if ON_GPU else "off", compile=mode,
               compile_backend="inductor" if ON_GPU else "aot_eager")
    if not ON_GPU and not (cpu_opt_in and mode == "default" and row_name != "avpt-fused"):
        results.add(**row, status="skipped: compiled steps run on a GPU (CPU: AVPT_BENCH_COMPILE=1, "
                    "aot_eager, default mode, torch-backend ops)")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = build_method(method_name, model_name=MODEL, **overrides).to(DEVICE).train()
    row.update(prepare_method(method))
    images, maps, labels, masks = make_batch(method)
    batch = dict(image=images, maps=maps, label=labels, mask=masks)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = make_optimizer(params, 1e-4, 1e-4, mode, DEVICE)
    step = WholeStep(MethodLossStep(row_name, method), opt, DEVICE,
                     torch.bfloat16 if ON_GPU else None, 0.0,
                     mode if ON_GPU else None, "inductor" if ON_GPU else "aot_eager")
    import time
    start = time.perf_counter()
    step(batch)  # compiles
    sync()
    compile_s = time.perf_counter() - start
    train = _timed_again(lambda: step(batch))
    busy = gpu_busy_ms(lambda: step(batch))
    results.add(**row, status="ok", compile_s=compile_s, train_step_ms=train["median_ms"],
                train_iqr_ms=train["iqr_ms"], train_peak_mem_bytes=train["peak_mem_bytes"],
                gpu_busy_ms=busy, wall_over_busy=train["median_ms"] / busy if busy else None)
    del method, step, opt
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Graphed inference (issue 23, item 4): the forward replayed from a CUDA graph, beside the eager
# rows above (same frozen bf16 weights, same batch); the graphed training step is the
# "+compile-reduce-overhead" row above (WholeStep under inductor's CUDA graphs)
# ----------------------------------------------------------------------------------------------
GRAPHED_METHODS = [m for m in METHODS if m[0] in ("backbone", "full", "lora", "vpt", "avpt-eager",
                                                  "avpt-fused")]


def gpu_busy_ms(fn) -> float:
    """Summed CUDA kernel time of one call of ``fn`` (the profiler's GPU-busy time), ms; None
    without a GPU or when the profiler saw no kernel."""
    if not ON_GPU:
        return None
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    busy = sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA)
    return busy / 1e3 if busy else None


@pytest.mark.parametrize("row_name,method_name,overrides", GRAPHED_METHODS,
                         ids=[m[0] for m in GRAPHED_METHODS])
def test_graphed_inference_row(benchmark, results, row_name, method_name, overrides):
    from avpt.graphed import GraphedInference

    row = dict(kind="graphed", method=row_name, model=MODEL, batch=BATCH, device=DEVICE,
               autocast="bf16" if ON_GPU else "off")
    if not ON_GPU and row_name == "avpt-fused":  # one more interpreter forward says nothing
        results.add(**row, status="skipped: CUDA graphs need a GPU")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = build_method(method_name, model_name=MODEL, **overrides).to(DEVICE).eval()
    row.update(prepare_method(method))
    images, maps, _, _ = make_batch(method)
    graphed = GraphedInference(graph_forward(row_name, method), DEVICE,
                               AUTOCAST["dtype"] if ON_GPU else None, batch_size=BATCH)
    call = lambda: graphed(images, maps)  # noqa: E731  (input copy + replay + output copy)
    infer = measure(benchmark, call, rounds=ROUNDS)  # the first call captures (a warm-up round)
    if not graphed.enabled:  # CPU: the smoke run went through the eager fallback
        results.add(**row, status="skipped: CUDA graphs need a GPU (eager fallback smoke-run)")
        return
    busy = gpu_busy_ms(call)
    median = infer["median_ms"]
    row.update(infer_ms=median, infer_iqr_ms=infer["iqr_ms"],
               infer_ms_per_image=median / BATCH if median else None,
               infer_peak_mem_bytes=infer["peak_mem_total_bytes"], gpu_busy_ms=busy,
               wall_over_busy=median / busy if median and busy else None,
               graphs=len([g for by in graphed.graphs.values() for g in by]))
    results.add(**row, status="ok")
    del method, graphed
    gc.collect()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Launch counts (issue 11): fake CUDA tensors, bf16 autocast, no GPU needed (benchmarks/launches.py)
# ----------------------------------------------------------------------------------------------
from benchmarks import launches as _launch_counter  # noqa: E402

# Without a GPU the smoke run counts the tiny config (a few seconds per method); ViT-B/16 at
# batch 32 takes about a minute for all five methods on 2 CPU cores (AVPT_LAUNCHES_VITB=1).

LAUNCH_CONFIGS = [(TINY_MODEL, 2)]
if ON_GPU or _os.environ.get("AVPT_LAUNCHES_VITB") == "1":
    LAUNCH_CONFIGS.append((VIT_B16, 32))


@pytest.mark.parametrize("model_name,batch", LAUNCH_CONFIGS, ids=[m for m, _ in LAUNCH_CONFIGS])
@pytest.mark.parametrize("row_name,method_name,overrides", _launch_counter.METHODS,
                         ids=[m[0] for m in _launch_counter.METHODS])
def test_launch_count_row(results, model_name, batch, row_name, method_name, overrides):
    row = _launch_counter.count_method(row_name, method_name, overrides, model_name, batch)
    results.add(**row)
    assert row["inference"]["syncs"] == 0
