"""A-VPT model: backbone loading, the drop-in guarantee (gates shut == encode_image), schedules,
region sources, torch vs fp64 and torch vs triton backends, rollout, bad input, ViT-B/16."""
import copy
import warnings

import pytest
import torch

import avpt_kernels as ak
from avpt import backbone as bb
from avpt.data.tissue_priors import tissue_prior_maps
from avpt.methods.avpt.rollout import relevance, rollout
from avpt.methods import build_method
from avpt.methods.avpt import SCHEDULES, injection_plan
from avpt_kernels.testing import assert_close
from tests.tiny_models import train_gates

TINY = bb.TINY_MODEL
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_avpt(**overrides):
    """The tiny A-VPT on backend='torch' (the triton backend is exercised explicitly below; under
    the CPU interpreter it is slow, and 'auto' would pick it up as soon as the kernels land)."""
    overrides.setdefault("backend", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        return build_method("avpt", model_name=TINY, **overrides)


def inputs(b=2, size=64, regions=3):
    return torch.randn(b, 3, size, size), torch.rand(b, regions, size, size)


# ----------------------------------------------------------------------------------------------
# backbone
# ----------------------------------------------------------------------------------------------
def test_tiny_config_registered_and_frozen():
    model = tiny_avpt()
    visual = model.visual
    assert visual.image_size == (64, 64) and visual.grid_size == (4, 4)
    assert visual.conv1.out_channels == 64 and len(visual.transformer.resblocks) == 4
    assert all(not p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert not model.backbone.training and model.training


def test_random_weights_warn_once_and_pretrained_must_be_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setattr(bb, "_warned_random", False)
    with pytest.warns(bb.RandomWeightsWarning, match="meaningless"):
        bb.load_backbone(TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bb.RandomWeightsWarning)
        bb.load_backbone(TINY)  # one warning per process, not one per model
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        bb.load_backbone(TINY, pretrained="openai")
    with pytest.raises(ValueError, match="open_clip config"):
        bb.load_backbone("no-such-model")


def test_pretrained_weights_load_from_local_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = bb.load_backbone(TINY)
    with torch.no_grad():
        source.visual.class_embedding.add_(1.0)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = bb.load_backbone(TINY, pretrained=str(path))
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(not p.requires_grad for p in loaded.parameters())


# ----------------------------------------------------------------------------------------------
# the drop-in guarantee
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gates_shut_reproduce_encode_image(schedule):
    model = train_gates(tiny_avpt(schedule=schedule))
    images, maps = inputs()
    expected = model.backbone.encode_image(images)
    with model.gates_shut():
        shut = model(images, maps)
    assert_close(shut.features, expected, torch.float32, "features (gates shut)")
    with torch.no_grad(), model.gates_shut():  # the MHA fast path on both sides
        assert_close(model(images, maps).features, model.backbone.encode_image(images),
                     torch.float32, "features (gates shut, no_grad)")
    # the same model with its gates open does change the features: the check can fail
    opened = model(images, maps).features
    assert (opened - expected).abs().max() > 1e-3


def test_gate_shut_config_flag():
    model = train_gates(tiny_avpt(gate_shut=True))
    images, maps = inputs()
    assert_close(model(images, maps).features, model.backbone.encode_image(images), torch.float32)


def test_new_model_starts_at_the_backbone():
    """p2t_o starts at zero, so an untrained A-VPT equals the frozen backbone (gates open)."""
    model = tiny_avpt()
    images, maps = inputs()
    assert_close(model(images, maps).features, model.backbone.encode_image(images), torch.float32)


# ----------------------------------------------------------------------------------------------
# schedules, region sources, outputs
# ----------------------------------------------------------------------------------------------
def test_injection_plan_table8_on_12_layers():
    assert injection_plan("early", 12) == ([0, 1, 2, 3], [0] * 4, [0] * 4)
    assert injection_plan("middle", 12)[0] == [4, 5, 6, 7]
    assert injection_plan("late", 12)[0] == [8, 9, 10, 11]
    layers, bank, group = injection_plan("all", 12)
    assert layers == list(range(12)) and bank == [0] * 12 and group == [0] * 4 + [1] * 4 + [2] * 4
    layers, bank, group = injection_plan("hierarchical", 12)
    assert bank == group == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(ValueError, match="schedule"):
        injection_plan("deep", 12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_forward_backward_every_schedule(schedule):
    model = train_gates(tiny_avpt(schedule=schedule))
    images, maps = inputs()
    out = model(images, maps, return_attn=True)
    n_inj = len(model.layers)
    assert out.logits.shape == (2, 2) and out.seg_logits.shape == (2, 1, 64, 64)
    assert out.prompts.shape == (n_inj, 2, 6, 64) and out.region_emb.shape == (2, 3, 64)
    assert len(out.attn) == n_inj and out.attn[0].shape == (2, 4, 6, 17)
    (out.logits.sum() + out.seg_logits.mean()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith("contrast_proj"):
            assert p.grad is not None, name
        if not p.requires_grad:
            assert p.grad is None, name


def test_hierarchical_carries_refined_prompts():
    """Hierarchical differs from 'all' with the same weights only through the carried prompts and
    the stage-specific maps; zeroing the t2p output makes the carry vanish."""
    model = train_gates(tiny_avpt(schedule="hierarchical"))
    images, maps = inputs()
    with_carry = model(images, maps).features
    with torch.no_grad():
        for m in model.pims:
            m.params().t2p_o_w.zero_()
            m.params().t2p_o_b.zero_()
    no_carry = model(images, maps).features
    model.config.schedule = "all"  # same weights, no carry
    assert_close(model(images, maps).features, no_carry, torch.float32)
    assert (with_carry - no_carry).abs().max() > 1e-4


@pytest.mark.parametrize("source", ["prior", "learned"])
def test_region_sources_without_given_maps(source):
    model = train_gates(tiny_avpt(region_source=source))
    images, _ = inputs()
    out = model(images, modality=["MG", "US"])
    assert out.maps.shape[:2] == (2, 3) and out.maps.min() >= 0 and out.maps.max() <= 1
    out.logits.sum().backward()
    if source == "learned":
        assert model.extractor.head.weight.grad is not None
        assert model.extractor.head.weight.grad.abs().sum() > 0


def test_tissue_priors_follow_the_physics():
    """A bright disc in a darker body on a black background: glandular in MG (dense tissue is
    bright), fatty in MRI T1 (fat is bright)."""
    img = torch.zeros(1, 3, 64, 64)
    img[:, :, 4:60, 4:60] = 0.4
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2) < 15 ** 2
    img[:, :, disc] = 0.9
    body = torch.zeros(64, 64, dtype=torch.bool)
    body[8:56, 8:56] = True
    ring = body & (((yy - 32) ** 2 + (xx - 32) ** 2) > 19 ** 2)  # body, away from the edges
    mg = tissue_prior_maps(img, "MG")[0]
    mri = tissue_prior_maps(img, "MRI")[0]
    assert mg.shape == (3, 64, 64) and mg.dtype == torch.float32
    gland, fat = 0, 1
    # MG: the bright disc is glandular, the darker body fatty
    assert mg[gland][disc].mean() > 0.4 > mg[fat][disc].mean()
    assert mg[fat][ring].mean() > 0.4 > mg[gland][ring].mean()
    # MRI T1: fat is bright
    assert mri[fat][disc].mean() > 0.8 and mri[fat][ring].mean() < 0.2
    assert mri[gland][ring].mean() > 0.4 > mri[gland][disc].mean()
    with pytest.raises(ValueError, match="modality"):
        tissue_prior_maps(img, "CT")


def test_rollout_relevance_map():
    model = train_gates(tiny_avpt())
    images, maps = inputs()
    rel = relevance(model, images, maps)
    assert rel.shape == (2, 64, 64) and rel.min() >= 0 and rel.max() <= 1
    # min-max normalised on the patch grid, then bilinearly up-sampled (which blurs the extremes)
    assert (rel.amax(dim=(1, 2)) > 0.9).all() and (rel.amin(dim=(1, 2)) < 0.1).all()
    # gamma = 0: the product of identities -> uniform relevance over patches (min-max -> zeros)
    out = model(images, maps, return_attn=True)
    eye = rollout(out.attn, gamma=0.0)
    assert torch.allclose(eye, torch.eye(17).expand(2, 17, 17))
    rows = rollout(out.attn, gamma=1.0).sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_names_what_was_expected():
    model = tiny_avpt()
    images, maps = inputs()
    with pytest.raises(ValueError, match=r"64x64.*\[B, 3, 64, 64\]"):
        model(torch.randn(2, 3, 32, 32), maps)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 1, 64, 64), maps)
    with pytest.raises(ValueError, match="images must be"):
        model(torch.randn(3, 64, 64), maps)
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), maps)
    with pytest.raises(ValueError, match="maps is required with region_source='given'"):
        model(images)
    with pytest.raises(ValueError, match="does not match the image"):
        model(images, torch.rand(2, 3, 50, 50))
    with pytest.raises(ValueError, match="does not match the image"):
        model(images, torch.rand(2, 3, 64, 32))
    with pytest.raises(ValueError, match=r"maps must be \[2, 3, 64, 64\]"):
        model(images, torch.rand(2, 4, 64, 64))
    with pytest.raises(ValueError, match="maps"):
        model(images, maps * 3)  # outside [0, 1]
    with pytest.raises(ValueError, match="region_source='learned'"):
        tiny_avpt(region_source="learned")(images, maps)
    with pytest.raises(ValueError, match="multiple of num_regions"):
        tiny_avpt(num_prompts=5)


