"""Triton soft region pooling (Eq. 2) against the reference on fp64 copies: outputs and both
gradients, every kernel dtype, token- and pixel-resolution maps, the op registration
(opcheck, torch.compile) and the backend routing; then the bounded-error rule in float16 and
bfloat16 (the input families and the rule: tests/ops/bounded_error.py). Runs on CUDA tensors when
a GPU is present, otherwise on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py). Run with
``-s`` to print the bounded-error measurements."""

import pytest
import torch

from avpt_kernels import backend
from avpt_kernels.ops.region_pool import op as rp
from avpt_kernels.ops.region_pool import reference, spec
from avpt_kernels.testing import DTYPES, assert_close
from tests.ops import bounded_error
from tests.ops.bounded_error import check_rule, measure

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (features shape, maps shape): class token present or not, token or pixel maps, B=1, R=1, R=3.
SHAPES = {
    "token-cls": ((2, 17, 48), (2, 16, 3)),
    "token-nocls-R1-B1": ((1, 16, 40), (1, 16, 1)),
    "pixel-4x4-f4": ((2, 17, 24), (2, 3, 16, 16)),
    "pixel-224-vitb": ((1, 197, 768), (1, 3, 224, 224)),
}


def _inputs(shape_f, shape_m, dtype, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    f = torch.randn(shape_f, generator=g).to(dtype).to(DEVICE).requires_grad_()
    m = torch.rand(shape_m, generator=g).to(dtype).to(DEVICE).requires_grad_()
    return f, m


def _reference(f, m, grad, eps=1e-6):
    grid = rp.check_args(f, m, eps)
    f64 = f.detach().double().requires_grad_()
    m64 = m.detach().double().requires_grad_()
    out = reference.region_pool(f64, m64, eps, grid)
    df, dm = torch.autograd.grad(out, (f64, m64), grad.to(device=f64.device, dtype=torch.float64))
    return out, df, dm


def _check(f, m, dtype, eps=1e-6):
    out = rp.region_pool(f, m, eps, backend="triton")
    assert out.dtype == dtype and out.shape == (f.shape[0], m.shape[1] if m.dim() == 4
                                                 else m.shape[2], f.shape[2])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    df, dm = torch.autograd.grad(out, (f, m), grad)
    ref_out, ref_df, ref_dm = _reference(f, m, grad, eps)
    assert_close(out, ref_out, dtype, "out")
    assert_close(df, ref_df, dtype, "d features")
    assert_close(dm, ref_dm, dtype, "d maps")
    return df, dm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SHAPES))
def test_matches_reference(case, dtype):
    shape_f, shape_m = SHAPES[case]
    f, m = _inputs(shape_f, shape_m, dtype)
    df, _ = _check(f, m, dtype)
    has_class_token = len(shape_m) == 4 or shape_f[1] == shape_m[1] + 1
    if has_class_token:
        assert (df[:, 0] == 0).all(), "the class token must get a zero gradient"


@pytest.mark.parametrize("splits", (1, 3, 4))
def test_pixel_map_patch_splits(monkeypatch, splits):
    # 8x8 grid (4 patch tiles): one program per image, or partial sums over 2 or 4 programs
    # added up by the program that draws the last ticket.
    monkeypatch.setattr(rp, "_pixel_splits", lambda batch, n_tiles, device: splits)
    f, m = _inputs((2, 65, 48), (2, 3, 16, 16), torch.float32)
    _check(f, m, torch.float32)


def test_pixel_map_splits_over_several_channel_blocks_16bit(monkeypatch):
    # D = 600: several D blocks (each with its own tickets), 3 splits; bf16, so the last
    # ticket's program also writes the fp32 copy of out that the backward reads.
    monkeypatch.setattr(rp, "_pixel_splits", lambda batch, n_tiles, device: 3)
    assert rp._cdiv(600, rp._fwd_block_d(600, True)) > 1
    f, m = _inputs((2, 65, 600), (2, 3, 16, 16), torch.bfloat16)
    _check(f, m, torch.bfloat16)


