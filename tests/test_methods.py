"""Every method by name on the tiny backbone: forward and backward, what trains and what stays
frozen, identity at initialisation where the method promises it, the trainable-state save/load
round trip onto a fresh backbone, and parameter accounting."""
import re
import warnings

import pytest
import torch

from avpt import backbone as bb
from avpt.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_trainable, save_trainable
from avpt.methods import build_method, get_config_class, method_names
from avpt.params import format_reports, parameter_report
from avpt_kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METHODS = ["linear", "full", "vpt", "lora", "adapter", "coop", "avpt", "cilmp", "biomedap"]
# which parameter-name prefixes may train for each method (heads are shared by all)
TRAINABLE = {
    "linear": ("head.", "seg_decoder."),
    "full": ("head.", "seg_decoder.", "backbone.visual."),
    "vpt": ("head.", "seg_decoder.", "prompts"),
    "lora": ("head.", "seg_decoder.", "backbone.visual.transformer.resblocks."),
    "adapter": ("head.", "seg_decoder.", "attn_adapters.", "mlp_adapters."),
    "coop": ("seg_decoder.", "context"),
    "biomedap": ("seg_decoder.", "context", "fusion."),
    "cilmp": ("seg_decoder.", "visual_prompts", "text_context", "prefix.", "suffix.", "A", "B"),
    "avpt": ("head.", "seg_decoder.", "anatomy_mlp.", "prompt_bank.", "pims.", "contrast_proj."),
}


LOSS_ONLY = re.compile(r"^fusion\..*\.(attn_t|side_t|t_back)\.")


def tiny(name, **overrides):
    if name == "avpt":
        overrides.setdefault("backend", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        return build_method(name, model_name=bb.TINY_MODEL, **overrides)


def run(method, images, maps):
    return method(images, method.forward_maps({"image": images, "maps": maps}))


def test_registry_lists_every_method():
    assert set(method_names()) == set(METHODS)
    with pytest.raises(ValueError, match="unknown method 'prefix'"):
        build_method("prefix")


@pytest.mark.parametrize("name", METHODS)
def test_forward_backward_and_frozen_parts(name):
    """On CUDA when a GPU is present (A-VPT then with the Triton kernels), else on the CPU."""
    kernels = {"backend": "triton"} if name == "avpt" and DEVICE == "cuda" else {}
    method = tiny(name, **kernels).to(DEVICE)
    images, maps = torch.randn(2, 3, 64, 64, device=DEVICE), torch.rand(2, 3, 64, 64, device=DEVICE)
    out = run(method, images, maps)
    assert out.logits.shape == (2, 2) and out.seg_logits.shape == (2, 1, 64, 64)
    assert out.features.shape == (2, 32) and out.tokens.shape == (2, 16, 64)
    (out.logits.square().sum() + out.seg_logits.mean() + out.features.square().sum()).backward()
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in method.named_parameters():
        if p.requires_grad:
            assert n.startswith(TRAINABLE[name]), f"{name}: {n} should be frozen"
            # used by a loss only: A-VPT's RCL projector, BiomedAP's text half of the fusion
            if not (n.startswith("contrast_proj.") or LOSS_ONLY.search(n)):
                assert p.grad is not None, f"{name}: no gradient for {n}"
        else:
            assert p.grad is None, f"{name}: frozen {n} got a gradient"
    # the text tower never trains
    assert not any(n.startswith("backbone.") and not n.startswith("backbone.visual.")
                   for n in trainable)
    if name == "lora":
        assert all(".lora_" in n for n in trainable if n.startswith("backbone."))


def unmodified_backbone(method):
    """A fresh open_clip model holding the method's backbone weights without its changes (LoRA
    wraps the attention modules in place, so its own encode_image is not a reference)."""
    fresh = bb.load_backbone(bb.TINY_MODEL)
    state = {k.replace(".attn.mha.", ".attn."): v for k, v in method.backbone.state_dict().items()
             if ".lora_" not in k}
    fresh.load_state_dict(state)
    return fresh


@pytest.mark.parametrize("name", ["linear", "full", "lora", "adapter", "coop"])
def test_identity_at_initialisation(name):
    """LoRA (B = 0) and adapters (up = 0) start as the frozen backbone; probes reuse it as is."""
    method = tiny(name)
    images = torch.randn(2, 3, 64, 64)
    expected = unmodified_backbone(method).encode_image(images)
    assert_close(method(images).features, expected, torch.float32)


def test_lora_and_adapter_change_features_once_trained():
    images = torch.randn(2, 3, 64, 64)
    for name, prefix in (("lora", "lora_B"), ("adapter", ".up.")):
        method = tiny(name)
        with torch.no_grad():
            for n, p in method.named_parameters():
                if prefix in n:
                    p.normal_(std=0.1)
        diff = (method(images).features - unmodified_backbone(method).encode_image(images)).abs().max()
        assert diff > 1e-3, name


def test_vpt_replaces_prompts_at_every_layer():
    method = tiny("vpt", num_prompts=3)
    images = torch.randn(1, 3, 64, 64)
    base = method(images).features
    with torch.no_grad():
        method.prompts[-1].add_(torch.randn_like(method.prompts[-1]))  # last layer's alone
    assert (method(images).features - base).abs().max() > 1e-4
    assert method.prompts.shape == (4, 3, 64)


def test_coop_logits_are_scaled_cosines_with_learned_context():
    method = tiny("coop", class_names=("benign", "malignant"))
    images = torch.randn(2, 3, 64, 64)
    out = method(images)
    text = method.text_features()
    feats = torch.nn.functional.normalize(method.backbone.encode_image(images), dim=-1)
    assert_close(out.logits, method.backbone.logit_scale.exp() * feats @ text.t(), torch.float32)
    with torch.no_grad():
        method.context.add_(torch.randn_like(method.context))
    assert (method.text_features() - text).abs().max() > 1e-4
    with pytest.raises(ValueError, match="class_names"):
        tiny("coop", num_classes=3)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A local tiny open_clip checkpoint, so a fresh backbone has the same frozen weights."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bb.load_backbone(bb.TINY_MODEL).state_dict().items()},
              str(path))
    return str(path)


