"""BiomedAP (issue 15), trained: bf16 autocast forward/loss/backward, the visual-prototype low
anchor (the paper's default: ``prepare`` sets the class means, resume recomputes them), a few
steps with its loss, runs through the trainer and the CLI, and DDP (each rank's own alignment
term, averaged gradients). Its arithmetic against the literal equations: ``test_biomedap.py``."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avpt.methods import base
from avpt.methods.biomedap import BiomedAPOutput

from .test_biomedap import close, tiny


# ---------------------------------------------------------------- AMP, prototypes, training
@pytest.mark.parametrize("mode", ["image-tokens", "code"])
def test_bf16_autocast_forward_loss_backward(mode):
    m = tiny(fusion_input=mode, low_anchor="code").train()
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    masks = (torch.rand(2, 1, 64, 64) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(images.to(torch.bfloat16))
        terms = m.make_loss()(out, labels, masks, None, True)
    assert set(terms) == {"cls", "high", "kl", "low", "align", "seg", "loss"}
    assert all(torch.isfinite(v).all() for v in terms.values())
    terms["loss"].backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_visual_prototypes_low_anchor():
    m = tiny(low_anchor="visual-prototypes", seg=False)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 1, 0])
    out = m(images)
    loss = m.make_loss()
    with pytest.raises(RuntimeError, match="set_visual_prototypes"):
        loss(out, labels, None, None, True)
    feats = m.frozen_image_features(images)
    close(feats, m.backbone.encode_image(images), "frozen features", tol=1e-6)
    with pytest.raises(ValueError, match="class 'malignant lesion' has none in the 4 training images"):
        m.set_visual_prototypes(feats, torch.zeros(4, dtype=torch.long))
    m.set_visual_prototypes(feats, labels)
    fn = F.normalize(feats, dim=-1)
    want = F.normalize(torch.stack([fn[labels == c].mean(0) for c in range(2)]), dim=-1)
    close(m.anchor_low, want, "a_low = prototypes", tol=1e-6)
    terms = loss(out, labels, None, None, True)
    close(terms["low"], (out.text_features - want).abs().mean(), "low", tol=1e-6)


def test_loss_refuses_an_output_without_its_fields():
    m = tiny(seg=False, low_anchor="code")
    out = m(torch.randn(2, 3, 64, 64))
    plain = base.MethodOutput(logits=out.logits, seg_logits=None, features=out.features,
                              pooled=out.pooled, tokens=out.tokens)
    with pytest.raises(TypeError, match="BiomedAPOutput"):
        m.make_loss()(plain, torch.tensor([0, 1]), None, None, True)
    with pytest.raises(ValueError, match="needs out.text_out"):
        m.make_loss()(BiomedAPOutput(**{**vars(out), "text_out": None}), torch.tensor([0, 1]),
                      None, None, True)


def test_a_few_steps_with_its_loss_change_the_prompts():
    # image tokens in: with the code default (zeros in) the gate weight W_gv has no gradient
    m = tiny(seg=False, low_anchor="code", fusion_input="image-tokens").train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0025)
    loss = m.make_loss()
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    masks = None
    ctx0, gate0 = m.context.detach().clone(), m.fusion["2"].side_v.gate.weight.detach().clone()
    for _ in range(2):
        terms = loss(m(images), labels, masks, None, True)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        assert torch.isfinite(terms["loss"])
    assert (m.context - ctx0).abs().max() > 0 and (m.fusion["2"].side_v.gate.weight - gate0).abs().max() > 0


def test_trains_through_the_trainer(tmp_path):
    from avpt.train import run
    from tests.test_train import tiny_cfg

    res = run(tiny_cfg(tmp_path, epochs=1, method="biomedap", sets={"model": {}}))
    assert res["config"]["method"] == "biomedap" and res["test"]["n"] == 6
    assert all(math.isfinite(h["train_loss"]) for h in res["history"])
    if hasattr(base.Method, "make_loss"):   # the trainer hook: the run must use BiomedAP's loss
        for term in ("cls", "high", "kl", "low", "align"):
            assert all(math.isfinite(h[f"train_{term}"]) for h in res["history"]), term


# ---------------------------------------------------------------- the low anchor (the visual-prototype reading)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Items:
    """A training set as ``Method.prepare`` reads it: ``labels`` [N] and items (image, label)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return dict(image=self.images[i], label=torch.tensor(int(self.labels[i])))


