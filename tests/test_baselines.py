"""The benchmarks' expert PIM (``avpt_kernels.baselines``) computes what
``ops.pim.reference.pim`` does: outputs in fp64 (to rounding) and fp32, and the gradients of every
input and weight in fp64."""
import pytest
import torch

from avpt_kernels.ops.pim import PIMParams
from avpt_kernels.ops.pim import reference as pim_ref
from avpt_kernels.baselines import fuse_pim_weights, pim_expert
from avpt_kernels.ops.pim.weights import random_pim_params

B, T, K, D, HEADS, HEAD_DIM, GATE = 2, 9, 6, 24, 2, 8, 16


def _inputs(dtype, requires_grad=False):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype)
    p = torch.randn(B, K, D, generator=g, dtype=torch.float64).to(dtype)
    params = random_pim_params(D, HEADS * HEAD_DIM, GATE, dtype=dtype,
                               requires_grad=requires_grad, generator=g)
    return z.requires_grad_(requires_grad), p.requires_grad_(requires_grad), params


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_expert_pim_equals_the_reference(dtype, tol):
    z, p, params = _inputs(dtype)
    want = pim_ref.pim(z, p, params, HEADS)
    got = pim_expert(z, p, fuse_pim_weights(params, HEADS), HEADS)
    for name, g, w in zip(("z_out", "p_tilde"), got, want):
        assert g.dtype == dtype and g.shape == w.shape
        err = ((g - w).abs().max() / w.abs().max()).item()
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e} in {dtype}"


def test_expert_pim_gradients_equal_the_reference_in_fp64():
    z, p, params = _inputs(torch.float64, requires_grad=True)
    leaves = (z, p, *params)
    torch.manual_seed(0)
    dz, dp = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, K, D, dtype=torch.float64)

    def grads(outputs):
        loss = (outputs[0] * dz).sum() + (outputs[1] * dp).sum()
        return torch.autograd.grad(loss, leaves)

    want = grads(pim_ref.pim(z, p, params, HEADS))
    got = grads(pim_expert(z, p, fuse_pim_weights(params, HEADS), HEADS))
    names = ("z", "p") + PIMParams._fields
    for name, g, w in zip(names, got, want):
        # The key biases' gradients are zero in exact arithmetic (a bias on the keys adds one
        # constant to every logit along the softmax axis): judged on the key weight's scale.
        scale = want[names.index(name.replace("_b", "_w"))].abs().max() \
            if name.endswith("k_b") else w.abs().max()
        assert ((g - w).abs().max() / scale).item() < 1e-10, name


def test_fuse_rejects_heads_that_do_not_divide_the_width():
    _, _, params = _inputs(torch.float32)
    with pytest.raises(ValueError, match="num_heads=3"):
        fuse_pim_weights(params, 3)