@pytest.mark.parametrize("name", METHODS)
def test_save_load_trainable_round_trip(name, tmp_path, tiny_weights):
    from safetensors.torch import load_file

    method = tiny(name, pretrained=tiny_weights)
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    path = save_trainable(method, tmp_path / name)
    saved = load_file(str(path / WEIGHTS_FILE))
    assert set(saved) == {n for n, p in method.named_parameters() if p.requires_grad}
    if name != "full":  # PEFT-style: only the small trainable state is written
        backbone_size = sum(p.numel() for p in method.backbone.parameters())
        assert sum(t.numel() for t in saved.values()) < backbone_size / 2
    loaded = load_trainable(path)
    assert type(loaded) is type(method) and loaded.config == method.config
    images, maps = torch.randn(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    method.eval(), loaded.eval()  # CILMP's knowledge dropout is random in training mode
    a, b = run(method, images, maps), run(loaded, images, maps)
    assert_close(b.logits, a.logits, torch.float32, f"{name} logits")
    assert_close(b.seg_logits, a.seg_logits, torch.float32, f"{name} seg")
    assert_close(b.features, a.features, torch.float32, f"{name} features")


def test_load_rejects_mismatched_state(tmp_path):
    method = tiny("vpt")
    path = save_trainable(method, tmp_path / "vpt")
    cfg = (path / CONFIG_FILE).read_text().replace('"num_prompts": 10', '"num_prompts": 4')
    (path / CONFIG_FILE).write_text(cfg)
    with pytest.raises(ValueError, match="prompts"):
        load_trainable(path)
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_trainable(tmp_path / "nowhere")


def test_config_round_trips_through_dict():
    cls = get_config_class("avpt")
    cfg = cls(schedule="late", text_phrases=("a", "b", "c"))
    assert cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        cls.from_dict({"bogus": 1})


def test_parameter_report_counts():
    reports = {n: parameter_report(tiny(n)) for n in ("linear", "full", "avpt")}
    visual = reports["linear"].visual
    assert visual == sum(p.numel() for p in tiny("linear").visual.parameters())
    heads = reports["linear"].trainable
    assert reports["full"].trainable == visual + heads
    assert reports["full"].percent_of_visual == pytest.approx(100.0 * (visual + heads) / visual)
    assert reports["avpt"].trainable == sum(reports["avpt"].breakdown.values())
    text = format_reports(list(reports.values()))
    assert "avpt" in text and "% of visual" in text and "pims" in text


def test_forward_maps_and_make_loss_are_asked_of_the_method():
    """The hooks: only A-VPT with region_source="given" takes the batch's maps; every method's
    ``make_loss`` gives a module whose terms add up to "loss" (A-VPT's: Eq. 17, the others'
    CLS + SEG), and options a method does not use are ignored."""
    from avpt.losses import MethodLoss
    from avpt.methods.avpt import AVPTLoss
    from avpt.methods.biomedap import BiomedAPLoss

    own_loss = {"avpt": AVPTLoss, "biomedap": BiomedAPLoss}
    images, maps = torch.randn(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    labels, masks = torch.tensor([0, 1]), (torch.rand(2, 1, 64, 64) > 0.5).float()
    batch = {"image": images, "maps": maps}
    for name in METHODS:
        method = tiny(name)
        method.prepare([dict(image=i, label=y) for i, y in zip(images, labels)], "cpu")
        loss_fn = method.make_loss(rcl_positives="within_modality")
        assert isinstance(loss_fn, own_loss.get(name, MethodLoss)), name
        given = method.forward_maps(batch)
        assert given is (maps if name == "avpt" else None), name
        terms = loss_fn(method(images, given), labels, masks, torch.tensor([0, 1]),
                        update_state=True)
        assert {"cls", "seg", "loss"} <= set(terms), name
    assert tiny("avpt", region_source="prior").forward_maps(batch) is None


def test_a_method_registered_elsewhere_is_built_and_trained_by_name():
    """A method module needs only ``@register``: ``build_method`` finds it, and the trainer's step
    (``TrainStep`` with ``make_loss``) runs it with the default hooks."""
    from dataclasses import dataclass

    from avpt.methods import MethodConfig, get_method_class, register
    from avpt.methods import base
    from avpt.methods.base import Method, frozen_encode
    from avpt.engine import TrainStep

    @dataclass
    class ProbeConfig(MethodConfig):
        pass

    @register("test-probe")
    class Probe(Method):
        config_class = ProbeConfig

        def encode(self, images, maps=None, modality=None, return_attn=False):
            return frozen_encode(self, images)

    try:
        assert get_method_class("test-probe") is Probe and "test-probe" in method_names()
        method = tiny("test-probe")
        batch = dict(image=torch.randn(2, 3, 64, 64), maps=torch.rand(2, 3, 64, 64),
                     label=torch.tensor([0, 1]), mask=torch.zeros(2, 1, 64, 64),
                     modality=torch.tensor([0, 0]))
        terms = TrainStep(method, method.make_loss())(batch)
        terms["loss"].backward()
        assert method.head.fc.weight.grad is not None
    finally:
        base._REGISTRY.pop("test-probe", None)


def test_avpt_pim_blocks_are_registered_but_not_saved_twice():
    """A-VPT's PIMBlocks are submodules (no module hidden in a list), yet state_dict() keeps the
    keys it had (each tensor once, under its owner: safetensors needs that) and a state dict
    without them loads strictly, into the shared tensors."""
    method, fresh = tiny("avpt"), tiny("avpt")
    blocks = list(method.pim_blocks)
    assert blocks and all(any(b is m for m in method.modules()) for b in blocks)
    keys = list(method.state_dict())
    assert not [k for k in keys if k.startswith("pim_blocks.")]
    params, buffers = dict(method.named_parameters()), dict(method.named_buffers())
    assert set(params) <= set(keys) <= set(params) | set(buffers)  # each tensor once
    with torch.no_grad():
        for p in method.pims.parameters():
            p.add_(1.0)
    fresh.load_state_dict(method.state_dict(), strict=True)
    for a, b in zip(method.pims.parameters(), fresh.pims.parameters()):
        assert torch.equal(a, b)
    assert all(b.pim is fresh.pims[g] for b, g in zip(fresh.pim_blocks, fresh.group))


def test_no_behaviour_is_chosen_by_comparing_method_names():
    """What differs between methods is asked of the method object (issue 12)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "avpt"
    found = [f"{path.relative_to(root)}:{i}" for path in root.rglob("*.py")
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"""[!=]= *["']avpt["']""", line)]
    assert not found, found



def test_vpt_prompt_dropout_in_training_only():
    """Official VPT: dropout 0.1 on the prompt tokens while training, none in eval."""
    method = tiny("vpt", num_prompts=3)
    assert method.config.prompt_dropout == 0.1 and method.prompt_dropout.p == 0.1
    images = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    a, b = method.train()(images).features, method(images).features
    assert (a - b).abs().max() > 1e-4                      # random masks on the prompts
    ev = method.eval()(images).features
    assert torch.equal(ev, method(images).features)
    plain = tiny("vpt", num_prompts=3, prompt_dropout=0.0)
    plain.load_state_dict(method.state_dict())
    assert_close(plain.train()(images).features, ev, torch.float32)   # eval = no dropout


def test_coop_context_starts_from_a_photo_of_a_or_random():
    import open_clip

    method = tiny("coop")
    assert method.config.context_init == "a photo of a" and method.config.num_context == 4
    tokens = open_clip.get_tokenizer(bb.TINY_MODEL)(["a photo of a"])
    with torch.no_grad():
        words = method.backbone.token_embedding(tokens)[0, 1:5]
    assert torch.equal(method.context.detach(), words)
    rand = tiny("coop", num_context=16, context_init="")
    assert rand.context.shape == (16, words.shape[-1]) and rand.context.std() < 0.05
    with pytest.raises(ValueError, match="context_init='a photo' is 2 tokens; num_context=4"):
        tiny("coop", context_init="a photo")


@pytest.mark.parametrize("name,target,fields", [
    ("vpt", 2.1, {"num_prompts": 192}),
    ("lora", 2.8, {"rank": 33, "alpha": 33.0, "targets": ("q", "k", "v", "o")}),
    ("adapter", 3.6, {"bottleneck": 83})])
def test_table10_presets_give_the_papers_shares_on_vit_b16(name, target, fields):
    """Table 10's trainable shares of ViT-B/16's visual tower (random weights: counting only)."""
    method = build_method(name, preset="table10")   # ViT-B-16, the default backbone
    assert {k: getattr(method.config, k) for k in fields} == fields
    assert abs(parameter_report(method).percent_of_visual - target) < 0.1
    kept = get_config_class(name)(preset="table10", seg_hidden=16)
    assert kept.seg_hidden == 16 and get_config_class(name).from_dict(kept.to_dict()) == kept
    with pytest.raises(ValueError, match="preset must be one of"):
        get_config_class(name)(preset="table9")


@pytest.mark.parametrize("name", method_names())
def test_training_forward_and_loss_keep_to_the_models_device(name):
    """Every method's ``prepare``, training forward and loss on a model moved to CUDA, as the
    trainer runs them (model, then loss ``.to(device)``), on fake tensors: no GPU needed, and an
    op on tensors of two devices raises as on a GPU, so a tensor made on the CPU inside a method
    or its loss (A-VPT's TXT phrases once were) fails here. (Without a GPU torch disables CUDA
    autocast, so this runs in fp32.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.launch_counter import fake_copy

    # BiomedAP's paper anchor reads label values in prepare (which fake tensors do not have):
    # its code anchor here, the paper anchor's prepare in tests/test_biomedap.py
    overrides = {"avpt": dict(backend="auto"), "biomedap": dict(low_anchor="code")}
    method = tiny(name, **overrides.get(name, {}))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    (fake,) = fake_copy((method,), mode, "cuda")
    size = fake.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    with mode:
        images = torch.randn(2, 3, *size, device="cuda")
        maps = torch.rand(2, 3, *size, device="cuda")
        labels = torch.tensor([0, 1], device="cuda")
        masks = (torch.rand(2, 1, *size, device="cuda") > 0.5).float()
        fake.prepare([dict(image=images[i], label=labels[i]) for i in range(2)], "cuda")
        loss_fn = fake.make_loss().to("cuda")
        fake.train()
        out = fake(images, maps=fake.forward_maps({"image": images, "maps": maps}))
        terms = loss_fn(out, labels, masks, torch.tensor([0, 1], device="cuda"), True)
        assert terms["loss"].device.type == "cuda"
