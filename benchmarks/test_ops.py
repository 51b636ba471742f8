"""Op-level latency and memory: PIM, region pooling and the prompt bank, each with the fused
(Triton) provider, the eager reference and ``torch.compile(reference)``, in modes fwd, bwd and
fwd+bwd, with achieved GB/s against the minimum-traffic model.

On a GPU the default shape is B=32, T=197, D=768, K=6, R=3, r=8, L=12 plus a sweep over B and T;
on CPU small shapes through the interpreter (smoke run).
"""
import functools

import pytest
import torch

from avpt_kernels import reference
from avpt_kernels.modules import contiguous_stages
from avpt_kernels.ops.pim import pim_min_bytes
from avpt_kernels.ops.prompt_bank import prompt_bank_min_bytes
from avpt_kernels.ops.region_pool import region_pool_min_bytes
from avpt_kernels.testing import random_pim_params
from benchmarks.harness import ON_GPU, measure

pytestmark = pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
HEADS, HEAD_DIM, GATE, LAYERS, STAGES, RANK = 4, 16, 32, 12, 3, 8

if ON_GPU:
    SHAPES = [dict(B=32, T=197, D=768, K=6, R=3)] + \
             [dict(B=b, T=t, D=768, K=6, R=3) for b, t in ((1, 197), (8, 197), (64, 197), (32, 577))]
else:
    SHAPES = [dict(B=2, T=17, D=64, K=6, R=3)]
PROVIDERS = ("fused", "eager", "compiled")
MODES = ("fwd", "bwd", "fwd+bwd")


def _map_shape(s: dict) -> tuple:
    n = s["T"] - 1
    side = 224 if ON_GPU else int(round(n ** 0.5)) * 2
    return (s["B"], s["R"], side, side)


def min_bytes(op: str, mode: str, s: dict, dtype) -> int:
    """The traffic floor of each op as its module defines it (``*_min_bytes``): forward,
    backward, or both."""
    def floor(backward: bool) -> int:
        if op == "pim":
            return pim_min_bytes(s["B"], s["T"], s["D"], s["K"], HEADS * HEAD_DIM, dtype, backward)
        if op == "region_pool":
            return region_pool_min_bytes((s["B"], s["T"], s["D"]), _map_shape(s), dtype, backward)
        return prompt_bank_min_bytes(s["B"], s["R"], s["K"], s["D"], RANK, LAYERS, STAGES, dtype,
                                     backward)
    return {"fwd": floor(False), "bwd": floor(True), "fwd+bwd": floor(False) + floor(True)}[mode]


def _inputs(op: str, s: dict, requires_grad: bool):
    g = torch.Generator().manual_seed(0)

    def t(*shape, unit=False):
        x = torch.rand(*shape, generator=g) if unit else torch.randn(*shape, generator=g)
        return x.to(DEVICE, DTYPE).requires_grad_(requires_grad)

    b, n, d, k, r = s["B"], s["T"] - 1, s["D"], s["K"], s["R"]
    if op == "pim":
        w = random_pim_params(d, HEADS * HEAD_DIM, GATE, dtype=DTYPE, device=DEVICE,
                              requires_grad=requires_grad)
        return (t(b, n + 1, d), t(b, k, d), *w)
    if op == "region_pool":
        return (t(b, n + 1, d), t(*_map_shape(s), unit=True))
    return (t(b, r, d), t(k, d), t(STAGES, d, RANK), t(STAGES, RANK, d),
            t(LAYERS, d), t(LAYERS, d), t(LAYERS, d))


def _reference_fn(op: str, s: dict):
    stages = contiguous_stages(LAYERS, STAGES)
    if op == "pim":
        return lambda z, p, *w: reference.pim(z, p, reference.PIMParams(*w), HEADS)
    if op == "region_pool":
        n = s["T"] - 1
        side = int(round(n ** 0.5))
        return lambda f, a: reference.region_pool(f, a, 1e-6, (side, side))
    return lambda *xs: reference.prompt_bank(*xs, stages, 1e-5)


def _fused_fn(op: str):
    module = importlib.import_module(f"avpt_kernels.{op}")
    if not module.HAS_TRITON:
        return None
    stages = contiguous_stages(LAYERS, STAGES)
    if op == "pim":
        return lambda z, p, *w: module.pim(z, p, reference.PIMParams(*w), HEADS, backend="triton")
    if op == "region_pool":
        return lambda f, a: module.region_pool(f, a, backend="triton")
    return lambda *xs: module.prompt_bank(*xs, stages, backend="triton")


@functools.lru_cache(maxsize=None)
def _compiled(op: str, shape_key: str):
    return torch.compile(_reference_fn(op, eval(shape_key)), dynamic=False)


def _provider_fn(provider: str, op: str, s: dict):
    if provider == "fused":
        return _fused_fn(op)
    if provider == "eager":
        return _reference_fn(op, s)
    return _compiled(op, repr(s))


def _loss(outputs):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum(o.float().sum() for o in outputs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", ["pim", "region_pool", "prompt_bank"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{B}-T{T}-D{D}-K{K}".format(**s))
def test_op(benchmark, results, op, provider, mode, shape):
    is_default = shape is SHAPES[0]
    if not is_default and (mode != "fwd+bwd" or provider == "compiled"):
        pytest.skip("the B/T sweep covers fused and eager fwd+bwd only")
    row = dict(kind="op", op=op, provider=provider, mode=mode, shape=shape,
               dtype=str(DTYPE).replace("torch.", ""), device=DEVICE,
               min_bytes=min_bytes(op, mode, shape, DTYPE))
    fn = _provider_fn(provider, op, shape)
    if fn is None:
        results.add(**row, status="unavailable: no Triton kernel for this op yet")
        return
    grad = mode != "fwd"
    rounds = 20 if ON_GPU else 3
    if mode == "fwd":
        inputs = _inputs(op, shape, False)
        with torch.no_grad():
            stats = measure(benchmark, lambda: fn(*inputs), rounds=rounds)
    elif mode == "fwd+bwd":
        inputs = _inputs(op, shape, True)
        stats = measure(benchmark, lambda: torch.autograd.grad(_loss(fn(*inputs)), inputs),
                        rounds=rounds)
    else:  # bwd: the forward runs in setup, outside the timed call
        inputs = _inputs(op, shape, True)
        stats = measure(benchmark, lambda loss: torch.autograd.grad(loss, inputs),
                        setup=lambda: _loss(fn(*inputs)), rounds=rounds)
    gbps = row["min_bytes"] / (stats["median_ms"] * 1e-3) / 1e9 \
        if ON_GPU and stats["median_ms"] else None
    results.add(**row, **stats, gbps_vs_min_traffic=gbps, status="ok", grad=grad)
