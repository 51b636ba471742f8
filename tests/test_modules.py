"""The nn.Module wrappers: forward and every gradient against the independent composition,
weight-loading names, layouts (non-contiguous, channels-last), autocast and the backend switch."""
import pytest
import torch

import avpt_kernels as ak
from avpt_kernels import backend
from avpt_kernels.testing import assert_close, assert_grads_close

from . import independent


def _randomise(module):
    g = torch.Generator().manual_seed(3)
    tensors = module.params() if hasattr(module, "params") else module.parameters()  # PIM: views
    with torch.no_grad():
        for p in tensors:
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
    return module


# The ViT-B/16 width runs on the torch backend here (the Triton kernels have their own D=768
# tests in tests/ops/test_pim.py); the small shape runs on whatever "auto" picks as well.
@pytest.mark.parametrize("b,t,d,k,h,dh,backend_name", [
    (1, 197, 768, 6, 12, 8, "torch"), (2, 197, 64, 5, 4, 16, "torch"), (2, 197, 64, 5, 4, 16, "auto")])
def test_pim_module_forward_and_grads(b, t, d, k, h, dh, backend_name):
    m = _randomise(ak.PromptTokenInteraction(d, h, dh, gate_hidden=32, backend=backend_name))
    z = torch.randn(b, t, d, requires_grad=True)
    p = torch.randn(b, k, d, requires_grad=True)
    z_out, p_tilde, attn = m(z, p, return_attn=True)
    inputs = (z, p, *m.params())
    truth_in = [t.detach().double().requires_grad_(True) for t in inputs]  # fp64 truth
    want = independent.pim(truth_in[0], truth_in[1], ak.PIMParams(*truth_in[2:]), h, m.t2p_reduce)
    for name, x, y in zip(("z_out", "p_tilde", "attn"), (z_out, p_tilde, attn), want):
        assert_close(x, y, dtype=torch.float32, name=name)
    g = torch.randn_like(z_out)
    dz, dp, dpacked = torch.autograd.grad((z_out * g).sum() + p_tilde.sum(), (z, p, m.packed))
    got_g = (dz, dp, *ak.unpack_weights(dpacked, d, h * dh, 32))  # the one packed gradient
    want_g = torch.autograd.grad((want[0] * g.double()).sum() + want[1].sum(), truth_in)
    assert_grads_close(("z", "p", *ak.PIMParams._fields), got_g, want_g, dtype=torch.float32)


def test_pim_module_packs_its_weights_and_starts_as_identity():
    m = ak.PromptTokenInteraction(32, 2, 8, 16, t2p_reduce="mean")
    assert [n for n, _ in m.named_parameters()] == ["packed"]
    assert m.num_heads == 2 and m.t2p_reduce == "mean"
    w = m.params()
    assert tuple(w.t2p_q_w.shape) == (16, 32) and tuple(w.gate_w1.shape) == (16, 64)
    assert all(x.data_ptr() >= m.packed.data_ptr() for x in w)  # views, no copies
    z = torch.randn(2, 9, 32)
    assert_close(m(z, torch.randn(2, 3, 32))[0], z, name="z_out of a new layer")  # p2t_o = 0
    m2 = ak.PromptTokenInteraction(32, 2, 8, 16, t2p_reduce="mean")
    m2.load_state_dict(_randomise(m).state_dict())  # loads by name
    assert torch.equal(m2.packed, m.packed)


def test_pim_module_loads_a_state_dict_with_one_linear_per_projection():
    """Checkpoints from before the packed layout (t2p_q.weight, ..., gate.2.bias) still load."""
    m = _randomise(ak.PromptTokenInteraction(32, 2, 8, 16))
    w = m.params()
    names = ("t2p_q", "t2p_k", "t2p_v", "t2p_o", "p2t_q", "p2t_k", "p2t_v", "p2t_o", "gate.0", "gate.2")
    old = {f"{n}.{part}": w[2 * i + j].detach().clone()
           for i, n in enumerate(names) for j, part in enumerate(("weight", "bias"))}
    m2 = ak.PromptTokenInteraction(32, 2, 8, 16)
    m2.load_state_dict(old)
    assert torch.equal(m2.packed, m.packed)


def test_region_pool_module_and_layouts():
    f = torch.randn(2, 197, 40)[:, :, ::2]  # non-contiguous features, D=20
    pix = torch.rand(2, 224, 224, 3).permute(0, 3, 1, 2)  # channels-last pixel maps
    assert not f.is_contiguous()
    out = ak.RegionPool()(f, pix)
    want = independent.region_pool(f, independent.area_downsample(pix.contiguous(), 16), 1e-6)
    assert_close(out, want, name="pooled")
    tok = torch.rand(2, 3, 196).transpose(1, 2)  # non-contiguous token maps
    assert_close(ak.RegionPool()(f, tok), independent.region_pool(f, tok, 1e-6), name="token maps")


def test_prompt_bank_module_forward_and_grads():
    m = _randomise(ak.LowRankPromptBank(dim=48, num_regions=3, tokens_per_region=2, rank=8,
                                        num_layers=12, num_stages=3))
    assert m.layer_stage == [0] * 4 + [1] * 4 + [2] * 4
    e = torch.randn(2, 3, 48, requires_grad=True)
    out = m(e)
    assert out.shape == (12, 2, 6, 48)
    args = (e, m.token_offset, m.U, m.V, m.layer_bias, m.ln_weight, m.ln_bias)
    want = independent.prompt_bank(*args, m.layer_stage, m.eps)
    assert_close(out, want, name="prompts")
    got_g = torch.autograd.grad(out.square().sum(), args)
    want_g = torch.autograd.grad(want.square().sum(), args)
    assert_grads_close(("region_emb", "token_offset", "U", "V", "layer_bias", "ln_weight", "ln_bias"),
                       got_g, want_g)


def test_modules_under_cpu_autocast():
    m = ak.PromptTokenInteraction(32, 2, 8, 16)
    z, p = torch.randn(2, 9, 32), torch.randn(2, 3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_out, p_tilde = m(z, p)
        prompts = ak.LowRankPromptBank(32, 3, 1, 4, 2)(torch.randn(2, 3, 32))
        # bf16 features (as from an autocast conv) with fp32 maps
        pooled = ak.RegionPool()(torch.randn(2, 17, 32, dtype=torch.bfloat16), torch.rand(2, 16, 3))
    assert z_out.dtype == p_tilde.dtype == prompts.dtype == pooled.dtype == torch.bfloat16


def test_backend_switch():
    assert backend.get_backend() in backend.BACKENDS
    with backend.use_backend("torch"):
        assert backend.get_backend() == "torch"
        assert backend.resolve("pim", torch.device("cpu"), None, lambda: None) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.set_backend("cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.region_pool(torch.randn(1, 5, 4), torch.rand(1, 4, 2), backend="fast")
    cpu = torch.device("cpu")
    # auto: Triton only where the kernels take the arguments and the device can run them.
    assert backend.resolve("x", cpu, "auto", lambda: "K=99") == "torch"
    assert backend.resolve("x", cpu, "auto", lambda: None) == (
        "triton" if backend.interpreter_enabled() else "torch")
    if backend.interpreter_enabled():  # "triton" raises with the op's reason, never falls back
        with pytest.raises(ValueError, match="x: backend='triton' does not support K=99"):
            backend.resolve("x", cpu, "triton", lambda: "K=99")
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        backend.resolve("x", meta, "triton", lambda: None)
