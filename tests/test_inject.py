"""Drop-in PIM (avpt_kernels.inject): inject_pim / remove_pim / pim_state_dict /
load_pim_state_dict / PIMBlock on tiny models of the three families, built locally (no
downloads): an open_clip VisionTransformer (batch-first, and sequence-first), a timm
VisionTransformer, Hugging Face ViTModel and CLIPVisionModel.

Per family: a fresh injection leaves the outputs unchanged (fp32, 1e-6); one optimisation step
changes them; with the gates shut they equal the original's again; save/load round-trips the
added weights only; remove_pim restores the original exactly. Then: PIMBlock in nn.Sequential,
prompt broadcasting, the init behaviour, callable prompts, errors, the fused backend against
the torch one, torch.compile(fullgraph=True), autocast, and the launches the wrapper adds.
"""
import copy

import pytest
import torch
from torch import nn

import avpt_kernels as ak
from avpt_kernels.inject import broadcast_prompts, find_adapter
from tests.tiny_models import triton_device

SIZE, PATCH, DIM, DEPTH, HEADS = 32, 8, 64, 2, 2
PIM_KW = dict(num_prompts=4, num_heads=2, head_dim=16, gate_hidden=16)  # fits the Triton limits


def _open_clip(batch_first=True):
    from open_clip.transformer import VisionTransformer

    m = VisionTransformer(image_size=SIZE, patch_size=PATCH, width=DIM, layers=DEPTH, heads=HEADS,
                          mlp_ratio=2.0, output_dim=32)
    m.transformer.batch_first = batch_first  # its Transformer transposes to [T, B, D] itself
    for blk in m.transformer.resblocks:  # and its attention then takes [T, B, D] too
        blk.attn.batch_first = batch_first
    return m


def _timm():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                             num_heads=HEADS, mlp_ratio=2.0, num_classes=5)


def _hf_vit():
    transformers = pytest.importorskip("transformers")
    return transformers.ViTModel(transformers.ViTConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=128,
        image_size=SIZE, patch_size=PATCH))


def _hf_clip():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=128,
        image_size=SIZE, patch_size=PATCH))


# family -> (builder, output of a forward as one tensor, adapter name, batch-first)
FAMILIES = {
    "open_clip": (_open_clip, lambda m, x: m(x), "open_clip", True),
    "open_clip-seq-first": (lambda: _open_clip(False), lambda m, x: m(x), "open_clip", False),
    "timm": (_timm, lambda m, x: m(x), "timm", True),
    "hf-vit": (_hf_vit, lambda m, x: m(pixel_values=x).last_hidden_state, "transformers-vit", True),
    "hf-clip": (_hf_clip, lambda m, x: m(pixel_values=x).pooler_output, "transformers-clip", True),
}


def _images(b=2):
    return torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def _close(a, b, tol=1e-6, what=""):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _loss(out):
    # not out.square().mean(): a LayerNorm'd output (HF last_hidden_state) has a constant one
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return (out * target.to(out.device)).sum()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inject_step_gates_shut_save_load_remove(family, tmp_path):
    build, run, adapter_name, batch_first = FAMILIES[family]
    model = build().eval()
    original = copy.deepcopy(model)
    blocks_before = list(find_adapter(model)[0].blocks(find_adapter(model)[1]))
    keys_before = list(model.state_dict())
    x = _images()
    with torch.no_grad():
        expected = run(original, x)

    assert find_adapter(model)[0].name == adapter_name
    out = ak.inject_pim(model, layers=[0, -1], backend="torch", **PIM_KW)
    assert out is model
    wrapped = [m for m in model.modules() if isinstance(m, ak.PIMBlock)]
    assert [w.layer for w in wrapped] == [0, DEPTH - 1]
    assert all(w.batch_first == batch_first and w.pim.t2p_reduce == "mean" for w in wrapped)
    assert [w.block for w in wrapped] == [blocks_before[0], blocks_before[-1]]
    # nothing frozen that was not asked for
    assert all(p.requires_grad for p in model.parameters())

    # a fresh injection: outputs unchanged (p2t_o = 0)
    with torch.no_grad():
        _close(run(model, x), expected, what=f"{family}: fresh injection")

    # one optimisation step on the added weights changes the outputs ...
    params = dict(model.named_parameters())
    opt = torch.optim.SGD([params[k] for k in ak.pim_state_dict(model)], lr=1.0)
    _loss(run(model, x)).backward()
    opt.step()
    with torch.no_grad():
        stepped = run(model, x)
        assert (stepped - expected).abs().max() > 1e-4, f"{family}: the step changed nothing"
        # ... and with the gates shut they are the original's again
        with ak.pim_gates_shut(model):
            _close(run(model, x), expected, what=f"{family}: gates shut")
        assert not any(w.gates_shut for w in wrapped)  # restored on exit

    # save / load the added weights only
    path = tmp_path / "pim.safetensors"
    state = ak.pim_state_dict(model, path=path)
    assert len(state) == 4 and all(k.endswith((".pim.packed", ".prompts")) for k in state)
    fresh = ak.inject_pim(copy.deepcopy(original), layers=[0, DEPTH - 1], backend="torch", **PIM_KW)
    with torch.no_grad():
        assert (run(fresh, x) - stepped).abs().max() > 1e-4  # differs before loading
        ak.load_pim_state_dict(fresh, path)
        _close(run(fresh, x), stepped, tol=0, what=f"{family}: loaded from file")
        ak.load_pim_state_dict(fresh, state)  # a dict works too

    # remove_pim restores the original blocks, keys and outputs exactly
    assert ak.remove_pim(model) is model
    assert not any(isinstance(m, ak.PIMBlock) for m in model.modules())
    assert list(find_adapter(model)[0].blocks(find_adapter(model)[1])) == blocks_before
    assert list(model.state_dict()) == keys_before
    with torch.no_grad():
        assert torch.equal(run(model, x), expected)


