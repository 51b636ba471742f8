"""The reference ops against independent compositions, fp64 gradcheck, and the properties the
contract fixes (class token excluded, all-zero maps, area down-sampling, gate shut, softmax axes)."""
import dataclasses

import pytest
import torch

import avpt_kernels as ak
from avpt_kernels.ops import OPS
from avpt_kernels.ops.opspec import Shape
from avpt_kernels.ops.pim import PIMParams
from avpt_kernels.ops.pim import reference as pim_ref
from avpt_kernels.ops.prompt_bank import reference as prompt_bank_ref
from avpt_kernels.ops.region_pool import reference as region_pool_ref
from avpt_kernels.ops.pim.weights import random_pim_params
from avpt_kernels.testing import assert_close, assert_grads_close

from . import independent

# The GPU tier leaves these out: not a device path (the fp64 reference against independent compositions, on the CPU).
pytestmark = pytest.mark.cpu_only


def _grads(outputs, inputs, seed=1):
    """Gradients of a random linear functional of ``outputs`` w.r.t. ``inputs``."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


def _leaf(*shape, dtype=torch.float32, low=None):
    t = torch.rand(*shape, dtype=torch.float64) if low == 0 else torch.randn(*shape, dtype=torch.float64)
    return t.to(dtype).requires_grad_(True)


# ------------------------------------------------------------------ gradcheck (fp64) -----------
def test_gradcheck_region_pool_token_and_pixel_maps():
    f = _leaf(2, 17, 8, dtype=torch.float64)
    a = _leaf(2, 16, 3, dtype=torch.float64, low=0)
    assert torch.autograd.gradcheck(lambda f, a: region_pool_ref.region_pool(f, a, 1e-6), (f, a))
    pix = _leaf(2, 3, 8, 8, dtype=torch.float64, low=0)
    assert torch.autograd.gradcheck(lambda f, a: region_pool_ref.region_pool(f, a, 1e-6, (4, 4)), (f, pix))


def test_gradcheck_prompt_bank():
    args = [_leaf(2, 3, 8), _leaf(6, 8), _leaf(2, 8, 4), _leaf(2, 4, 8),
            _leaf(3, 8), _leaf(3, 8), _leaf(3, 8)]
    args = [a.detach().double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(
        lambda *xs: prompt_bank_ref.prompt_bank(*xs, [0, 0, 1], 1e-5), tuple(args))


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_gradcheck_pim(reduce):
    z, p = _leaf(2, 7, 8, dtype=torch.float64), _leaf(2, 3, 8, dtype=torch.float64)
    w = random_pim_params(8, 8, 5, dtype=torch.float64)
    fn = lambda z, p, *ws: pim_ref.pim(z, p, PIMParams(*ws), 2, reduce)  # noqa: E731
    # fast_mode checks random projections of the Jacobian (22 inputs: the full one is slow).
    assert torch.autograd.gradcheck(fn, (z, p, *w), fast_mode=True)


# ------------------------------------------- reference vs independent composition ---------------
PIM_SHAPES = [  # B, T, D, K, H, dh, G
    (1, 197, 768, 6, 12, 16, 64),
    (2, 197, 64, 5, 2, 16, 32),
    (3, 10, 32, 1, 4, 8, 8),
    (2, 33, 48, 6, 1, 32, 16),
]


def _fp64(tensors):
    return [t.detach().double().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("b,t,d,k,h,dh,g", PIM_SHAPES)
def test_pim_matches_independent(b, t, d, k, h, dh, g, reduce):
    """fp64 reference == fp64 independent (the formula), and the fp32 reference is within the
    fp32 tolerance of that fp64 truth, outputs and every gradient."""
    names = ("z", "p", *ak.PIMParams._fields)
    inputs = [_leaf(b, t, d), _leaf(b, k, d), *random_pim_params(d, h * dh, g)]
    truth_in = _fp64(inputs)
    truth = independent.pim(truth_in[0], truth_in[1], ak.PIMParams(*truth_in[2:]), h, reduce)
    truth_g = _grads(truth[:2], truth_in)
    for dtype_inputs in (_fp64(inputs), inputs):
        got = pim_ref.pim(dtype_inputs[0], dtype_inputs[1], ak.PIMParams(*dtype_inputs[2:]), h,
                            reduce, return_attn=True)
        dt = dtype_inputs[0].dtype
        for name, x, y in zip(("z_out", "p_tilde", "attn"), got, truth):
            assert_close(x, y, dtype=dt, name=f"{name} {dt}")
        assert_grads_close(names, _grads(got[:2], dtype_inputs), truth_g, dtype=dt)


@pytest.mark.parametrize("b,t,r,d", [(1, 197, 3, 768), (2, 17, 1, 16), (3, 50, 5, 24)])
def test_region_pool_matches_independent(b, t, r, d):
    f, a = _leaf(b, t, d), _leaf(b, t - 1, r, low=0)
    got, want = region_pool_ref.region_pool(f, a, 1e-6), independent.region_pool(f, a, 1e-6)
    assert_close(got, want, name="pooled")
    for name, x, y in zip(("features", "maps"), _grads([got], (f, a)), _grads([want], (f, a))):
        assert_close(x, y, name=f"grad {name}")


def test_pixel_maps_area_average_onto_grid():
    f = _leaf(2, 197, 32)
    pix = _leaf(2, 3, 224, 224, low=0)
    got = ak.region_pool(f, pix)
    want = independent.region_pool(f, independent.area_downsample(pix, 16), 1e-6)
    assert_close(got, want, name="pooled from 224x224 maps")
    for name, x, y in zip(("features", "maps"), _grads([got], (f, pix)), _grads([want], (f, pix))):
        assert_close(x, y, name=f"grad {name}")


@pytest.mark.parametrize("stages", [[0] * 12, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]])
@pytest.mark.parametrize("r,m,rank", [(3, 2, 8), (1, 6, 4), (3, 1, 16)])
def test_prompt_bank_matches_independent(stages, r, m, rank):
    d, b, s = 48, 2, max(stages) + 1
    args = [_leaf(b, r, d), _leaf(r * m, d), _leaf(s, d, rank), _leaf(s, rank, d),
            _leaf(12, d), _leaf(12, d), _leaf(12, d)]
    got = prompt_bank_ref.prompt_bank(*args, stages, 1e-5)
    want = independent.prompt_bank(*args, stages, 1e-5)
    assert got.shape == (12, b, r * m, d)
    assert_close(got, want, name="prompts")
    for i, (x, y) in enumerate(zip(_grads([got], args), _grads([want], args))):
        assert_close(x, y, name=f"grad arg{i}")


# ------------------------------------------------------------------ contract properties ------
def test_class_token_is_excluded():
    f = torch.randn(2, 17, 8)
    a = torch.rand(2, 16, 3)
    f2 = f.clone()
    f2[:, 0] = 1e6
    assert torch.equal(ak.region_pool(f, a), ak.region_pool(f2, a))
    assert_close(ak.region_pool(f, a), ak.region_pool(f[:, 1:], a), name="with vs without cls")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_zero_map_gives_zero_row_not_nan(dtype):
    f = torch.randn(2, 17, 8, dtype=dtype, requires_grad=True)
    a = torch.rand(2, 16, 3).to(dtype)
    a[:, :, 1] = 0
    a.requires_grad_(True)
    out = ak.region_pool(f, a)
    assert torch.isfinite(out).all()
    assert (out[:, 1] == 0).all()
    out.sum().backward()
    assert torch.isfinite(f.grad).all()
    # d out / d A at an empty region is F / eps (1e6 x |F|): beyond float16's range, so only the
    # non-empty regions are required finite there (documented in region_pool's docstring).
    grad_a = a.grad if dtype != torch.float16 else a.grad[:, :, [0, 2]]
    assert torch.isfinite(grad_a).all()


def test_gate_shut_returns_tokens_unchanged():
    z, p = torch.randn(2, 197, 64), torch.randn(2, 6, 64)
    w = random_pim_params(64, 32, 16, requires_grad=False)
    w = w._replace(gate_b2=torch.tensor([-float("inf")]))
    z_out, p_tilde = ak.pim(z, p, w, num_heads=2)
    assert torch.equal(z_out, z)
    assert not torch.equal(p_tilde, p)


def test_attention_axes_and_mean_reduce():
    z, p = torch.randn(2, 20, 16, dtype=torch.float64), torch.randn(2, 4, 16, dtype=torch.float64)
    w = random_pim_params(16, 16, 8, dtype=torch.float64, requires_grad=False)
    _, p_sum, attn = ak.pim(z, p, w, 2, "sum", return_attn=True)
    _, p_mean = ak.pim(z, p, w, 2, "mean")
    assert attn.shape == (2, 2, 4, 20)
    assert_close(attn.sum(-1), torch.ones(2, 2, 4, dtype=torch.float64), name="p2t rows sum to 1")
    # Eq. 6 is linear in the token sum: mean = sum / T on the message, before t2p_o's bias.
    msg_sum = (p_sum - p - w.t2p_o_b) @ torch.linalg.pinv(w.t2p_o_w).T
    msg_mean = (p_mean - p - w.t2p_o_b) @ torch.linalg.pinv(w.t2p_o_w).T
    assert_close(msg_mean, msg_sum / 20, name="mean reduce")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_dtype_and_stay_close(dtype):
    z, p = torch.randn(2, 197, 64), torch.randn(2, 6, 64)
    w = random_pim_params(64, 32, 16, requires_grad=False)
    low = pim_ref.pim(z.to(dtype), p.to(dtype), PIMParams(*(t.to(dtype) for t in w)), 2)
    high = pim_ref.pim(z.to(dtype).float(), p.to(dtype).float(),
                         PIMParams(*(t.to(dtype).float() for t in w)), 2)
    for x, y, name in zip(low, high, ("z_out", "p_tilde")):
        assert x.dtype == dtype
        assert_close(x, y, dtype=dtype, name=name)


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_specs_describe_each_op(name):
    """The shared op description (tests, benchmarks, compare.py): its inputs run through the
    reference and through the public op on the torch backend to the same values, and its traffic
    floor grows with the backward pass."""
    spec = OPS[name].SPEC
    shape = Shape(B=2, T=17, D=32, K=6, R=3, layers=4, stages=2, rank=4)
    for maps_in_pixels in ((0, 8) if name == "region_pool" else (0,)):
        s = dataclasses.replace(shape, map_side=maps_in_pixels)
        inputs = spec.inputs(s, torch.float64, seed=1)
        assert all(torch.equal(a, b) for a, b in zip(inputs, spec.inputs(s, torch.float64, seed=1)))
        want = spec.reference(s)(*inputs)
        got = spec.op(s)(*inputs, backend="torch")
        for x, y in zip(*(v if isinstance(v, tuple) else (v,) for v in (got, want))):
            assert torch.equal(x, y)
        assert 0 < spec.min_bytes(s, torch.bfloat16, False) < (
            spec.min_bytes(s, torch.bfloat16, False) + spec.min_bytes(s, torch.bfloat16, True))