def test_pixel_maps_224_single_program_per_image(monkeypatch):
    monkeypatch.setattr(rp, "_pixel_splits", lambda batch, n_tiles, device: 1)
    f, m = _inputs(*SHAPES["pixel-224-vitb"], torch.float32)
    _check(f, m, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    # features [B,T,D] as a transposed view of [B,D,T]; token maps as a view of [B,R,N].
    f = torch.randn(2, 40, 17, generator=g).to(dtype).to(DEVICE).transpose(1, 2).detach() \
        .requires_grad_()
    f_view = f  # leaf with non-contiguous strides
    m = torch.rand(2, 3, 16, generator=g).to(dtype).to(DEVICE).transpose(1, 2).detach() \
        .requires_grad_()
    assert not f_view.is_contiguous() and not m.is_contiguous()
    _check(f_view, m, dtype)
    # pixel maps [B,R,H,W] as a permuted view of [B,H,W,R], features sliced along D.
    mp = torch.rand(2, 16, 16, 3, generator=g).to(dtype).to(DEVICE).permute(0, 3, 1, 2).detach() \
        .requires_grad_()
    fs = torch.randn(2, 17, 64, generator=g).to(dtype).to(DEVICE)[:, :, ::2].detach() \
        .requires_grad_()
    assert not mp.is_contiguous() and not fs.is_contiguous()
    _check(fs, mp, dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("pixel", (False, True), ids=("token", "pixel"))
def test_all_zero_map_gives_zero_row(dtype, pixel):
    shape_m = (2, 3, 8, 8) if pixel else (2, 16, 3)
    f, m = _inputs((2, 17, 32), shape_m, dtype)
    with torch.no_grad():
        if pixel:
            m[1, 2] = 0
        else:
            m[1, :, 2] = 0
    out = rp.region_pool(f, m, backend="triton")
    assert (out[1, 2] == 0).all() and torch.isfinite(out).all()
    # eps semantics as the reference, gradients included (d maps of the empty map is F / eps).
    _check(f, m, dtype)


@pytest.mark.parametrize("pixel", (False, True), ids=("token", "pixel"))
@pytest.mark.parametrize("which", ("features", "maps"))
def test_one_gradient_only(pixel, which):
    dtype = torch.float32
    f, m = _inputs((2, 17, 32), (2, 3, 8, 8) if pixel else (2, 16, 3), dtype)
    f.requires_grad_(which == "features")
    m.requires_grad_(which == "maps")
    out = rp.region_pool(f, m, backend="triton")
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, (f if which == "features" else m,), grad)
    _, ref_df, ref_dm = _reference(f, m, grad)
    assert_close(got, ref_df if which == "features" else ref_dm, dtype, f"d {which}")


def test_broadcast_gradient():
    # out.sum().backward() hands the backward a stride-0 (expanded) gradient.
    f, m = _inputs((2, 17, 32), (2, 3, 8, 8), torch.float32)
    rp.region_pool(f, m, backend="triton").sum().backward()
    _, ref_df, ref_dm = _reference(f, m, torch.ones(2, 3, 32))
    assert_close(f.grad, ref_df, torch.float32, "d features")
    assert_close(m.grad, ref_dm, torch.float32, "d maps")


def test_eps_is_honoured():
    f, m = _inputs((1, 17, 16), (1, 16, 2), torch.float32)
    with torch.no_grad():
        m.mul_(1e-3)  # den small enough that eps matters
    _check(f, m, torch.float32, eps=1e-2)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("pixel", (False, True), ids=("token", "pixel"))
def test_opcheck(pixel, dtype):
    # bfloat16: the op also returns the fp32 output the backward reads (out32).
    f, m = _inputs((2, 17, 32), (2, 3, 8, 8) if pixel else (2, 16, 3), dtype)
    grid = (4, 4) if pixel else (0, 0)
    torch.library.opcheck(rp.region_pool_op, (f, m, 1e-6, *grid))
    out, den, out32 = rp.region_pool_op(f.detach(), m.detach(), 1e-6, *grid)
    assert out32.shape == ((0,) if dtype == torch.float32 else out.shape)
    saved = out if dtype == torch.float32 else out32
    grad = torch.randn(out.shape).to(dtype).to(DEVICE)
    torch.library.opcheck(rp.region_pool_backward_op,
                          (grad, f.detach(), m.detach(), saved, den, 1e-6, *grid, True, True))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    f, m = _inputs((2, 17, 32), (2, 3, 8, 8), torch.float32)

    def fn(features, maps):
        return rp.region_pool(features, maps, backend="triton") * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(f, m)
    out.sum().backward()
    ref_out, ref_df, ref_dm = _reference(f, m, torch.full_like(out, 2.0) / 2)
    assert_close(out, 2 * ref_out, torch.float32, "compiled out")
    assert_close(f.grad, 2 * ref_df, torch.float32, "compiled d features")
    assert_close(m.grad, 2 * ref_dm, torch.float32, "compiled d maps")


def test_backend_routing(monkeypatch):
    f, m = _inputs((1, 17, 16), (1, 16, 3), torch.float32)
    calls = []
    monkeypatch.setattr(rp, "_forward", lambda *a: calls.append(1) or
                        (torch.zeros(1, 3, 16, device=DEVICE), torch.zeros(1, 3, device=DEVICE)))
    with backend.use_backend("triton"):
        rp.region_pool(f.detach(), m.detach())
    assert calls, "backend='triton' must run the kernel"
    calls.clear()
    rp.region_pool(f.detach(), m.detach(), backend="torch")
    assert not calls, "backend='torch' must not run the kernel"
    if backend.interpreter_enabled():
        rp.region_pool(f.detach(), m.detach(), backend="auto")
        assert calls, "backend='auto' runs Triton under the interpreter"


def test_unsupported_inputs_fall_back_or_raise():
    f, m = _inputs((1, 17, 16), (1, 16, 3), torch.float64)
    out = rp.region_pool(f, m, backend="auto")  # float64: the torch path under auto
    assert_close(out, _reference(f, m, torch.zeros(1, 3, 16, dtype=torch.float64))[0],
                 torch.float64, "fp64 auto")
    with pytest.raises(ValueError, match="features dtype"):  # one rule: resolve raises ValueError
        rp.region_pool(f, m, backend="triton")
    f32, many = _inputs((1, 17, 16), (1, 16, 17), torch.float32)
    with pytest.raises(ValueError, match="maps.*at most 16 regions"):
        rp.region_pool(f32, many, backend="triton")


def test_min_bytes():
    fwd = spec.region_pool_min_bytes((32, 197, 768), (32, 3, 224, 224), torch.bfloat16)
    assert fwd == 2 * (32 * 196 * 768 + 32 * 3 * 224 * 224 + 32 * 3 * 768)
    tok = spec.region_pool_min_bytes((32, 197, 768), (32, 196, 3), torch.float32, backward=True)
    assert tok == 4 * (2 * 32 * 196 * 768 + 2 * 32 * 196 * 3 + 2 * 32 * 3 * 768)


# --------------------------------------------------------------------------------------------
# The bounded-error rule (tests/ops/bounded_error.py), float16 and bfloat16
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
            for dtype in bounded_error.DTYPES:
                slow = shape.startswith("vitb") and (shape, family, dtype) not in RP_CI_MODEL
                cases.append(pytest.param(shape, family, dtype, marks=(pytest.mark.extended,) if slow else (),
                                          id=f"{shape}-{family}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("shape,family,dtype", _rp_cases())
def test_region_pool_bounded_error(shape, family, dtype):
    f, m = _rp_inputs(RP_SHAPES[shape], family, dtype)
    grad_scale = {"tinymass": 1e-2, "nearmax": 1e-3}.get(family, 1.0)

    def fn(features, maps, backend):
        return rp.region_pool(features, maps, backend=backend) * grad_scale

    fused, torch_side, truth = measure(fn, (f, m), ("features", "maps"), dtype)
    check_rule(fused, torch_side, truth, dtype, f"region_pool {shape} {family}")


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
    fused, torch_side, truth = measure(
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
    check_rule(fused, torch_side, truth, dtype, f"region_pool all-zero map {'pixel' if pixel else 'token'}")