def test_freeze_base_trains_only_the_added_weights():
    model = ak.inject_pim(_timm(), layers=1, freeze_base=True, backend="torch", **PIM_KW)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.1.pim.packed", "blocks.1.prompts"}


def test_model_holding_a_tower_and_layer_selection():
    """The tower is found inside a bigger model (here ``.visual``, as on an open_clip CLIP);
    layers: None = all, negative indices, errors name the argument."""
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = _open_clip()

    holder = ak.inject_pim(Holder(), backend="torch", **PIM_KW)
    assert all(isinstance(b, ak.PIMBlock) for b in holder.visual.transformer.resblocks)
    with pytest.raises(ValueError, match="already has a PIMBlock"):
        ak.inject_pim(holder, layers=[0])
    with pytest.raises(ValueError, match=r"layers: block index 2 is out of range .*\[-2, 2\)"):
        ak.inject_pim(_timm(), layers=[2])
    with pytest.raises(ValueError, match="layers must not repeat"):
        ak.inject_pim(_timm(), layers=[1, -1])
    with pytest.raises(ValueError, match="layers must be"):
        ak.inject_pim(_timm(), layers="first")
    with pytest.raises(ValueError, match="model must be a vision transformer of a known family"):
        ak.inject_pim(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="has no PIMBlock"):
        ak.remove_pim(_timm())
    with pytest.raises(ValueError, match="has no PIMBlock"):
        ak.pim_state_dict(_timm())


def test_load_refuses_a_different_injection(tmp_path):
    a = ak.inject_pim(_timm(), layers=[0], backend="torch", **PIM_KW)
    path = tmp_path / "a.safetensors"
    ak.pim_state_dict(a, path=path)
    with pytest.raises(ValueError, match=r"missing \['blocks.1.pim.packed'"):
        ak.load_pim_state_dict(ak.inject_pim(_timm(), layers=[1], **PIM_KW), path)
    wider = dict(PIM_KW, num_prompts=5)
    with pytest.raises(ValueError, match="was saved with"):
        ak.load_pim_state_dict(ak.inject_pim(_timm(), layers=[0], **wider), path)
    with pytest.raises(ValueError, match="has shape"):
        ak.load_pim_state_dict(ak.inject_pim(_timm(), layers=[0], **wider), ak.pim_state_dict(a))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        ak.load_pim_state_dict(a, tmp_path / "none.safetensors")


