"""The bounded-error rule (flash-attention's, ``avpt_kernels.testing.assert_bounded_error``) for
soft region pooling (Eq. 2) and the prompt bank (Eq. 4), float16 and bfloat16.

For each op, input family and dtype: the Triton backend's error against the fp64 truth (the
reference evaluated in fp64 on the SAME 16-bit inputs, upcast) must be at most 2x the torch
backend's error on those inputs (floored at the dtype's unit roundoff), for the output and the
gradient of every differentiable input, with error = max|diff| / max|truth| per tensor. The
upstream gradient is one fixed random fp64 tensor, cast to each side's dtype.

Input families: plain; one high-norm token per image (x30, x100); sharp/peaked inputs
(region_pool: near-binary maps, a region with tiny total mass; prompt_bank: every weight scaled
x3..x5, region embeddings with one huge row); very different images in one batch (per-image
scales 1e-2..1e2); and two more: features sharing one large vector (region_pool "offset30", the
case that found the 16-bit ``out`` in region_pool's backward) and inputs near the top of
float16's range whose sums exceed it ("nearmax"). All at the model's shapes and at small odd
ones.

Non-finite values: the rule's error is inf where a backend gives inf/NaN and the truth is
finite, but it would pass if both backends overflowed. So every case also checks on its own that
the Triton backend is finite wherever the truth is finite AND representable in the dtype, and
the cases are built so that the truth is representable (the check is not vacuous). The one
documented exception, the gradient w.r.t. an all-zero map (F / eps, about 1e6 |F|, beyond
float16's range: the truth itself overflows float16), has its own test below.

The cases at the model's shapes take seconds each under the Triton interpreter: a
representative few run in CI, the rest carry the ``extended`` marker (``make test-extended``).
Run with ``-s`` to print the measured errors of every tensor.
"""

import pytest
import torch

from avpt_kernels.testing import BOUND_FACTOR, UNIT_ROUNDOFF, assert_bounded_error, \
    relative_error

from avpt_kernels.ops import prompt_bank as pb
from avpt_kernels.ops import region_pool as rp
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float16, torch.bfloat16)
EXT = pytest.mark.extended


# --------------------------------------------------------------------------------------------
# The measurement: one op on the same 16-bit inputs through both backends, and in fp64
# --------------------------------------------------------------------------------------------
def _grads(fn, inputs, names, grad64, dtype):
    """{"out": fn(*inputs), "d <name>": gradient} with leaves copied from ``inputs`` in
    ``dtype`` (the 16-bit inputs themselves, or their fp64 upcast for the truth)."""
    leaves = [x.detach().to(device=DEVICE, dtype=dtype).requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad64.to(device=DEVICE, dtype=dtype))
    return {"out": out.detach(), **{f"d {n}": g for n, g in zip(names, grads)}}


def _measure(fn, inputs, names, dtype, seed=123):
    """fused, torch-backend and truth tensors of ``fn(*inputs, backend=...)``; ``inputs`` are
    already in ``dtype``."""
    with torch.no_grad():
        probe = fn(*[x.detach().to(DEVICE) for x in inputs], backend="torch")
    grad64 = torch.randn(probe.shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)
    fused = _grads(lambda *a: fn(*a, backend="triton"), inputs, names, grad64, dtype)
    torch_side = _grads(lambda *a: fn(*a, backend="torch"), inputs, names, grad64, dtype)
    truth = _grads(lambda *a: fn(*a, backend="torch"), inputs, names, grad64, torch.float64)
    return fused, torch_side, truth


def _check_rule(fused, torch_side, truth, dtype, label):
    """The rule, plus: the fused backend is finite wherever the truth is finite and fits in
    ``dtype``, and the truth does fit (else the finiteness check would be vacuous)."""
    big = torch.finfo(dtype).max
    lines = []
    for name, t in truth.items():
        t = t.detach().cpu()
        assert torch.isfinite(t).all() and float(t.abs().max()) <= big, \
            f"{label} {name}: the truth does not fit {dtype} (max |truth| {float(t.abs().max()):.3g})"
        assert torch.isfinite(fused[name].detach().cpu()).all(), \
            f"{label} {name}: the Triton backend gives inf/NaN where the truth is finite"
        e_f, e_t = relative_error(fused[name], t), relative_error(torch_side[name], t)
        bound = BOUND_FACTOR * max(e_t, UNIT_ROUNDOFF[dtype])
        lines.append(f"  {name:16s} triton {e_f:.3e}  torch {e_t:.3e}  ratio-to-bound "
                     f"{e_f / bound:.2f}")
    print(f"\n{label} [{str(dtype)[6:]}]\n" + "\n".join(lines))
    assert_bounded_error(fused, torch_side, truth, dtype, label=label)


