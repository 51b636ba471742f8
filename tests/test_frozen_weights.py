"""Frozen backbone weights stored in bf16 (``avpt.frozen_weights``): under bf16 autocast the
stored-bf16 model is bit-identical to the fp32-weight model that autocast re-casts, outputs and
the trainable parameters' gradients, for every method on the same code path; only the frozen
projection weights of the visual tower are cast; the checkpoint fingerprint does not change;
the fp32 weights come back exactly; nothing happens for fp32/fp16 runs or on the CPU unless
asked.

Run on the CPU with CPU autocast (bf16), which casts ``linear``/``conv2d``/``matmul`` operands
as CUDA autocast does. One difference from CUDA: ``torch.is_autocast_enabled()`` (what
``nn.MultiheadAttention`` asks before its fused inference fast path) reports CUDA autocast only,
so on the CPU a frozen backbone (eval mode, tokens without grad) would take the fast path in
fp32, which on CUDA autocast itself rules out. The tests therefore turn the fast path off, so
that both models run ``F.multi_head_attention_forward`` as on the GPU.
"""
import copy
import warnings

import pytest
import torch

from avpt import backbone as bb
from avpt.checkpoint import frozen_fingerprint
from avpt.frozen_weights import castable_parameters, restore_frozen_weights, store_frozen_weights
from avpt.losses import method_loss
from avpt.methods import build_method

BF16 = torch.bfloat16
METHODS = ("linear", "vpt", "lora", "adapter", "avpt", "full", "cilmp", "biomedap", "coop")


@pytest.fixture(autouse=True)
def no_mha_fast_path():
    """What CUDA autocast does to nn.MultiheadAttention (module docstring)."""
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(prev)


def _tiny(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        kw = {"backend": "torch", "queue_size": 16} if name == "avpt" else {}
        model = build_method(name, model_name=bb.TINY_MODEL, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking: no zero-initialised branch hides a difference
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g),
            torch.tensor([0, 1]), (torch.rand(2, 1, 64, 64, generator=g) > 0.5).float())


def _forward(model, images, maps):
    return model(images.to(BF16), maps=model.forward_maps({"maps": maps}))


