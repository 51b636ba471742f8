"""Op-level latency and memory: PIM, region pooling and the prompt bank, each with the fused
(Triton) provider, the eager reference and ``torch.compile(reference)``, in modes fwd, bwd and
fwd+bwd, with achieved GB/s against the minimum-traffic model.

On a GPU the default shape is B=32, T=197, D=768, K=6, R=3, r=8, L=12 plus a sweep over B and T;
on CPU small shapes through the interpreter (smoke run).
"""
import functools
import importlib

import pytest
import torch

from avpt_kernels import reference
from avpt_kernels.modules import contiguous_stages
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


def _elt(dtype):
    return torch.finfo(dtype).bits // 8


def min_bytes(op: str, mode: str, s: dict, dtype) -> int:
    """Lower bound on DRAM traffic: the big tensors read/written the fewest times the contract
    allows (PIM: Z read twice + z_out written once forward; Z, dz_out read and dz written once
    backward). Small per-image matrices and weights are ignored."""
    e, b, t, d, k, r = _elt(dtype), s["B"], s["T"], s["D"], s["K"], s["R"]
    if op == "pim":
        fwd, bwd = 3 * b * t * d * e, 3 * b * t * d * e
    elif op == "region_pool":
        maps = b * r * 224 * 224 * e if ON_GPU else b * r * (t - 1) * e
        fwd = b * (t - 1) * d * e + maps + b * r * d * e
        bwd = 2 * (b * (t - 1) * d * e + maps) + b * r * d * e
    else:  # prompt_bank: region embeddings in, all layers' prompts out
        fwd = b * r * d * e + LAYERS * b * k * d * e
        bwd = 2 * fwd
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


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
        side = 224 if ON_GPU else int(round(n ** 0.5)) * 2
        return (t(b, n + 1, d), t(b, r, side, side, unit=True))
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