# --------------------------------------------------------------------------------------------
# Region pooling (Eq. 2)
# --------------------------------------------------------------------------------------------
# (B, T, D, R, pixel map size or None for token maps [B, N, R])
RP_SHAPES = {
    "vitb-pixel": (2, 197, 768, 3, 224),
    "vitb-token": (2, 197, 768, 3, None),
    "odd-pixel": (3, 17, 48, 5, 16),   # 4x4 grid, f = 4
    "odd-token": (3, 17, 48, 5, None),
    "grid8-pixel": (2, 65, 40, 3, 32),  # 8x8 grid, f = 4: 4 patch tiles, split over programs
}


def _rp_inputs(shape, family, dtype, seed=0):
    """features [B,T,D] (class token first) and maps of one family, built in fp64, then cast."""
    b, t, d, r, size = shape
    n = t - 1
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    mshape = (b, r, size, size) if size else (b, n, r)
    m = torch.rand(mshape, generator=g, dtype=torch.float64)
    if family.startswith("highnorm"):
        # One patch token per image (a different one in each) with x30 / x100 features.
        gain = float(family[len("highnorm"):])
        for i in range(b):
            f[i, 1 + (7 * i + 3) % n] *= gain
    elif family == "binary":
        # Near-binary maps: each region covers about half the patches with confidence ~1.
        u = torch.rand(mshape, generator=g, dtype=torch.float64)
        m = torch.where(m > 0.5, 1 - 0.01 * u, 0.01 * u)
    elif family == "tinymass":
        # Region 0 of every image has a tiny total mass: confidence ~1e-4 everywhere and 5e-3 on
        # one patch, so den = sum_p A ~ 1e-3 .. 2e-2 << 1 and G = dout / den is large. The test
        # scales the upstream gradient by 1e-2 so that d maps (~ |F| |dout| / den) fits float16.
        if size:
            side = size // round(n ** 0.5)  # one patch box (square grid)
            m[:, 0] = 1e-4 * m[:, 0]
            m[:, 0, :side, :side] = 5e-3
        else:
            m[:, :, 0] = 1e-4 * m[:, :, 0]
            m[:, 0, 0] = 5e-3
    elif family == "offset30":
        # Every token shares one large vector (x30 its own part), as the large shared channels
        # of a ViT's features: the region means are close to every token, and d maps =
        # (F - out).G / den cancels (this family exposed a backward that formed out.G from the
        # output rounded to 16 bits).
        f += 30 * torch.randn(d, generator=g, dtype=torch.float64)
    elif family == "nearmax":
        # Features near the top of float16's range (2e4 +- 1e3): the sums over patches
        # (sum_p A F ~ N x 2e4) exceed it, only fp32 accumulation holds them. The test scales
        # the upstream gradient by 1e-3 so that d maps fits float16.
        f = 2e4 + 1e3 * f
    elif family == "mixed":
        # Per-image feature scales spanning 1e-2 .. 1e2.
        f *= torch.logspace(-2, 2, b, dtype=torch.float64)[:, None, None]
    else:
        assert family == "plain", family
    return f.to(dtype), m.to(dtype)


RP_FAMILIES = ("plain", "highnorm30", "highnorm100", "binary", "tinymass", "offset30", "nearmax",
               "mixed")
# The representative few that run in CI at the model's shapes; every other model-shape case is
# ``extended``. The small odd shapes run every family in both dtypes; the 8x8 grid (pixel maps
# whose patches are split over programs, partials summed by the last ticket's program) a few.
RP_CI_MODEL = {("vitb-pixel", "offset30", torch.float16),
               ("vitb-token", "highnorm100", torch.bfloat16)}
RP_SHAPE_FAMILIES = {"grid8-pixel": ("plain", "tinymass", "offset30")}