def class_means(encode_image, dataset, num_classes):
    """Independently: normalise(mean over the class's images of normalise(open_clip's
    encode_image)) per class -> [C, E]."""
    with torch.no_grad():
        feats = torch.cat([F.normalize(encode_image(dataset[i]["image"][None]).float(), dim=-1)
                           for i in range(len(dataset))])
    labels = torch.as_tensor(dataset.labels)
    return F.normalize(torch.stack([feats[labels.to(feats.device) == c].mean(0)
                                    for c in range(num_classes)]), dim=-1)


def test_code_is_the_default_and_prepare_sets_the_class_means_in_the_prototype_reading():
    assert tiny(seg=False).config.low_anchor == "code"  # the authors' code: class-name text
    m = tiny(seg=False, num_classes=3, class_names=("normal", "benign", "malignant"),
             low_anchor="visual-prototypes").to(DEVICE)
    assert not m.prototypes_ready
    assert torch.equal(m.anchor_low, torch.zeros_like(m.anchor_low))
    g = torch.Generator().manual_seed(1)
    data = Items(torch.randn(7, 3, 64, 64, generator=g).to(DEVICE), [2, 0, 1, 1, 0, 2, 2])
    m.prepare(data, DEVICE, batch_size=3)   # batches of 3, 3, 1
    want = class_means(m.backbone.encode_image, data, 3)
    assert m.prototypes_ready and m.anchor_low.device == want.device
    close(m.anchor_low, want, "a_low = normalised class means", tol=1e-5)
    close(m.anchor_low.norm(dim=-1), torch.ones(3, device=DEVICE), "unit anchors", tol=1e-6)
    a = m.anchor_low.clone()
    m.prepare(data, DEVICE, batch_size=64)   # one batch: the same anchors
    close(m.anchor_low, a, "batch size independent", tol=1e-6)
    # persistent: in the state dict; loading it makes another model's prototypes ready
    state = m.state_dict()
    assert torch.equal(state["anchor_low"], m.anchor_low)
    other = tiny(seg=False, num_classes=3, class_names=("normal", "benign", "malignant"),
                 low_anchor="visual-prototypes").to(DEVICE)
    other.load_state_dict(state)
    assert other.prototypes_ready and torch.equal(other.anchor_low, m.anchor_low)
    out = other(data.images[:2])
    terms = other.make_loss()(out, torch.tensor([2, 0], device=DEVICE), None, None, True)
    close(terms["low"], (out.text_features - m.anchor_low).abs().mean(), "low", tol=1e-6)


def test_prepare_names_a_class_without_training_images():
    m = tiny(seg=False, num_classes=3, class_names=("normal", "benign", "malignant"),
             low_anchor="visual-prototypes")
    data = Items(torch.randn(3, 3, 64, 64), [0, 2, 0])
    with pytest.raises(ValueError, match="class 'benign' has none") as err:
        m.prepare(data, "cpu")
    assert "\n" not in str(err.value) and not m.prototypes_ready
    items = [data[i] for i in range(len(data))]   # a plain sequence (no labels): after the pass
    with pytest.raises(ValueError, match="class 'benign' has none in the 3 training images"):
        m.prepare(items, "cpu")


def test_code_anchor_ignores_prepare():
    m = tiny(seg=False, low_anchor="code")
    text = m.anchor_low.clone()
    assert m.prototypes_ready
    m.prepare(Items(torch.randn(2, 3, 64, 64), [0, 0]), "cpu")   # no class-1 image: not needed
    assert torch.equal(m.anchor_low, text)