# ----------------------------------------------------------------------------------------------
# backends: torch vs fp64, torch vs triton
# ----------------------------------------------------------------------------------------------
def _run(model, images, maps):
    model.zero_grad(set_to_none=True)
    out = model(images, maps)
    loss = out.logits.square().sum() + out.seg_logits.square().mean() + out.features.square().sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _compare(actual_model, expected_model, images, maps, tag):
    # Inputs follow each model's device (and the expected model's dtype); assert_close compares
    # on the CPU in fp64, so the two models may live on different devices.
    device_a = next(actual_model.parameters()).device
    out_a, grads_a = _run(actual_model, images.to(device_a), maps.to(device_a))
    param_e = next(expected_model.parameters())
    out_e, grads_e = _run(expected_model, images.to(device=param_e.device, dtype=param_e.dtype),
                          maps.to(device=param_e.device, dtype=param_e.dtype))
    for field in ("features", "logits", "seg_logits", "prompts", "region_emb"):
        assert_close(getattr(out_a, field), getattr(out_e, field), torch.float32, f"{tag} {field}")
    for name, g in grads_a.items():
        if name.endswith(("t2p_k.bias", "p2t_k.bias")):  # exactly zero (softmax shift invariance)
            continue
        if grads_e[name] is None:
            assert g is None, name
            continue
        assert_close(g, grads_e[name], torch.float32, f"{tag} grad {name}")