def _rp_cases():
    cases = []
    for shape in RP_SHAPES:
        for family in RP_SHAPE_FAMILIES.get(shape, RP_FAMILIES):
            for dtype in DTYPES:
                slow = shape.startswith("vitb") and (shape, family, dtype) not in RP_CI_MODEL
                cases.append(pytest.param(shape, family, dtype, marks=(EXT,) if slow else (),
                                          id=f"{shape}-{family}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("shape,family,dtype", _rp_cases())
def test_region_pool_bounded_error(shape, family, dtype):
    f, m = _rp_inputs(RP_SHAPES[shape], family, dtype)
    grad_scale = {"tinymass": 1e-2, "nearmax": 1e-3}.get(family, 1.0)

    def fn(features, maps, backend):
        return rp.region_pool(features, maps, backend=backend) * grad_scale

    fused, torch_side, truth = _measure(fn, (f, m), ("features", "maps"), dtype)
    _check_rule(fused, torch_side, truth, dtype, f"region_pool {shape} {family}")


# The interpreter's fp32 -> fp16 cast of the overflowing F / eps warns; that is the point here.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("pixel", (False, True), ids=("token", "pixel"))
def test_region_pool_all_zero_map_float16(pixel):
    """The documented float16 overflow: the gradient w.r.t. an all-zero map is F / eps (~1e6),
    which float16 cannot hold (the truth itself overflows), so that map's gradient is excluded;
    everything else (the output, d features, the other maps' gradients) stays finite and obeys
    the rule."""
    dtype = torch.float16
    shape = (2, 17, 48, 3, 16 if pixel else None)
    f, m = _rp_inputs(shape, "plain", dtype)
    if pixel:
        m[1, 2] = 0
    else:
        m[1, :, 2] = 0
    fused, torch_side, truth = _measure(
        lambda a, b, backend: rp.region_pool(a, b, backend=backend), (f, m),
        ("features", "maps"), dtype)
    empty = (1, 2) if pixel else (1, slice(None), 2)
    dm_truth = truth["d maps"][empty]
    assert float(dm_truth.abs().max()) > torch.finfo(dtype).max  # the documented case
    assert (fused["out"][1, 2] == 0).all()
    # Compare everything but the empty map's gradient: zero it on every side.
    for side in (fused, torch_side, truth):
        side["d maps"] = side["d maps"].clone()
        side["d maps"][empty] = 0
    _check_rule(fused, torch_side, truth, dtype, f"region_pool all-zero map {'pixel' if pixel else 'token'}")


# --------------------------------------------------------------------------------------------
# Prompt bank (Eq. 4)
# --------------------------------------------------------------------------------------------
PB_NAMES = ("region_emb", "token_offset", "U", "V", "layer_bias", "ln_weight", "ln_bias")
# (B, R, m, D, r, L, S): K = R*m.
PB_SHAPES = {
    "vitb": (2, 3, 2, 768, 8, 12, 3),
    "odd": (3, 5, 1, 48, 5, 5, 2),  # K = 5 with m = 1, rank 5, L = 5 over 2 stages
}


def _stages(n_layers, n_stages):
    return [layer * n_stages // n_layers for layer in range(n_layers)]


def _pb_inputs(shape, family, dtype, seed=0):
    b, r, m, d, rank, n_layers, n_stages = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*size, scale=1.0, shift=0.0):
        return torch.randn(size, generator=g, dtype=torch.float64) * scale + shift

    args = [rnd(b, r, d), rnd(r * m, d, scale=0.5), rnd(n_stages, d, rank, scale=d ** -0.5),
            rnd(n_stages, rank, d, scale=rank ** -0.5), rnd(n_layers, d, scale=0.3),
            rnd(n_layers, d, scale=0.3, shift=1.0), rnd(n_layers, d, scale=0.3)]
    emb = args[0]
    if family.startswith("highnorm"):
        # One high-norm prompt token per image: the embedding of one region per image (a
        # different one in each) x30 / x100, as a high-norm patch token carries into its region.
        gain = float(family[len("highnorm"):])
        for i in range(b):
            emb[i, i % r] *= gain
    elif family == "scaled":
        # Every weight scaled by a factor in 3..5.
        for i, factor in enumerate((3.0, 3.5, 4.0, 4.5, 5.0, 3.25), start=1):
            args[i] = args[i] * factor
    elif family == "hugerow":
        emb[0, r - 1] *= 1e3  # one region embedding of the batch 1000x the others
    elif family == "nearmax":
        # Region embeddings near the top of float16's range (|E| up to ~4e4): x = e U V and the
        # LayerNorm sums of squares exceed it, only fp32 holds them.
        emb *= 1e4
    elif family == "mixed":
        emb *= torch.logspace(-2, 2, b, dtype=torch.float64)[:, None, None]
    else:
        assert family == "plain", family
    return [a.to(dtype) for a in args]


PB_FAMILIES = ("plain", "highnorm30", "highnorm100", "scaled", "hugerow", "nearmax", "mixed")
PB_CI_MODEL = {("vitb", "plain", torch.float16)}


def _pb_cases():
    cases = []
    for shape in PB_SHAPES:
        for family in PB_FAMILIES:
            for dtype in DTYPES:
                slow = shape == "vitb" and (shape, family, dtype) not in PB_CI_MODEL
                cases.append(pytest.param(shape, family, dtype, marks=(EXT,) if slow else (),
                                          id=f"{shape}-{family}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("shape,family,dtype", _pb_cases())
def test_prompt_bank_bounded_error(shape, family, dtype):
    dims = PB_SHAPES[shape]
    stages = _stages(dims[5], dims[6])
    args = _pb_inputs(dims, family, dtype)

    def fn(*tensors, backend):
        return pb.prompt_bank(*tensors, stages, backend=backend)

    fused, torch_side, truth = _measure(fn, args, PB_NAMES, dtype)
    _check_rule(fused, torch_side, truth, dtype, f"prompt_bank {shape} {family}")
