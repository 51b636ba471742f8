"""Op-level latency and memory, shared by the ops' benchmark files ``benchmarks/ops/test_<op>.py``
(one per op of the registry ``avpt_kernels.ops.OPS``; rows carry ``op=<op>``): each op's
``SPEC`` in modes fwd, bwd and fwd+bwd, with achieved GB/s against the minimum-traffic model.
Providers: ``fused`` (the public op on the Triton kernels), ``eager`` (the op's ``reference``),
``compiled`` (``torch.compile`` of the reference) and, for PIM, the baselines a user would pick
instead: ``expert``
(``avpt_kernels.baselines.pim_expert``: fused projections in the input dtype) and
``expert-max-autotune`` (it under ``torch.compile(mode="max-autotune")``, GPU only).

On a GPU the default shape is B=32, T=197, D=768, K=6, R=3, r=8, L=12 plus a sweep over B and T;
on CPU small shapes through the interpreter (smoke run).
"""
import functools
import types

import pytest
import torch

from avpt_kernels.ops import OPS
from avpt_kernels.ops.opspec import Shape
from benchmarks.harness import ON_GPU, measure

# The ``pytestmark`` of every op's benchmark file
PYTESTMARK = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32

# Region maps in pixels: 224 x 224 on a GPU (the model's input), twice the patch grid on CPU.
if ON_GPU:
    SHAPES = [Shape(B=32, T=197, D=768, map_side=224)] + \
             [Shape(B=b, T=t, D=768, map_side=224) for b, t in ((1, 197), (8, 197), (64, 197))] + \
             [Shape(B=32, T=577, D=768, map_side=384)]
else:
    SHAPES = [Shape(B=2, T=17, D=64, map_side=8)]
PROVIDERS = ("fused", "eager", "compiled")
BASELINES = {"pim": ("expert", "expert-max-autotune")}  # op -> its extra baseline providers
MODES = ("fwd", "bwd", "fwd+bwd")


def min_bytes(op: str, mode: str, s: Shape, dtype) -> int:
    """The traffic floor of each op as its module defines it (``*_min_bytes``): forward,
    backward, or both."""
    floor = functools.partial(OPS[op].SPEC.min_bytes, s, dtype)
    return {"fwd": floor(False), "bwd": floor(True), "fwd+bwd": floor(False) + floor(True)}[mode]


@functools.lru_cache(maxsize=None)
def _compiled(op: str, shape: Shape):
    return torch.compile(OPS[op].SPEC.reference(shape), dynamic=False)


def _pim_expert(shape: Shape):
    """(fn, prepare) of the expert PIM: ``prepare`` turns the spec's inputs (z, p, *PIMParams)
    into (z, p, *fused weights), fused once outside the timed call (as a module holds them)."""
    from avpt_kernels.baselines import ExpertPIMWeights, fuse_pim_weights, pim_expert
    from avpt_kernels.ops.pim import PIMParams

    def prepare(inputs):
        z, p, *weights = inputs
        with torch.no_grad():
            fused = fuse_pim_weights(PIMParams(*weights), shape.heads)
        return (z, p, *(w.requires_grad_(z.requires_grad) for w in fused))

    def fn(z, p, *fused):
        return pim_expert(z, p, ExpertPIMWeights(*fused), shape.heads)
    return fn, prepare


@functools.lru_cache(maxsize=None)
def _expert_max_autotune(shape: Shape):
    fn, prepare = _pim_expert(shape)
    return torch.compile(fn, mode="max-autotune", dynamic=False), prepare


def _provider_fn(provider: str, op: str, s: Shape):
    """(fn, prepare): the provider's callable and the map from the spec's inputs to its own."""
    same = lambda inputs: inputs  # noqa: E731
    if provider == "fused":
        return OPS[op].SPEC.fused(s), same
    if provider == "eager":
        return OPS[op].SPEC.reference(s), same
    if provider == "compiled":
        return _compiled(op, s), same
    if provider == "expert":
        return _pim_expert(s)
    if provider == "expert-max-autotune":
        if not ON_GPU:
            pytest.skip("max-autotune benchmarks GPU kernel choices: GPU only")
        return _expert_max_autotune(s)
    raise ValueError(f"unknown provider {provider!r}")


def _loss(outputs):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum(o.float().sum() for o in outputs)


def op_benchmarks(op: str):
    """The benchmark tests of ``OPS[op]``, for its ``benchmarks/ops/test_<op>.py`` to bind:
    ``test_op`` (latency and memory per shape, provider and mode) and ``test_host_time``."""

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("provider", PROVIDERS + BASELINES.get(op, ()))
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s.B}-T{s.T}-D{s.D}-K{s.K}")
    def test_op(benchmark, results, provider, mode, shape):
        run_op(benchmark, results, op, provider, mode, shape)

    def test_host_time(results, monkeypatch):
        run_host_time(results, monkeypatch, op)

    return test_op, test_host_time