# ----------------------------------------------------------------------------------------------
# PIMBlock: Sequential, broadcasting, defaults and init, callable prompts
# ----------------------------------------------------------------------------------------------
class _Block(nn.Module):
    """A stand-in transformer block: tokens in, tokens out."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


def _randomise(blk):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in blk.pim.params():
            w.copy_(torch.randn(w.shape, generator=g) * w.shape[-1] ** -0.5)
    return blk


def test_pim_block_in_sequential_and_prompt_broadcasting():
    blk = _randomise(ak.PIMBlock(_Block(), DIM, backend="torch", **PIM_KW))
    seq = nn.Sequential(blk, _Block())
    z = torch.randn(3, 9, DIM)
    assert seq(z).shape == (3, 9, DIM)
    k_d = blk.prompts.detach()
    want, p_want, _ = blk.interact(z, k_d.unsqueeze(0).repeat(3, 1, 1).contiguous())
    for p in (k_d, k_d.unsqueeze(0)):  # [K, D] and [1, K, D] broadcast over the batch
        got, p_got, _ = blk.interact(z, p)
        assert torch.equal(got, want) and torch.equal(p_got, p_want)
    assert torch.equal(blk(z), blk.block(want))  # forward = own prompts, then the block
    wide = broadcast_prompts(k_d, z)
    assert wide.shape == (3, 4, DIM) and wide.stride(0) == 0  # expand: a view, no copy
    assert wide.data_ptr() == k_d.data_ptr()
    with pytest.raises(ValueError, match=r"prompts must be \[B=3, K, D=64\], \[1, K, 64\]"):
        blk.interact(z, torch.randn(2, 4, DIM))
    with pytest.raises(ValueError, match=r"x must be the block's tokens \[B, T, D\] with D=64"):
        blk(torch.randn(3, 9, 32))
    with pytest.raises(ValueError, match="dim must be the block's token width"):
        ak.PIMBlock(_Block())
    with pytest.raises(ValueError, match="prompts must be 'learned'"):
        ak.PIMBlock(_Block(), DIM, prompts="random")
    with pytest.raises(ValueError, match=r"prompts must be \[K, D\]"):
        ak.PIMBlock(_Block(), DIM, prompts=torch.randn(4, 32))


def test_defaults_match_the_model_and_only_p2t_o_moves_at_step_0():
    blk = ak.PIMBlock(_Block(), DIM)
    m = blk.pim
    assert (m.num_heads, m.head_dim, m.gate_hidden, m.t2p_reduce) == (4, 16, 16, "mean")
    assert blk.prompts.shape == (6, DIM) and blk.prompt_kind == "learned"
    z = torch.randn(2, 9, DIM)
    out = blk(z)
    _close(out, blk.block(z), what="fresh PIMBlock == block")
    _loss(out).backward()
    grads = ak.unpack_weights(m.packed.grad, DIM, 64, 16)
    nonzero = {f for f, g in zip(ak.PIMParams._fields, grads) if g.abs().max() > 0}
    assert nonzero == {"p2t_o_w", "p2t_o_b"}, nonzero  # the gate's input z_hat - z is 0 too
    assert blk.prompts.grad.abs().max() == 0


def test_callable_prompts_module_and_function():
    class FromClassToken(nn.Module):
        """Per-image prompts from the class token: [B, T, D] -> [B, K, D]."""

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(DIM, 3 * DIM)

        def forward(self, z, layer):
            return self.proj(z[:, 0]).view(z.shape[0], 3, DIM)

    source = FromClassToken()
    model = ak.inject_pim(_timm(), layers=[0, 1], prompts=source, backend="torch", **PIM_KW)
    state = ak.pim_state_dict(model)
    # the shared prompt module is saved once, under its first name
    assert sorted(state) == ["blocks.0.pim.packed", "blocks.0.prompt_fn.proj.bias",
                             "blocks.0.prompt_fn.proj.weight", "blocks.1.pim.packed"]
    seen = []

    def fixed(z, layer):
        seen.append((tuple(z.shape), layer))
        return torch.ones(1, 2, DIM)

    model = ak.inject_pim(_open_clip(batch_first=False), layers=[1], prompts=fixed, **PIM_KW)
    model(_images(3))
    assert seen == [((3, 1 + (SIZE // PATCH) ** 2, DIM), 1)]  # batch-first, class token first


# ----------------------------------------------------------------------------------------------
# backends, compile, autocast, launches
# ----------------------------------------------------------------------------------------------
def _trained_timm(backend, device="cpu"):
    model = ak.inject_pim(_timm().eval(), layers=[1], backend=backend, **PIM_KW)
    _randomise(model.blocks[1])
    return model.to(device)


def test_fused_backend_matches_torch():
    """One tiny case on backend='triton' (the Triton interpreter on CPU, CUDA with a GPU): outputs
    and the gradients of the added weights match the torch backend within the fp32 tolerance."""
    device = triton_device("triton")
    x = _images().to(device)
    ref = _trained_timm("torch", device)
    fused = copy.deepcopy(ref)
    fused.blocks[1].pim.backend = "triton"
    results = []
    for model in (ref, fused):
        out = model(x)
        _loss(out).backward()
        blk = model.blocks[1]
        results.append((out.detach(), blk.pim.packed.grad, blk.prompts.grad))
    for a, b, name in zip(*results, ("logits", "d packed", "d prompts")):
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")
    assert results[0][2].abs().max() > 0  # trained weights: the prompts get a gradient


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_matches_eager(backend):
    """The injected model compiles as one graph (aot_eager: dynamo + AOTAutograd, no inductor
    code generation on CPU), forward and backward, and agrees with eager."""
    model = _trained_timm(backend, triton_device(backend))
    x = _images().to(triton_device(backend))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    _close(out, model(x), tol=1e-5, what="compiled")
    _loss(out).backward()
    assert model.blocks[1].pim.packed.grad.abs().max() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_tracks_fp32(backend):
    device = triton_device(backend)
    model = _trained_timm(backend, device)
    x = _images().to(device)
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = model(x)
            with ak.pim_gates_shut(model):
                shut = model(x)
            base = ak.remove_pim(copy.deepcopy(model))(x)
    assert bf16.dtype == base.dtype
    torch.testing.assert_close(bf16.float(), fp32, rtol=5e-2, atol=5e-2 * fp32.abs().max())
    assert (bf16.float() - base.float()).abs().max() > 1e-2  # the PIM acts under autocast
    # gates shut under autocast: the tokens pass through the PIM's bf16 cast only
    torch.testing.assert_close(shut.float(), base.float(), rtol=2e-2, atol=2e-2 * fp32.abs().max())


def _count(model, dense_prompts=False):
    """Forward launches on fake CUDA tensors (benchmarks/launches.py), plus the copies that
    ``Tensor.contiguous()`` makes (the counter takes aten.contiguous, alias-annotated, for a
    view)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks import launches as L
    aten = torch.ops.aten

    class Counter(L.LaunchCounter):
        copies = 0

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            if func is aten.contiguous.default and not args[0].is_contiguous():
                Counter.copies += 1
            return super().__torch_dispatch__(func, types_, args, kwargs)

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    (fm,) = L.fake_copy((model,), mode, "cuda")
    with mode:
        x = torch.randn(2, 3, SIZE, SIZE, device="cuda")
        if dense_prompts:
            for blk in fm.modules():
                if isinstance(blk, ak.PIMBlock):
                    blk.prompts = nn.Parameter(blk.prompts.detach().unsqueeze(0).repeat(2, 1, 1))
        for _ in range(2):  # the first pass warms the launchers' caches
            Counter.copies = 0
            c = Counter("cuda")
            with torch.no_grad(), L._triton_counted(c), c:
                fm(x)
    return dict(c.totals(), copies=Counter.copies)


