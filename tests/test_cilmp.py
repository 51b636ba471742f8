"""CILMP: the trainable part against a literal fp64 re-implementation of the equations of issue 15
(outputs and every gradient to 1e-10, gradcheck), the rank-r path against the literal one,
R = W_s = b_s = 0 gives e = B A h, the cut text tower, the parameter count, the knowledge
states, the epoch averaging, AMP, the errors, and training on the phantom and 3-class BUSI."""
import math
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avpt import vit
from avpt.backbone import TINY_MODEL
from avpt.methods import build_method
from avpt.methods.cilmp import CILMP, PromptAveraging, project_knowledge

pytestmark = pytest.mark.filterwarnings("ignore::avpt.backbone.RandomWeightsWarning")

# variable knowledge lengths, a width other than the text width (32), asymmetric prefix/suffix
LENGTHS = {"normal": 4, "benign": 5, "malignant": 3}
NAMES = tuple(LENGTHS)
D_K = 24
SMALL = dict(model_name=TINY_MODEL, seg=False, num_classes=3, class_names=NAMES, prefix_length=2,
             suffix_length=1, rank=3, phi_dropout=0.0)


def write_knowledge(folder, lengths=LENGTHS, width=D_K):
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for name, n in lengths.items():
        save_file({"states": torch.randn(n, width, generator=g)}, str(folder / f"{name}.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    folder = write_knowledge(tmp_path_factory.mktemp("knowledge"))
    m = build_method("cilmp", knowledge_dir=folder, **SMALL).double()
    with torch.no_grad():  # non-trivial biases everywhere
        for p in m.parameters():
            if p.requires_grad and p.dim() <= 2:
                p.add_(torch.randn_like(p) * 0.1)
    return m


# ----------------------------------------------------------------------------------------------
# The literal re-implementation: one image, one class, one token, one layer at a time.
def ref_knowledge_token(m, layer, v, c, t):
    h, n = m.knowledge[c, t], LENGTHS[NAMES[c]]
    side = m.prefix if t < m.config.prefix_length else (
        m.suffix if t >= n - m.config.suffix_length else None)
    x = h
    if side is not None:
        u = side.W_a[layer] @ v + side.b_a[layer]
        g = side.W_b[layer] @ u + side.b_b[layer]                 # g(v)
        s = side.W_s[layer] @ torch.cat([h, g * h]) + side.b_s[layer]
        R = side.R[layer]
        x = h + R @ (s - R.t() @ h)                              # Phi (dropout off)
    return m.B[layer] @ (m.A[layer] @ x)


def ref_image_features(m, images):
    """Prompts appended after the patch tokens (the reference code's place), block 0's through
    ln_pre with the rest; ln_post(class token) @ proj."""
    visual, P = m.visual, m.visual_prompts
    b, k = images.shape[0], P.shape[1]
    x = vit.patch_embed(visual, images)
    x = torch.cat([visual.class_embedding.expand(b, 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_pre(torch.cat([x, P[0].expand(b, -1, -1)], 1))
    for layer in range(len(visual.transformer.resblocks)):
        if layer:
            x = torch.cat([x[:, :-k], P[layer].expand(b, -1, -1)], 1)
        x = vit.block(visual, layer, x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def ref_logits(m, images):
    clip, K = m.backbone, m.config.text_context
    tok = open_clip.get_tokenizer(TINY_MODEL)
    v = F.normalize(ref_image_features(m, images), dim=-1)
    logits = torch.empty(len(images), len(NAMES), dtype=v.dtype)
    for b in range(len(images)):
        for c, name in enumerate(NAMES):
            n = LENGTHS[name]
            ids = tok([" ".join(["X"] * K + ["H"] * n) + f" {name}."])[0]
            x = clip.token_embedding(ids)
            for layer, block in enumerate(clip.transformer.resblocks):
                e = torch.stack([ref_knowledge_token(m, layer, v[b], c, t) for t in range(n)])
                x = torch.cat([x[:1], m.text_context[layer], e, x[1 + K + n:]])
                if layer == 0:
                    x = x + clip.positional_embedding
                x = block(x[None], attn_mask=clip.attn_mask)[0]
            f = clip.ln_final(x)[ids.argmax()] @ clip.text_projection
            logits[b, c] = clip.logit_scale.exp() * F.cosine_similarity(v[b], f, dim=0)
    return logits


def _grads(m, logits, weights):
    m.zero_grad()
    (logits * weights).sum().backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fast", [True, False])
def test_matches_the_literal_equations_outputs_and_all_gradients(small, fast):
    m = small.train()  # dropout is 0: train mode picks the literal path, eval the fast one
    m.config.fast_path = fast
    m.eval() if fast else m.train()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    weights = torch.randn(2, 3, dtype=torch.float64)
    got = m(images).logits
    g_got = _grads(m, got, weights)
    want = ref_logits(m, images)
    g_want = _grads(m, want, weights)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert len(g_want) == 18 and all(g.abs().max() > 0 for g in g_want.values())
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n], rtol=0, atol=1e-10, msg=n)
    m.config.fast_path = True


def test_matches_the_literal_equations_with_dropout_on_fixed_masks(small, monkeypatch):
    """Phi dropout on (p = 0.5, training): the dropout masks are fixed (drawn from seeded
    generators and recorded), and the literal equations with those masks applied to Phi give
    the same logits and gradients (fp64, 1e-10)."""
    m = small.train()
    m.config.phi_dropout = 0.5
    masks = []
    real_dropout = F.dropout

    def fixed_dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return real_dropout(x, p, training, inplace)
        g = torch.Generator().manual_seed(100 + len(masks))
        masks.append((torch.rand(x.shape, generator=g) >= p).to(x.dtype) / (1 - p))
        return x * masks[-1]
    try:
        monkeypatch.setattr(F, "dropout", fixed_dropout)
        images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        weights = torch.randn(2, 3, dtype=torch.float64)
        got = m(images).logits
        g_got = _grads(m, got, weights)
        assert len(masks) == 2   # one Phi per side: prefix [L, B, C, P, d_k], suffix [L, B, C, S, d_k]
        prefix_mask, suffix_mask = masks
        b_now = {}

        def masked_token(mm, layer, v, c, t):
            n, P, S = LENGTHS[NAMES[c]], mm.config.prefix_length, mm.config.suffix_length
            b = b_now["b"]
            mask = prefix_mask[layer, b, c, t] if t < P else (
                suffix_mask[layer, b, c, t - (n - S)] if t >= n - S else None)
            h = mm.knowledge[c, t]
            x = h
            if mask is not None:
                side = mm.prefix if t < P else mm.suffix
                u = side.W_a[layer] @ v + side.b_a[layer]
                g = side.W_b[layer] @ u + side.b_b[layer]
                s = side.W_s[layer] @ torch.cat([h, g * h]) + side.b_s[layer]
                R = side.R[layer]
                x = (h + R @ (s - R.t() @ h)) * mask                  # Dropout(Phi), fixed mask
            return mm.B[layer] @ (mm.A[layer] @ x)

        want = torch.empty_like(got)
        for b in range(2):   # ref_logits one image at a time, so the token knows its image
            b_now["b"] = b
            monkeypatch.setattr(sys.modules[__name__], "ref_knowledge_token", masked_token)
            want[b] = ref_logits(m, images[b:b + 1])[0]
        g_want = _grads(m, want, weights)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        assert all(bool((mk == 0).any()) for mk in masks)   # the masks do drop entries
        for n in g_want:
            torch.testing.assert_close(g_got[n], g_want[n], rtol=0, atol=1e-10, msg=n)
    finally:
        m.config.phi_dropout = 0.0


class _Prompts(nn.Module):
    def __init__(self, m, fast):
        super().__init__()
        self.m, self.fast = m, fast

    def forward(self, v):
        return self.m.knowledge_prompts(v, self.fast)


@pytest.mark.parametrize("fast", [True, False])
def test_gradcheck_knowledge_prompts(tmp_path, fast):
    folder = write_knowledge(tmp_path, {"normal": 4, "benign": 3, "malignant": 3}, width=5)
    m = build_method("cilmp", knowledge_dir=folder, **dict(SMALL, rank=2)).double().eval()
    wrap = _Prompts(m, fast)
    names = ["m.prefix.W_s", "m.prefix.W_b", "m.suffix.R", "m.suffix.b_b", "m.A", "m.B"]
    params = dict(wrap.named_parameters())

    def f(v, *values):
        return torch.func.functional_call(wrap, dict(zip(names, values)), (v,))

    v = F.normalize(torch.randn(2, 32, dtype=torch.float64), dim=-1).requires_grad_()
    inputs = (v,) + tuple(params[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


def test_fast_path_equals_literal_and_zero_intervention_gives_BAh(small):
    m = small.eval()
    v = F.normalize(torch.randn(3, 32, dtype=torch.float64), dim=-1)
    fast, literal = m.knowledge_prompts(v, fast=True), m.knowledge_prompts(v, fast=False)
    mask = m.knowledge_mask[None, None, :, :, None]
    torch.testing.assert_close(fast * mask, literal * mask, rtol=0, atol=1e-12)
    bah = torch.einsum("lwr,lrd,ctd->lct w".replace(" ", ""), m.B, m.A, m.knowledge)
    assert (literal - bah[:, None]).abs().max() > 1e-3       # the intervention acts ...
    saved = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for side in (m.prefix, m.suffix):
            side.R.zero_(), side.W_s.zero_(), side.b_s.zero_()
    try:
        for path in (True, False):                        # ... and with R = W_s = b_s = 0 is gone
            e = m.knowledge_prompts(v, fast=path)
            torch.testing.assert_close(e, bah[:, None].expand_as(e), rtol=0, atol=1e-12)
    finally:
        m.load_state_dict(saved, strict=False)
    x = torch.randn(7, D_K, dtype=torch.float64)
    torch.testing.assert_close(project_knowledge(x, m.A, m.B),
                               torch.stack([x @ m.A[i].t() @ m.B[i].t() for i in range(2)]))


def test_dropout_selects_the_literal_path(small):
    m = small
    m.config.phi_dropout = 0.5
    try:
        v = F.normalize(torch.randn(2, 32, dtype=torch.float64), dim=-1)
        m.train()
        a, b = m.knowledge_prompts(v), m.knowledge_prompts(v)
        assert (a - b).abs().max() > 1e-6                # dropout is on in training
        with pytest.raises(ValueError, match="fast=True"):
            m.knowledge_prompts(v, fast=True)
        m.eval()
        torch.testing.assert_close(m.knowledge_prompts(v), m.knowledge_prompts(v, fast=False))
    finally:
        m.config.phi_dropout = 0.0


def test_the_cut_text_tower_equals_the_full_one(small):
    m = small.eval()
    assert m.prompt_length < m.embedded.shape[1]         # the cut drops columns
    v = F.normalize(torch.randn(2, 32, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(m.text_features(v, cut=True), m.text_features(v, cut=False),
                               rtol=0, atol=1e-12)


def test_trainable_count_is_its_formula(small):
    m, r, d_k = small, 3, D_K
    # tiny: vision 4 layers x width 64; text 2 layers x width 32; embed 32; K_v = K = 4
    side = d_k * r + r * 2 * d_k + r + r * 32 + r + d_k * r + d_k   # R, W_s, b_s, W_a, b_a, W_b, b_b
    want = 4 * 4 * 64 + 2 * (4 * 32 + 2 * side + r * d_k + 32 * r)
    got = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert got == want == CILMP.num_trainable_formula(4, 64, 2, 32, 32, d_k, r, 4, 4)


def test_a_side_of_length_zero_has_no_parameters_and_every_parameter_is_used(tmp_path):
    folder = write_knowledge(tmp_path)
    for change in (dict(prefix_length=0), dict(suffix_length=0), dict(prefix_length=0, suffix_length=0)):
        m = build_method("cilmp", knowledge_dir=folder, **dict(SMALL, **change)).double()
        sides = (m.prefix is not None) + (m.suffix is not None)
        assert sides == 2 - len(change)
        got = sum(p.numel() for p in m.parameters() if p.requires_grad)
        assert got == CILMP.num_trainable_formula(4, 64, 2, 32, 32, D_K, 3, 4, 4, sides)
        v = F.normalize(torch.randn(2, 32, dtype=torch.float64), dim=-1)
        for fast in (True, False):
            m.zero_grad()
            e = m.knowledge_prompts(v, fast)
            e.square().sum().backward()
            assert all(p.grad is not None for n, p in m.named_parameters()
                       if p.requires_grad and n not in ("visual_prompts", "text_context"))
        torch.testing.assert_close(m.knowledge_prompts(v, True), m.knowledge_prompts(v, False),
                                   rtol=0, atol=1e-12)


def test_description_knowledge_states_and_hash(tmp_path):
    cfg = dict(SMALL, knowledge_length=4, class_names=("benign lesion", "malignant lesion"),
               num_classes=2)
    m = build_method("cilmp", **cfg)
    clip, tok = m.backbone, open_clip.get_tokenizer(TINY_MODEL)
    assert m.knowledge.shape == (2, 4, 32) and m.config.knowledge_hash
    assert m.config.knowledge_texts["benign lesion"][0].startswith("oval circumscribed")
    ids = tok([m.config.knowledge_texts["malignant lesion"][0]])
    x = clip.transformer(clip.token_embedding(ids) + clip.positional_embedding,
                         attn_mask=clip.attn_mask)
    torch.testing.assert_close(m.knowledge[1], clip.ln_final(x)[0, 1:5])
    with pytest.raises(ValueError, match="knowledge_hash"):
        build_method("cilmp", **dict(cfg, knowledge_hash="0" * 16))
    with pytest.raises(ValueError, match="knowledge_width=8"):
        build_method("cilmp", **dict(cfg, knowledge_width=8))


@pytest.mark.parametrize("change, match", [
    (dict(num_classes=2), "class_names needs num_classes=2"),
    (dict(knowledge_width=16), "knowledge width 24 != knowledge_width=16"),
    (dict(prefix_length=2, suffix_length=2), "too few for"),
    (dict(averaging="mean"), "averaging must be one of"),
    (dict(context_init="a photo"), "context_init"),
])
def test_errors_name_the_argument(tmp_path, change, match):
    folder = write_knowledge(tmp_path)
    with pytest.raises(ValueError, match=match):
        build_method("cilmp", knowledge_dir=folder, **dict(SMALL, **change))


def test_knowledge_dir_hash_is_recorded_and_checked(tmp_path, small):
    assert len(small.config.knowledge_hash) == 16 and small.config.knowledge_texts is None
    folder = write_knowledge(tmp_path)
    build_method("cilmp", knowledge_dir=folder, knowledge_hash=small.config.knowledge_hash, **SMALL)
    write_knowledge(tmp_path, dict(LENGTHS, normal=5))
    with pytest.raises(ValueError, match="does not match the knowledge_dir states"):
        build_method("cilmp", knowledge_dir=folder, knowledge_hash=small.config.knowledge_hash,
                     **SMALL)


def test_knowledge_dir_missing_class_and_too_long_prompt(tmp_path):
    folder = write_knowledge(tmp_path, {"normal": 4, "benign": 4})
    with pytest.raises(FileNotFoundError, match="no file for class 'malignant'"):
        build_method("cilmp", knowledge_dir=folder, **SMALL)
    folder = write_knowledge(tmp_path / "long", {n: 9 for n in NAMES})
    with pytest.raises(ValueError, match="the prompt needs 1[6-9] tokens, the text tower has 16"):
        build_method("cilmp", knowledge_dir=folder, **SMALL)


def _data_parallel(module):
    """nn.DataParallel(module) with the module left on its device: on a machine with one GPU
    DataParallel moves the module to cuda:0 (this CPU module's later states would be on CUDA,
    the earlier ones on the CPU, and the shared fixture would stay on the GPU)."""
    device = next(module.parameters()).device
    wrapped = nn.DataParallel(module)
    module.to(device)
    return wrapped


def test_gaussian_averaging_of_the_trainable_state_only(small):
    m = small
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    avg = {mode: PromptAveraging(3, mean=2.0, std=1.0, mode=mode) for mode in ("all", "code")}
    states = []
    for epoch in (1, 2, 3):
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(epoch)
        states.append({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
        for a in avg.values():
            a.update(_data_parallel(m) if epoch == 2 else m, epoch)   # a wrapper is unwrapped
    w = [math.exp(-0.5 * (e - 2.0) ** 2) for e in (1, 2, 3)]
    mean = {n: sum(wi * s[n] for wi, s in zip(w, states)) / sum(w) for n in start}
    every, code = avg["all"].state(), avg["code"].state()
    for n in start:
        torch.testing.assert_close(every[n], mean[n])
        is_int = n.split(".")[-1] in ("R", "W_s", "b_s", "W_a", "b_a", "W_b", "b_b", "A", "B")
        torch.testing.assert_close(code[n], states[-1][n] if is_int else mean[n])
    avg["all"].load_into(m)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), mean[n] if p.requires_grad else frozen[n])
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.copy_(start[n])


def test_autocast_bf16_forward_backward():
    m = build_method("cilmp", **dict(SMALL, knowledge_length=3, num_classes=2,
                                     class_names=("benign", "malignant"), prefix_length=1,
                                     phi_dropout=0.1, seg=True)).train()
    images = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(images)
    out.logits.float().sum().backward()
    assert out.logits.shape == (2, 2) and torch.isfinite(out.logits.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for n, p in m.named_parameters() if p.requires_grad and "seg_decoder" not in n)
    m.eval()
    with torch.no_grad():
        full = m(images).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = m(images).logits.float()
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.1)


TINY_KNOWLEDGE = {"model.prefix_length": 2, "model.suffix_length": 2, "model.knowledge_length": 4}


def test_trains_and_evaluates_through_the_cli_on_the_phantom(tmp_path):
    import json

    from avpt.cli import main
    from safetensors.torch import load_file

    data = ["--dataset", "phantom", "--set", "data.num_patients=3", "--set", "data.views=1"]
    fast = ["--set", "batch_size=4", "--set", "eval_batch_size=8", "--set", "progress=false",
            "--set", "threads=1", "--set", "report=false"]
    knowledge = [a for k, v in TINY_KNOWLEDGE.items() for a in ("--set", f"{k}={v}")]
    out = tmp_path / "run"
    assert main(["train", "--method", "cilmp", "--backbone", "tiny", "--epochs", "2", "--out",
                 str(out)] + data + fast + knowledge) == 0
    res = json.load(open(out / "metrics.json"))
    assert res["config"]["method"] == "cilmp" and res["test"]["n"] > 0
    assert any(h["lr"] > 0 for h in res["history"]) and all(math.isfinite(h["train_loss"])
                                                            for h in res["history"])
    saved = load_file(str(out / "model" / "trainable.safetensors"))
    assert {"visual_prompts", "text_context", "prefix.W_s", "suffix.R", "A", "B"} <= set(saved)
    # evaluation rebuilds the method from the saved config (knowledge texts and hash included)
    assert main(["eval", "--checkpoint", str(out), "--out", str(tmp_path / "eval")] + data) == 0
    again = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert again["test"]["auc"] == res["test"]["auc"]


def test_trains_on_three_class_busi(tmp_path):
    """normal / benign / malignant as three classes; a few SGD steps move every trainable tensor."""
    from torch.utils.data import DataLoader

    from avpt.data import BreastDataset, load_records
    from avpt.losses import method_loss
    from .test_data import write_busi

    write_busi(str(tmp_path), n_per_class=2, size=40)
    recs = load_records("busi", str(tmp_path), options={"normal": "class"})
    m = build_method("cilmp", model_name=TINY_MODEL, num_classes=3,
                     class_names=("normal", "benign", "malignant"), knowledge_length=4,
                     prefix_length=2, suffix_length=2).train()
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01)
    labels = set()
    for batch in DataLoader(BreastDataset(recs, 64, train=True), batch_size=3, shuffle=True):
        out = m(batch["image"])
        loss = method_loss(m, out, labels=batch["label"], masks=batch["mask"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        labels |= set(batch["label"].tolist())
        assert out.logits.shape[1] == 3 and torch.isfinite(loss)
    assert labels == {0, 1, 2}
    assert all((p.detach() - before[n]).abs().max() > 0
               for n, p in m.named_parameters() if p.requires_grad)
