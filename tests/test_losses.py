"""A-VPT losses: each term against an independent computation, the memory queues, the EMA region
types, the switches of Eq. 17, and gradients reaching the trainable parts."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from avpt import backbone as bb
from avpt.losses import cls_loss, method_loss, seg_loss
from avpt.methods.avpt.loss import (AVPTLoss, EMACentroids, RegionQueue, lap_loss, rcl_loss,
                                    token_laplacian, txt_loss)
from avpt.methods import build_method


def tiny(name="avpt", **overrides):
    overrides.setdefault("backend", "torch") if name == "avpt" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        return build_method(name, model_name=bb.TINY_MODEL, **overrides)


def test_cls_loss_is_cross_entropy():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    expected = -torch.log_softmax(logits, -1)[torch.arange(4), labels].mean()
    assert torch.allclose(cls_loss(logits, labels), expected)


def test_seg_loss_dice_plus_bce():
    logits = torch.randn(2, 1, 8, 8)
    masks = (torch.rand(2, 1, 8, 8) > 0.5).float()
    p = torch.sigmoid(logits)
    dice = [1 - (2 * (p[i] * masks[i]).sum() + 1) / (p[i].sum() + masks[i].sum() + 1) for i in range(2)]
    bce = -(masks * torch.log(p) + (1 - masks) * torch.log(1 - p)).mean()
    expected = torch.stack(dice).mean() + 0.5 * bce
    assert torch.allclose(seg_loss(logits, masks, bce_weight=0.5), expected, atol=1e-6)
    perfect = seg_loss(masks * 40 - 20, masks)  # saturated, correct logits
    assert perfect < 1e-6
    with pytest.raises(ValueError, match="masks must have shape"):
        seg_loss(logits, masks[:, :, :4])


def _rcl_brute(r, types, modality, tau, q_emb=None, q_types=None, q_mod=None):
    b, n_reg, _ = r.shape
    losses = []
    for i in range(b):
        for k in range(n_reg):
            anchor = r[i, k]
            num, den = [], []
            for j in range(b):
                for t in range(n_reg):
                    if (i, k) == (j, t):
                        continue
                    s = torch.exp(anchor @ r[j, t] / tau)
                    if types[j, t] == types[i, k] and j != i:
                        num.append(s)
                        den.append(s)
                    elif types[j, t] != types[i, k]:
                        den.append(s)
            if q_emb is not None:
                for n, (e, qt) in enumerate(zip(q_emb, q_types)):
                    if qt < 0:
                        continue
                    s = torch.exp(anchor @ e / tau)
                    if qt != types[i, k]:
                        den.append(s)
                    elif q_mod is not None and q_mod[n] != modality[i]:  # cross-modal positive
                        num.append(s)
                        den.append(s)
            if num:
                losses.append(-torch.log(sum(num) / sum(den)))
    return torch.stack(losses).mean()


def test_rcl_loss_matches_brute_force_with_queue():
    r = F.normalize(torch.randn(3, 3, 8, dtype=torch.float64), dim=-1)
    types = torch.tensor([[0, 1, 2], [0, 1, 2], [2, 1, 1]])
    modality = torch.tensor([0, 1, 2])
    q_emb = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    q_types = torch.tensor([0, 1, 2, 2, 0])
    got = rcl_loss(r, types, modality, 0.5)
    assert torch.allclose(got, _rcl_brute(r, types, modality, 0.5), atol=1e-10)
    got_q = rcl_loss(r, types, modality, 0.5, q_emb, q_types)
    assert torch.allclose(got_q, _rcl_brute(r, types, modality, 0.5, q_emb, q_types), atol=1e-10)
    assert got_q > got  # extra negatives only add to the denominator


def test_rcl_cross_modal_queue_positives_match_brute_force():
    """Eq. 12 as the paper intends: a queue entry of the same region type from another
    modality is a positive (same type, same modality: neither; empty slots: ignored)."""
    torch.manual_seed(1)
    r = F.normalize(torch.randn(2, 3, 8, dtype=torch.float64), dim=-1)
    types = torch.tensor([[0, 1, 2], [0, 1, 2]])
    modality = torch.tensor([1, 1])                       # one single-modality (US) batch
    q_emb = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    q_types = torch.tensor([0, 1, 2, 0, 2, -1])
    q_mod = torch.tensor([0, 0, 0, 1, 2, 0])               # MG, MG, MG, US, MRI, (empty)
    cross = rcl_loss(r, types, modality, 0.5, q_emb, q_types, queue_modality=q_mod)
    want = _rcl_brute(r, types, modality, 0.5, q_emb, q_types, q_mod)
    assert torch.allclose(cross, want, atol=1e-10)
    within = rcl_loss(r, types, modality, 0.5, q_emb, q_types, queue_modality=q_mod,
                      positives="within_modality")
    assert torch.allclose(within, _rcl_brute(r, types, modality, 0.5, q_emb, q_types), atol=1e-10)
    assert not torch.allclose(cross, within)             # the cross-modal positives count
    # an anchor whose only positives are cross-modal now contributes (a one-image batch)
    alone = rcl_loss(r[:1], types[:1], modality[:1], 0.5, q_emb, q_types, queue_modality=q_mod)
    assert alone > 0
    assert rcl_loss(r[:1], types[:1], modality[:1], 0.5, q_emb, q_types, queue_modality=q_mod,
                    positives="within_modality") == 0
    with pytest.raises(ValueError, match="positives must be one of"):
        rcl_loss(r, types, modality, positives="both")


def test_training_batches_see_cross_modal_positives_from_the_queues():
    """Single-modality batches (MG, then US) through AVPTLoss: after the MG batch went into
    the queues, the US batch's RCL has cross-modal positives, which change the loss."""
    model = tiny(queue_size=16, lambda_txt=0.0)
    images, maps, labels, masks, _ = _batch(model)
    mg, us = (torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
    losses = {}
    for mode in ("cross_modal", "within_modality"):
        torch.manual_seed(0)
        loss_fn = AVPTLoss(model, rcl_positives=mode)
        with torch.no_grad():
            loss_fn(model(images, maps), labels=labels, modality=mg, update_state=True)
            out = model(images.flip(0), maps.flip(0))
            # the queue slots a US anchor treats as positives: same type, other modality, filled
            q_types, q_mod = loss_fn.queue.types.reshape(-1), loss_fn.queue.slot_modality()
            assert ((q_types == 0) & (q_mod == 0)).sum() == 4  # MG region-type-0 entries
            losses[mode] = loss_fn(out, labels=labels, modality=us)["rcl"]
    assert not torch.allclose(losses["cross_modal"], losses["within_modality"])
    with pytest.raises(ValueError, match="rcl_positives"):
        AVPTLoss(model, rcl_positives="both")


def test_rcl_without_positives_is_zero_with_graph():
    r = F.normalize(torch.randn(1, 3, 8), dim=-1).requires_grad_()
    loss = rcl_loss(r, torch.tensor([[0, 1, 2]]), torch.tensor([0]))
    assert loss.item() == 0.0
    loss.backward()
    assert r.grad is not None


def test_region_queue_is_per_modality_fifo():
    q = RegionQueue(num_modalities=3, size=4, dim=2)
    assert q.entries()[0].shape == (0, 2)
    r = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    q.push(r, torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([1, 1]))  # 6 entries, keeps 4
    # the last 4 of the 6 entries (types 2, 0, 1, 2) remain; modality 0 is still empty
    assert sorted(q.types[1].tolist()) == [0, 1, 2, 2] and (q.types[0] == -1).all()
    assert {tuple(e.tolist()) for e in q.emb[1]} == {(4.0, 5.0), (6.0, 7.0), (8.0, 9.0), (10.0, 11.0)}
    q.push(r[:1], torch.tensor([[2, 2, 2]]), torch.tensor([0]))
    emb, types = q.entries()
    assert emb.shape == (7, 2) and (types == 2).sum() == 3 + 2


def test_ema_centroids_assign_and_update():
    c = EMACentroids(num_types=3, dim=3, momentum=0.5)
    r = F.normalize(torch.eye(3).expand(2, 3, 3) + 0.01, dim=-1)
    assert c.assign(r).tolist() == [[0, 1, 2], [0, 1, 2]]  # atlas order before init
    c.update(r, c.assign(r))
    swapped = r[:, [2, 0, 1]]
    assert c.assign(swapped).tolist() == [[2, 0, 1], [2, 0, 1]]
    before = c.centroids.clone()
    c.update(swapped, c.assign(swapped))
    assert torch.allclose(c.centroids, before, atol=1e-6)  # same points: EMA keeps them
    assert torch.allclose(c.centroids.norm(dim=-1), torch.ones(3))


def test_txt_loss_is_clip_style_cross_entropy():
    t = F.normalize(torch.randn(2, 3, 8), dim=-1)
    text = F.normalize(torch.randn(3, 8), dim=-1)
    types = torch.tensor([[0, 1, 2], [0, 1, 2]])
    logits = torch.einsum("brd,cd->brc", t, text) / 0.07
    expected = -torch.log_softmax(logits, -1).gather(-1, types[..., None]).mean()
    assert torch.allclose(txt_loss(t, text, types, 0.07), expected, atol=1e-6)


def test_lap_loss_is_weighted_squared_differences():
    adjacency = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    m = 2
    lap = token_laplacian(adjacency, m)
    assert torch.allclose(lap.sum(-1), torch.zeros(6))
    prompts = torch.randn(2, 3, 6, 5, dtype=torch.float64)  # [L, B, K, D]
    region = torch.arange(6) // m
    expected = torch.zeros((), dtype=torch.float64)
    for a in range(6):
        for b in range(6):
            if a == b:
                continue
            w = 1.0 if region[a] == region[b] else float(adjacency[region[a], region[b]])
            expected = expected + 0.5 * w * (prompts[:, :, a] - prompts[:, :, b]).square().sum(-1).mean()
    assert torch.allclose(lap_loss(prompts, adjacency, m), expected / 5, atol=1e-10)
    per_image = adjacency.expand(3, 3, 3)
    assert torch.allclose(lap_loss(prompts, per_image, m), expected / 5, atol=1e-10)
    same = torch.ones(2, 3, 6, 5)
    assert lap_loss(same, adjacency, m).abs() < 1e-7  # identical prompts: nothing to smooth


def _batch(model, b=4):
    images = torch.randn(b, 3, 64, 64)
    maps = torch.rand(b, 3, 64, 64)
    labels = torch.tensor([0, 1] * (b // 2))
    masks = (torch.rand(b, 1, 64, 64) > 0.5).float()
    return images, maps, labels, masks, ["MG", "US", "MRI", "US"][:b]


def test_avpt_loss_weights_terms_and_trains_every_part():
    model = tiny(queue_size=16)
    loss_fn = AVPTLoss(model)
    images, maps, labels, masks, modality = _batch(model)
    out = model(images, maps)
    terms = loss_fn(out, labels=labels, masks=masks, modality=modality, update_state=True)
    assert set(terms) == {"cls", "seg", "rcl", "txt", "lap", "loss"}
    c = model.config
    expected = terms["cls"] + c.lambda_seg * terms["seg"] + c.lambda_rcl * terms["rcl"] + \
        c.lambda_txt * terms["txt"] + c.lambda_lap * terms["lap"]
    assert torch.allclose(terms["loss"], expected)
    terms["loss"].backward()
    for part in ("anatomy_mlp", "prompt_bank", "contrast_proj", "head", "seg_decoder"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part)]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), part
        assert any(g.abs().sum() > 0 for g in grads), part
    assert (loss_fn.queue.types >= 0).sum() == 12  # 4 images x 3 regions went into the queues
    # the queue now adds negatives: the same batch gives a larger RCL
    again = loss_fn(model(images, maps), labels=labels, masks=masks, modality=modality)
    assert again["rcl"] > terms["rcl"]


@pytest.mark.parametrize("off", ["lambda_seg", "lambda_rcl", "lambda_txt", "lambda_lap"])
def test_each_term_switches_off(off):
    model = tiny(**{off: 0.0})
    loss_fn = AVPTLoss(model)
    images, maps, labels, masks, modality = _batch(model)
    terms = loss_fn(model(images, maps), labels=labels, masks=masks, modality=modality)
    name = off.split("_")[1]
    assert name not in terms and "cls" in terms
    if off == "lambda_txt":
        assert loss_fn.text.numel() == 0  # the text tower is not even run


def test_ema_region_types_and_text_vectors():
    model = tiny(region_types="ema")
    loss_fn = AVPTLoss(model)
    assert loss_fn.text.shape == (3, 32)
    assert torch.allclose(loss_fn.text.norm(dim=-1), torch.ones(3), atol=1e-5)
    images, maps, labels, masks, modality = _batch(model)
    loss_fn(model(images, maps), labels=labels, modality=modality, update_state=True)
    assert bool(loss_fn.centroids.initialized)
    with pytest.raises(ValueError, match="region_types"):
        AVPTLoss(tiny(region_types="kmeans", lambda_txt=0.0))


def test_method_loss_for_baselines():
    model = tiny("linear")
    images, _, labels, masks, _ = _batch(model)
    out = model(images)
    terms = method_loss(model, out, labels=labels, masks=masks)
    assert torch.allclose(terms["loss"], terms["cls"] + terms["seg"])
    with pytest.raises(ValueError, match="labels"):
        method_loss(model, out)


def test_txt_class_phrases_are_encoded_on_the_models_device():
    """The trainer builds the loss after moving the model (``model.to(device)``, then
    ``make_loss``): the TXT term's phrase tokens must go to the backbone's device. Checked on fake
    CUDA tensors (no GPU needed), where an op on tensors of two devices raises as on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.launch_counter import fake_copy

    model = tiny()
    assert model.config.lambda_txt > 0
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    (fake,) = fake_copy((model,), mode, "cuda")
    with mode:
        loss = fake.make_loss()
    assert loss.text.device.type == "cuda"
    assert loss.text.shape[0] == len(model.config.text_phrases)