def test_fused_wrapper_adds_only_the_ops_launches():
    """On the fused path a PIMBlock adds the PIM op's 5 Triton launches and nothing of its own:
    no aten launch, no host sync (fp32, fake CUDA tensors). Learned prompts [K, D] are
    broadcast as a view; the op itself makes them dense (one copy per layer)."""
    base = _timm().eval()
    before = _count(base)
    model = ak.inject_pim(copy.deepcopy(base), layers=[0, 1], backend="triton", **PIM_KW)
    after = _count(model)
    assert after["syncs"] == before["syncs"] == 0
    assert after["triton"] - before["triton"] == 2 * 5
    assert after["aten"] == before["aten"]
    assert after["copies"] - before["copies"] == 2  # the op's p.contiguous() of the broadcast
    dense = _count(model, dense_prompts=True)  # [B, K, D] prompts: not even that
    assert dense["copies"] == before["copies"] and dense["aten"] == before["aten"]


# ----------------------------------------------------------------------------------------------
# the A-VPT model is built on the same API
# ----------------------------------------------------------------------------------------------
def test_avpt_model_uses_pim_blocks():
    """A-VPT's PIMs sit in PIMBlocks (make_pim_blocks) around the frozen backbone's blocks, kept
    beside the backbone: encode_image is untouched, parameter names are as before, gates_shut is
    pim_gates_shut, and with the gates shut the model gives encode_image."""
    from tests.tiny_models import trained_looking_tiny_avpt

    model = trained_looking_tiny_avpt("torch", schedule="hierarchical")
    resblocks = model.visual.transformer.resblocks
    blocks = list(model.pim_blocks)
    assert all(isinstance(b, ak.PIMBlock) and b.prompt_kind == "none" for b in blocks)
    assert [b.layer for b in blocks] == model.layers == list(range(len(resblocks)))
    assert all(b.block is resblocks[i] for b, i in zip(blocks, model.layers))
    assert [list(model.pims).index(b.pim) for b in blocks] == ak.contiguous_stages(len(resblocks), 3)
    assert not any(isinstance(m, ak.PIMBlock) for m in model.backbone.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "pim" in n]
    assert trainable == [f"pims.{g}.packed" for g in range(3)]
    images, maps = torch.randn(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.backbone.encode_image(images)
        assert (model(images, maps).features - expected).abs().max() > 1e-3
        with model.gates_shut():
            assert all(b.gates_shut for b in blocks)
            _close(model(images, maps).features, expected, tol=1e-5, what="A-VPT gates shut")
    assert not any(b.gates_shut for b in blocks)