def _outputs(out):
    return {k: v for k, v in vars(out).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", METHODS)
def test_stored_bf16_weights_are_bit_identical_to_autocast_recasting(name):
    ref = _tiny(name)
    cast = copy.deepcopy(ref)
    n = store_frozen_weights(cast, BF16, "cpu", force=True)
    assert (n == 0) == (name == "full")  # full fine-tuning: no frozen weight
    images, maps, labels, masks = _batch()
    # training forward + loss + backward (autocast around forward and loss, as the trainer)
    grads = []
    for model in (ref, cast):
        model.train()
        torch.manual_seed(3)  # the same dropout draws (VPT's prompt dropout) for both
        with torch.autocast("cpu", dtype=BF16):
            out = _forward(model, images, maps)
            loss = method_loss(model, out, labels, masks)["loss"]
        params = [p for p in model.parameters() if p.requires_grad]
        grads.append((_outputs(out), loss, torch.autograd.grad(loss, params, allow_unused=True)))
    (o_ref, l_ref, g_ref), (o_cast, l_cast, g_cast) = grads
    assert o_ref.keys() == o_cast.keys()
    for k in o_ref:
        assert o_ref[k].dtype == o_cast[k].dtype and torch.equal(o_ref[k], o_cast[k]), k
    assert torch.equal(l_ref, l_cast)
    assert sum(g is not None for g in g_ref) > 0
    for a, b in zip(g_ref, g_cast):
        assert (a is None) == (b is None)  # A-VPT's RCL/TXT heads take no CLS+SEG gradient
        assert a is None or (a.dtype == b.dtype == torch.float32 and torch.equal(a, b))
    # inference (eval, no grad), the path the graphed evaluation captures
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        a, b = (_outputs(_forward(m.eval(), images, maps)) for m in (ref, cast))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if n:  # the check can fail: bf16 weights rounded toward zero instead of to nearest
        truncated = copy.deepcopy(cast)
        w = truncated.visual.transformer.resblocks[0].mlp.c_fc.weight
        with torch.no_grad():
            w.copy_(_truncate_to_bf16(ref.visual.transformer.resblocks[0].mlp.c_fc.weight))
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
            c = _outputs(_forward(truncated.eval(), images, maps))
        assert not torch.equal(a["features"], c["features"])


def _truncate_to_bf16(w):
    """fp32 -> bf16 by dropping the low 16 bits (round toward zero), not autocast's rounding."""
    bits = w.detach().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(BF16)


def test_only_the_frozen_projection_weights_of_the_visual_tower_are_cast():
    model = _tiny("avpt")
    store_frozen_weights(model, BF16, "cpu", force=True)
    visual = model.visual
    blk = visual.transformer.resblocks[0]
    bf16 = [visual.conv1.weight, blk.attn.in_proj_weight, blk.attn.in_proj_bias,
            blk.attn.out_proj.weight, blk.attn.out_proj.bias, blk.mlp.c_fc.weight,
            blk.mlp.c_proj.bias]
    assert all(p.dtype == BF16 and not p.requires_grad for p in bf16)
    fp32 = [visual.ln_pre.weight, blk.ln_1.weight, blk.ln_2.bias, visual.ln_post.weight,
            visual.class_embedding, visual.positional_embedding, visual.proj]
    assert all(p.dtype == torch.float32 for p in fp32)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    text = [p for n, p in model.named_parameters() if not n.startswith("backbone.visual.")]
    assert text and all(p.dtype == torch.float32 for p in text)
    cast = {n for n, p in model.named_parameters() if p.dtype == BF16}
    assert len(cast) == 1 + 8 * len(visual.transformer.resblocks)


def test_lora_keeps_the_weights_it_merges_in_fp32():
    model = _tiny("lora")
    store_frozen_weights(model, BF16, "cpu", force=True)
    blk = model.visual.transformer.resblocks[0]
    assert blk.attn.mha.in_proj_weight.dtype == torch.float32  # W + B A summed in fp32
    assert blk.attn.mha.out_proj.weight.dtype == torch.float32
    assert blk.mlp.c_fc.weight.dtype == BF16


def test_fingerprint_is_taken_as_before_and_restore_is_exact():
    model = _tiny("vpt")
    before = frozen_fingerprint(model)
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert store_frozen_weights(model, BF16, "cpu", force=True) > 0
    assert frozen_fingerprint(model) == before
    assert restore_frozen_weights(model) > 0
    for n, p in model.named_parameters():
        assert p.dtype == fp32[n].dtype and torch.equal(p, fp32[n]), n
    assert frozen_fingerprint(model) == before
    # and the fingerprint still tells weights apart
    with torch.no_grad():
        model.visual.conv1.weight[0, 0, 0, 0] += 1.0
    assert frozen_fingerprint(model) != before


@pytest.mark.parametrize("dtype,device,force", [(None, "cuda", False), (torch.float16, "cuda", False),
                                                (BF16, "cpu", False)])
def test_nothing_is_cast_for_fp32_fp16_or_cpu_runs(dtype, device, force):
    model = _tiny("linear")
    assert store_frozen_weights(model, dtype, device, force) == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_run_with_the_gpu_paths_forced_on_cpu_is_the_plain_run(tmp_path, monkeypatch):
    """A tiny bf16-autocast training run with both GPU paths switched on on the CPU (frozen
    weights stored in bf16, evaluation through GraphedInference with the replay stand-in of
    tests/test_graphed.py) gives the plain run's test metrics and trainable weights bit for
    bit, records the same frozen fingerprint, writes its report (fp32 weights restored), and
    ``avpt eval`` of it (the same two paths) gives the same metrics again."""
    import json

    import avpt.train as train
    from avpt import graphed
    from tests.test_graphed import ReplayByRerun
    from tests.test_train import _trainable, tiny_cfg

    sets = {"report": "true", "tensorboard": "false"}
    plain = train.run(tiny_cfg(tmp_path / "plain", epochs=1, amp="bf16",
                               sets=dict(sets, report="false")))
    cast_counts, replay = [], ReplayByRerun()

    def forced(model, dtype, device, force=False):
        cast_counts.append(store_frozen_weights(model, dtype, device, force=True))
        return cast_counts[-1]

    monkeypatch.setattr(train, "store_frozen_weights", forced)
    monkeypatch.setattr(graphed, "graphs_available", lambda device: None)
    monkeypatch.setattr(graphed, "cuda_graph_capture", replay)
    cfg = tiny_cfg(tmp_path / "cast", epochs=1, amp="bf16", sets=sets)
    cast = train.run(cfg)
    assert cast_counts == [1 + 8 * 4] and replay.captures >= 2 and replay.replays >= 2
    assert cast["test"] == plain["test"]
    a, b = _trainable(tmp_path / "plain"), _trainable(tmp_path / "cast")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sha = [json.load(open(tmp_path / d / "model" / "avpt_config.json"))["backbone"]["frozen_sha256"]
           for d in ("plain", "cast")]
    assert sha[0] == sha[1]
    assert (tmp_path / "cast" / "report.html").exists()
    from avpt.saved_eval import evaluate_checkpoint

    again = evaluate_checkpoint(str(tmp_path / "cast" / "model"),
                                      dict(cfg, out=str(tmp_path / "eval")))
    assert cast_counts[-1] == 1 + 8 * 4 and again["test"] == plain["test"]


def test_the_cast_keeps_each_parameter_object():
    """Stored in place (``param.data``, as ``Module.to(dtype)``): whoever holds a frozen
    Parameter (a wrapper, DDP) sees the bf16 values, and restore gives the same object back."""
    model = _tiny("linear")
    w = model.visual.transformer.resblocks[0].attn.in_proj_weight
    store_frozen_weights(model, BF16, "cpu", force=True)
    assert model.visual.transformer.resblocks[0].attn.in_proj_weight is w and w.dtype == BF16
    assert not w.requires_grad and isinstance(w, torch.nn.Parameter)
    restore_frozen_weights(model)
    assert model.visual.transformer.resblocks[0].attn.in_proj_weight is w
    assert w.dtype == torch.float32


@pytest.mark.parametrize("name", ("linear", "vpt", "lora", "adapter", "avpt", "full"))
def test_under_cuda_autocast_the_stored_weights_are_not_cast_again(name):
    """CUDA autocast's own cast policy, on fake CUDA tensors (no GPU: FakeTensorMode, and
    ``benchmarks.launch_counter.autocast_for`` enters CUDA autocast without a device): a
    training forward of the stored-bf16 model gives outputs of the fp32-weight model's dtypes
    and shapes, with exactly one cast fewer per stored tensor (each is read once a forward).
    (The CILMP, BiomedAP and CoOp forwards launch Triton kernels, which fake tensors do not run
    outside the launch counter's own harness; their bit-identity is checked above.)"""
    import collections

    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.launch_counter import LaunchCounter, autocast_for, fake_copy

    ref = _tiny(name)
    cast = copy.deepcopy(ref)
    n = store_frozen_weights(cast, BF16, "cuda")  # a CUDA run: no force needed
    assert (n == 0) == (name == "full")
    seen = []
    for model in (ref, cast):
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        (fake,) = fake_copy((model,), mode, "cuda")
        with mode:
            images = torch.randn(2, 3, 64, 64, device="cuda")
            maps = torch.rand(2, 3, 64, 64, device="cuda")
            counter = LaunchCounter("cuda")
            fake.train()
            with counter, autocast_for("cuda", BF16):
                out = fake(images.to(BF16), maps=fake.forward_maps({"maps": maps}))
        casts = sum(k for (_, op), k in counter.ops.items() if op == "aten._to_copy.default")
        seen.append((casts, {k: (v.dtype, v.shape) for k, v in _outputs(out).items()}))
    assert seen[0][1] == seen[1][1]
    assert seen[0][0] - seen[1][0] == n