# op name -> the module class that runs it
OPS = {"region_pool": ak.RegionPool, "prompt_bank": ak.LowRankPromptBank,
       "pim": ak.PromptTokenInteraction}


@pytest.mark.parametrize("which", ["region_pool", "prompt_bank", "pim", "all"])
def test_triton_backend_matches_torch(which, monkeypatch):
    """The same model with the op(s) on backend='triton' (on CUDA when a GPU is present, else the
    interpreter on CPU) gives the same outputs and gradients as on backend='torch': both are
    checked against the fp64 evaluation of the model under the fp32 tolerance (two fp32 roundings
    compared with each other would need twice the tolerance)."""
    names = list(OPS) if which == "all" else [which]
    model = train_gates(tiny_avpt(backend="torch"))
    reference = copy.deepcopy(model).double()
    images, maps = inputs()
    _compare(model, reference, images, maps, "torch vs fp64")
    # With a GPU the triton model runs on CUDA, where cuDNN convolutions (the patch embedding)
    # default to TF32 (~1e-3 relative error, far beyond the fp32 tolerance): keep full fp32
    # (cuBLAS matmuls are full fp32 by default already).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    triton_model = copy.deepcopy(model).to(DEVICE)  # _compare moves the inputs to DEVICE
    for module in triton_model.modules():
        if any(isinstance(module, OPS[n]) for n in names):
            module.backend = "triton"
    _compare(triton_model, reference, images, maps, f"triton[{which}] vs fp64")


# ----------------------------------------------------------------------------------------------
# ViT-B/16
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vitb16_avpt():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        return build_method("avpt", backend="torch")


def test_vitb16_forward_batch1_and_gate_shut(vitb16_avpt):
    model = vitb16_avpt
    torch.manual_seed(0)
    images, maps = torch.randn(1, 3, 224, 224), torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        out = model(images, maps)
        with model.gates_shut():
            shut = model(images, maps).features
        expected = model.backbone.encode_image(images)
    assert out.features.shape == (1, 512) and out.logits.shape == (1, 2)
    assert out.prompts.shape == (12, 1, 6, 768) and out.seg_logits.shape == (1, 1, 224, 224)
    assert_close(shut, expected, torch.float32, "ViT-B/16 features (gates shut)")


def test_vitb16_default_avpt_within_parameter_budget(vitb16_avpt):
    from avpt.methods.avpt import BUDGET_PERCENT
    from avpt.params import format_reports, parameter_report

    report = parameter_report(vitb16_avpt)
    assert report.visual == 86_192_640
    assert report.trainable == sum(report.breakdown.values())
    assert report.percent_of_visual <= BUDGET_PERCENT, format_reports([report])
    assert set(report.breakdown) == {"head", "seg_decoder", "anatomy_mlp", "prompt_bank", "pims",
                                     "contrast_proj"}