def run_op(benchmark, results, op, provider, mode, shape):
    """One latency-and-memory row of ``op`` (``kind="op"``)."""
    is_default = shape is SHAPES[0]
    if not is_default and (mode != "fwd+bwd" or provider not in ("fused", "eager")):
        pytest.skip("the B/T sweep covers fused and eager fwd+bwd only")
    row = dict(kind="op", op=op, provider=provider, mode=mode,
               shape=dict(B=shape.B, T=shape.T, D=shape.D, K=shape.K, R=shape.R),
               dtype=str(DTYPE).replace("torch.", ""), device=DEVICE,
               min_bytes=min_bytes(op, mode, shape, DTYPE))
    fn, prepare = _provider_fn(provider, op, shape)
    grad = mode != "fwd"
    rounds = 20 if ON_GPU else 3
    inputs = prepare(OPS[op].SPEC.inputs(shape, DTYPE, DEVICE, requires_grad=grad))
    if mode == "fwd":
        with torch.no_grad():
            stats = measure(benchmark, lambda: fn(*inputs), rounds=rounds)
    elif mode == "fwd+bwd":
        stats = measure(benchmark, lambda: torch.autograd.grad(_loss(fn(*inputs)), inputs),
                        rounds=rounds)
    else:  # bwd: the forward runs in setup, outside the timed call
        stats = measure(benchmark, lambda loss: torch.autograd.grad(loss, inputs),
                        setup=lambda: _loss(fn(*inputs)), rounds=rounds)
    gbps = row["min_bytes"] / (stats["median_ms"] * 1e-3) / 1e9 \
        if ON_GPU and stats["median_ms"] else None
    results.add(**row, **stats, gbps_vs_min_traffic=gbps, status="ok", grad=grad)


# ----------------------------------------------------------------------------------------------
# Host time of a fused call: everything but the kernels (argument checks, dispatch, layout,
# allocations, the launch calls' Python side), with every Triton kernel of the op's module
# replaced by a no-op. On a GPU this time overlaps the kernels of earlier calls only while it is
# shorter than them: the first H200 run found the A-VPT forward host-bound (27.7 ms wall for
# 12.0 ms of GPU work). Model shape on both CPU and GPU (no kernel runs); on CPU the torch ops
# around the kernels run for real (and region pooling checks its maps' values, which it skips
# on a GPU), so only the GPU figure is the host cost as such.
# ----------------------------------------------------------------------------------------------
HOST_SHAPE = Shape(B=32, T=197, D=768, map_side=224)
def _op_modules(package: types.ModuleType, seen=None):
    """The op's package and every module of it (its package ``__init__`` imports them all:
    ``op``, ``kernels``, ``launch``, ... whatever its internals are)."""
    seen = set() if seen is None else seen
    if package.__name__ in seen:
        return
    seen.add(package.__name__)
    yield package
    for value in vars(package).values():
        if isinstance(value, types.ModuleType) and value.__name__.startswith(package.__name__ + "."):
            yield from _op_modules(value, seen)


def _no_op_kernels(monkeypatch, op: str) -> int:
    class NoOp:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    count = 0
    for module in _op_modules(OPS[op]):
        for attr, value in vars(module).items():
            if type(value).__name__ in ("JITFunction", "InterpretedFunction"):
                monkeypatch.setattr(module, attr, NoOp())
                count += 1
    return count


def run_host_time(results, monkeypatch, op):
    """The host time of one fused call of ``op`` (``kind="host"``)."""
    import time

    assert _no_op_kernels(monkeypatch, op) > 0
    fn, prepare = OPS[op].SPEC.fused(HOST_SHAPE), lambda xs: xs
    if op == "pim":  # the modules' entry: weights packed once (PromptTokenInteraction keeps them so)
        import avpt_kernels as ak
        from avpt_kernels import PIMParams, pack_weights

        s = HOST_SHAPE
        fn = functools.partial(ak.pim_packed, num_heads=s.heads, head_dim=s.head_dim,
                               gate_hidden=s.gate, backend="triton")

        def prepare(xs):
            flat = pack_weights(PIMParams(*xs[2:])).detach().requires_grad_(xs[0].requires_grad)
            return xs[0], xs[1], flat
    row = dict(kind="host", op=op, shape=dict(B=HOST_SHAPE.B, T=HOST_SHAPE.T, D=HOST_SHAPE.D,
                                               K=HOST_SHAPE.K, R=HOST_SHAPE.R),
               dtype=str(DTYPE).replace("torch.", ""), device=DEVICE)
    for label, grad in (("fwd_no_grad", False), ("fwd_autograd", True)):
        inputs = prepare(OPS[op].SPEC.inputs(HOST_SHAPE, DTYPE, DEVICE, requires_grad=grad))
        with torch.set_grad_enabled(grad):
            for _ in range(10 if ON_GPU else 2):
                fn(*inputs)
            n, start = (200 if ON_GPU else 20), time.perf_counter()
            for _ in range(n):
                fn(*inputs)
            row[f"{label}_host_us"] = (time.perf_counter() - start) / n * 1e6
    results.add(**row, status="ok")
