"""Triton soft region pooling (Eq. 2) against the reference on fp64 copies: outputs and both
gradients, every kernel dtype, token- and pixel-resolution maps, the op registration
(opcheck, torch.compile) and the backend routing. Runs on CUDA tensors when a GPU is present,
otherwise on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py)."""

import pytest
import torch

from avpt_kernels import backend, reference
from avpt_kernels.testing import DTYPES, assert_close

from avpt_kernels.ops import region_pool as rp
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
    fwd = rp.region_pool_min_bytes((32, 197, 768), (32, 3, 224, 224), torch.bfloat16)
    assert fwd == 2 * (32 * 196 * 768 + 32 * 3 * 224 * 224 + 32 * 3 * 768)
    tok = rp.region_pool_min_bytes((32, 197, 768), (32, 196, 3), torch.float32, backward=True)
    assert tok == 4 * (2 * 32 * 196 * 768 + 2 * 32 * 196 * 3 + 2 * 32 * 3 * 768)