@pytest.mark.cpu_only  # pinned to --device cpu / device=cpu: not in the GPU tier
def test_trainer_prepares_prototype_anchors_and_resume_recomputes_them(tmp_path, monkeypatch):
    """Fresh run stopped after epoch 1, then resumed: ``prepare`` runs at both starts, on the
    un-augmented training set, and gives the same anchors = the independent class means."""
    from avpt.methods.biomedap import BiomedAP
    from avpt.train import run
    from tests.test_train import tiny_cfg

    seen = []
    prepare = BiomedAP.prepare

    def recording(self, train_set, device, dtype=None, batch_size=64):
        prepare(self, train_set, device, dtype, batch_size)
        seen.append((self, train_set, self.anchor_low.detach().clone()))
    monkeypatch.setattr(BiomedAP, "prepare", recording)
    model_sets = {"low_anchor": "visual-prototypes"}
    cfg = dict(epochs=2, method="biomedap", sets={"model": model_sets}, device="cpu")
    assert run(tiny_cfg(tmp_path, stop_after_epoch=1, **cfg)) == {"stopped_after_epoch": 1}
    res = run(tiny_cfg(tmp_path, **cfg))
    assert len(seen) == 2 and res["config"]["model"] == model_sets
    (model, train_set, fresh), (_, again, resumed) = seen
    assert not train_set.train and len(train_set) == res["data"]["train_samples"]
    assert torch.equal(fresh, resumed)
    close(fresh, class_means(model.backbone.encode_image, again, 2), "trainer a_low", tol=1e-5)
    assert all(math.isfinite(h["train_low"]) for h in res["history"])


TINY_CLI = ["--dataset", "phantom", "--backbone", "tiny", "--device", "cpu", "--epochs", "1",
            "--set", "data.num_patients=3", "--set", "data.views=1", "--set", "batch_size=4",
            "--set", "eval_batch_size=8", "--set", "progress=false", "--set", "threads=1",
            "--set", "report=false"]


@pytest.mark.cpu_only  # pinned to --device cpu / device=cpu: not in the GPU tier
@pytest.mark.parametrize("anchor", ["visual-prototypes", "code"])
def test_cli_train_end_to_end(tmp_path, anchor):
    import json

    from avpt.cli import main

    extra = [] if anchor == "code" else ["--set", f"model.low_anchor={anchor}"]
    assert main(["train", "--method", "biomedap", *TINY_CLI, "--out", str(tmp_path), *extra]) == 0
    res = json.load(open(tmp_path / "metrics.json"))
    assert res["config"]["method"] == "biomedap" and res["test"]["n"] > 0
    assert all(math.isfinite(h["train_low"]) and math.isfinite(h["train_loss"])
               for h in res["history"])
    saved = json.load(open(tmp_path / "model" / "avpt_config.json"))["config"]
    assert saved["low_anchor"] == anchor
    if anchor == "visual-prototypes":   # the saved model evaluates to the run's numbers (anchors: loss only)
        assert main(["eval", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "ev"),
                     "--device", "cpu"]) == 0
        again = json.load(open(tmp_path / "ev" / "metrics.json"))["test"]
        assert all(again[k] == res["test"][k] for k in ("auc", "f1", "dice", "n"))


# ---------------------------------------------------------------- DDP (extended: ~1 min on CPU)
def _ddp_step_module(method):
    class Step(nn.Module):   # what the trainer's TrainStep does: forward and loss in one module
        def __init__(self):
            super().__init__()
            self.m, self.loss = method, method.make_loss()

        def forward(self, x, y):
            return self.loss(self.m(x), y, None, None, True)
    return Step()


def _ddp_fresh():
    torch.manual_seed(0)
    return tiny(seg=False, fusion_dropout=0.0, low_anchor="code").double()


def _ddp_worker(rank, world, port, x, y):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        m = _ddp_fresh()
        ddp = nn.parallel.DistributedDataParallel(_ddp_step_module(m), find_unused_parameters=True)
        shard = slice(2 * rank, 2 * rank + 2)
        terms = ddp(x[shard], y[shard])
        terms["loss"].backward()
        alone = _ddp_step_module(_ddp_fresh())(x[shard], y[shard])
        assert float(terms["align"]) > 0.01, "alignment term vanished under DDP"
        close(terms["align"], alone["align"], "this rank's alignment term")
        grads = []
        for r in range(world):
            g = _ddp_fresh()
            _ddp_step_module(g)(x[2 * r:2 * r + 2], y[2 * r:2 * r + 2])["loss"].backward()
            grads.append(dict(g.named_parameters()))
        for n, p in m.named_parameters():
            if p.requires_grad:
                close(p.grad, (grads[0][n].grad + grads[1][n].grad) / 2, f"DDP grad {n}")
    finally:
        dist.destroy_process_group()


@pytest.mark.extended
def test_ddp_alignment_is_each_ranks_own_and_gradients_average():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x, y = torch.randn(4, 3, 64, 64, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, x, y), nprocs=2)
