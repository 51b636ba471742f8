"""BiomedAP (issue 15), its arithmetic: the trainable part (fusion block, loss, the prompt wiring
through the ViT) against a literal fp64 re-implementation of the issue's equations (outputs and
every gradient to 1e-10, gradcheck), the anchors against open_clip's own encode_text, equality
with ``coop`` without fusion and visual prompts, "code" mode's broadcast = the batched
computation, the trainable-parameter formula and argument errors before any work. Training
(bf16 autocast, the visual-prototype anchor, the trainer, the CLI, DDP):
``test_biomedap_training.py``."""
import math
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avpt import backbone as bb
from avpt import vit
from avpt.methods import base, build_method
from avpt.methods.biomedap import GatedCrossModalFusion, loss_terms
from avpt.methods.cilmp.descriptions import descriptions_for

TOL = 1e-10
WEIGHTS = dict(high=18.75, kl=1.0, low=1.0, align=0.1)


def tiny(**overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        return build_method("biomedap", model_name=bb.TINY_MODEL, **overrides)


def close(actual, expected, name="tensor", tol=TOL):
    assert actual.shape == expected.shape, f"{name}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = float((actual.detach() - expected.detach()).abs().max())
    assert err <= tol * max(1.0, float(expected.detach().abs().max())), f"{name}: max |diff| {err:.3g}"


# ---------------------------------------------------------------- literal fp64 equations
def lin(x, layer):
    return x if isinstance(layer, nn.Identity) else x @ layer.weight.t() + layer.bias


def literal_mha(q_in, kv_in, mha):
    """MHA_h(q, k=v): per head softmax(Q_j K_j^T / sqrt(d_h)) V_j, heads concatenated, W_o."""
    u, h = q_in.shape[-1], mha.num_heads
    dh = u // h
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = q_in @ w[:u].t() + b[:u]
    k = kv_in @ w[u:2 * u].t() + b[u:2 * u]
    v = kv_in @ w[2 * u:].t() + b[2 * u:]
    heads = []
    for j in range(h):
        s = slice(j * dh, (j + 1) * dh)
        a = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(dh), dim=-1)
        heads.append(a @ v[..., s])
    return torch.cat(heads, -1) @ mha.out_proj.weight.t() + mha.out_proj.bias


def literal_side(x, attended, side):
    """G = sigmoid(W_g X + b); X_f = G X + (1 - G) X~; X' = LN(X + X_f); X' + FFN(X')."""
    g = 1 / (1 + torch.exp(-(x @ side.gate.weight.t() + side.gate.bias)))
    y = x + g * x + (1 - g) * attended
    mu = y.mean(-1, keepdim=True)
    var = ((y - mu) ** 2).mean(-1, keepdim=True)
    y = (y - mu) / torch.sqrt(var + side.norm.eps) * side.norm.weight + side.norm.bias
    w1, w2 = side.ffn[0], side.ffn[3]
    hid = y @ w1.weight.t() + w1.bias
    hid = 0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))
    return y + hid @ w2.weight.t() + w2.bias


def literal_fusion(f, v, t):
    pv, pt = lin(v, f.v_in), lin(t, f.t_in)
    v_out = literal_side(v, lin(literal_mha(pv, pt, f.attn_v), f.v_back), f.side_v)
    t_out = literal_side(t, lin(literal_mha(pt, pv, f.attn_t), f.t_back), f.side_t)
    return v_out, t_out


def literal_loss(logits, feats, text, scale, a_high, a_low, labels, text_out, ctx):
    b, c = logits.shape
    p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    ce = -torch.log(p[torch.arange(b), labels]).mean()
    fn = feats / torch.sqrt((feats ** 2).sum(1, keepdim=True))
    zs = scale * fn @ a_high.t()
    p_zs = torch.exp(zs) / torch.exp(zs).sum(1, keepdim=True)
    kl = (p_zs * (torch.log(p_zs) - torch.log(p))).sum() / (b * c)
    high = (text - a_high).abs().mean()
    low = (text - a_low).abs().mean()
    cm = ctx.mean(0)
    per_layer = []
    for tl in text_out:
        tm = tl.mean(1)                                              # [B, d_t]
        cos = (tm @ cm) / (torch.sqrt((tm ** 2).sum(1)) * torch.sqrt((cm ** 2).sum()))
        per_layer.append(1 - cos.mean())
    align = sum(per_layer) / len(per_layer)
    total = ce + 18.75 * high + 1.0 * kl + 1.0 * low + 0.1 * align
    return dict(cls=ce, high=high, kl=kl, low=low, align=align, loss=total)


def randomised(module):
    """Every parameter random (LayerNorm and biases too), so no equation hides behind a 0/1."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


# ---------------------------------------------------------------- fusion and loss
@pytest.mark.parametrize("d_v,d_t", [(12, 8), (8, 12), (8, 8)])
def test_fusion_block_matches_literal_equations_fp64(d_v, d_t):
    f = randomised(GatedCrossModalFusion(d_v, d_t, heads=4, dropout=0.1)).double().eval()
    v = torch.randn(3, 4, d_v, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, d_t, dtype=torch.float64, requires_grad=True)
    r_v, r_t = torch.randn(3, 4, d_v, dtype=torch.float64), torch.randn(3, 5, d_t, dtype=torch.float64)
    got = f(v, t)
    want = literal_fusion(f, v, t)
    params = [v, t] + list(f.parameters())
    g_got = torch.autograd.grad((got[0] * r_v).sum() + (got[1] * r_t).sum(), params)
    g_want = torch.autograd.grad((want[0] * r_v).sum() + (want[1] * r_t).sum(), params)
    close(got[0], want[0], "V_out")
    close(got[1], want[1], "T_out")
    names = ["V", "T"] + [n for n, _ in f.named_parameters()]
    for name, a, e in zip(names, g_got, g_want):
        close(a, e, f"grad {name}")
    counted = sum(p.numel() for p in f.parameters())
    assert counted == GatedCrossModalFusion.count(d_v, d_t)


def test_fusion_gradcheck():
    f = randomised(GatedCrossModalFusion(4, 2, heads=2, dropout=0.0)).double()
    names = [n for n, _ in f.named_parameters()]
    v = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)

    def fn(v, t, *params):
        out = torch.func.functional_call(f, dict(zip(names, params)), (v, t))
        return out[0], out[1]
    params = [p.detach().clone().requires_grad_(True) for p in f.parameters()]
    assert torch.autograd.gradcheck(fn, (v, t, *params), fast_mode=True)  # inputs and parameters


def test_loss_terms_match_literal_equations_fp64():
    b, c, e, n_l, m, d_t = 5, 3, 6, 2, 4, 7
    d = dict(dtype=torch.float64)
    logits = torch.randn(b, c, **d, requires_grad=True)
    feats = torch.randn(b, e, **d, requires_grad=True)
    text = F.normalize(torch.randn(c, e, **d), dim=-1).requires_grad_(True)
    text_out = torch.randn(n_l, b, m, d_t, **d, requires_grad=True)
    ctx = torch.randn(m, d_t, **d, requires_grad=True)
    scale = torch.tensor(7.5, **d)
    a_high, a_low = (F.normalize(torch.randn(c, e, **d), dim=-1) for _ in range(2))
    labels = torch.tensor([0, 2, 1, 2, 0])
    got = loss_terms(logits, feats, text, scale, a_high, a_low, labels, WEIGHTS, text_out, ctx)
    want = literal_loss(logits, feats, text, scale, a_high, a_low, labels, text_out, ctx)
    assert set(got) == set(want)
    for k in want:
        close(got[k], want[k], k)
    inputs = [logits, feats, text, text_out, ctx]
    for name, a, w in zip(["logits", "features", "text", "text_out", "ctx"],
                          torch.autograd.grad(got["loss"], inputs),
                          torch.autograd.grad(want["loss"], inputs)):
        close(a, w, f"grad {name}")


# ---------------------------------------------------------------- the method's wiring
def manual_encode(m, images):
    """The ViT with the prompt positions overwritten before every block, fused (literally) before
    the fusion blocks from the image's own tokens ("image-tokens") or zeros ("code")."""
    k, visual = m.config.num_visual_prompts, m.visual
    z = vit.embed(visual, vit.patch_embed(visual, images))
    outs = []
    for i in range(vit.num_layers(visual)):
        prompt = torch.zeros_like(z[:, 1:1 + k])
        if i in m.fusion_layers:
            src = z[:, 1:1 + k] if m.config.fusion_input == "image-tokens" else prompt
            ctx = m.context.unsqueeze(0).expand(z.shape[0], -1, -1)
            prompt, t_out = literal_fusion(m.fusion[str(i)], src, ctx)
            outs.append(t_out)
        z = vit.block(visual, i, torch.cat([z[:, :1], prompt, z[:, 1 + k:]], 1))
    return vit.pool(visual, z)[2], torch.stack(outs)


@pytest.mark.parametrize("mode", ["image-tokens", "code"])
def test_method_wiring_and_gradients_match_literal_fp64(mode):
    m = tiny(fusion_input=mode, num_classes=3, seg=False, low_anchor="code",
             class_names=("normal", "benign", "malignant")).double().eval()
    randomised(m.fusion)
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])
    out = m(images)
    feats, text_out = manual_encode(m, images)
    close(out.features, feats, "features")
    close(out.text_out, text_out, "text_out")
    text = m.text_features()
    want = literal_loss(m.backbone.logit_scale.exp() * F.normalize(feats, dim=-1) @ text.t(), feats,
                        text, m.backbone.logit_scale.exp(), m.anchor_high, m.anchor_low, labels,
                        text_out, m.context)
    got = m.make_loss()(out, labels, None, None, True)
    params = [p for p in m.parameters() if p.requires_grad]
    for k in want:
        close(got[k], want[k], k)
    for (name, _), a, w in zip([(n, p) for n, p in m.named_parameters() if p.requires_grad],
                               torch.autograd.grad(got["loss"], params),
                               torch.autograd.grad(want["loss"], params)):
        close(a, w, f"grad {name}")
    if mode == "code":   # one constant for every image (the reference behaviour) ...
        assert torch.equal(out.text_out[:, 0], out.text_out[:, 2])
    else:                # ... and vision-informed: fused prompts differ between images
        assert (out.text_out[:, 0] - out.text_out[:, 2]).abs().max() > 1e-3


def test_anchors_are_open_clip_text_features():
    names = ("normal", "benign lesion", "malignant")
    m = tiny(num_classes=3, class_names=names, seg=False, low_anchor="code")
    clip, tok = m.backbone, open_clip.get_tokenizer(bb.TINY_MODEL)
    with torch.no_grad():
        high = torch.stack([F.normalize(F.normalize(clip.encode_text(tok(list(descriptions_for(n)))),
                                                    dim=-1).mean(0), dim=-1) for n in names])
        low = F.normalize(clip.encode_text(tok(list(names))), dim=-1)
    close(m.anchor_high, high, "a_high", tol=1e-5)
    close(m.anchor_low, low, "a_low", tol=1e-5)
    assert {"anchor_high", "anchor_low"} <= set(dict(m.named_buffers()))
    assert m.config.descriptions_hash and len(m.config.descriptions_hash) == 16
    with pytest.raises(ValueError, match="descriptions_hash"):
        tiny(descriptions_hash="0" * 16)


def test_initial_prompts_are_the_template():
    """Context from "a ultrasound photo of a" (its first 4 tokens) + the template's rest = the
    tokenised template."""
    m = tiny(seg=False, modality_word="ultrasound")
    tok = open_clip.get_tokenizer(bb.TINY_MODEL)
    tokens = tok([f"a ultrasound photo of a {n} in the breast." for n in m.config.class_names])
    with torch.no_grad():
        want = m.backbone.token_embedding(tokens)
        got = torch.cat([m.prefix, m.context.expand(2, -1, -1), m.suffix], 1)
    assert torch.equal(got, want)


def test_no_fusion_no_visual_prompts_equals_coop_fp64():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        torch.manual_seed(3)
        coop = build_method("coop", model_name=bb.TINY_MODEL).double()
        torch.manual_seed(3)
    bap = tiny(num_visual_prompts=0, fusion_layers=(), ctx_init=None,
               template="X X X X {class}.").double()
    assert torch.equal(coop.context, bap.context)
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    a, b = coop(images), bap(images)
    close(b.logits, a.logits, "logits")
    close(b.seg_logits, a.seg_logits, "seg_logits")
    assert b.text_out is None


def test_code_mode_broadcast_equals_batched():
    m = tiny(fusion_input="code", fusion_dropout=0.0, seg=False, low_anchor="code").double().train()
    randomised(m.fusion)
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    labels = torch.tensor([1, 0, 1])
    runs = []
    for broadcast in (True, False):
        m.config.fusion_broadcast = broadcast
        out = m(images)
        terms = m.make_loss()(out, labels, None, None, True)
        grads = torch.autograd.grad(terms["loss"], [p for p in m.parameters() if p.requires_grad])
        runs.append((out, grads))
    (a, ga), (b, gb) = runs
    for name in ("logits", "features", "text_out"):
        close(getattr(a, name), getattr(b, name), name, tol=1e-12)
    for x, y in zip(ga, gb):
        close(x, y, "grad", tol=1e-12)


# ---------------------------------------------------------------- counts and errors
def expected_trainable(d_v, d_t, m, n_layers, align=True):
    """ctx M d_t + per fusion layer (u = max(d_v, d_t)): two MHA (4u^2 + 4u), per side gate
    (d^2 + d), LayerNorm 2d, FFN (8d^2 + 5d); text projection in (u d_t + u), back (u d_t + d_t)
    when d_t < u. Without the alignment loss the text side is not built (projection in stays)."""
    u = max(d_v, d_t)
    vis = 4 * u * u + 4 * u + d_v * d_v + d_v + 2 * d_v + 8 * d_v * d_v + 5 * d_v + u * d_t + u
    txt = 4 * u * u + 4 * u + d_t * d_t + d_t + 2 * d_t + 8 * d_t * d_t + 5 * d_t + u * d_t + d_t
    return m * d_t + n_layers * (vis + (txt if align else 0))


def test_trainable_parameter_count_formula():
    m = tiny(seg=False)
    assert m.fusion_layers == [2, 3]   # the authors' code's 5, 8 of 12 blocks on the 4-block tiny ViT
    count = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert count == expected_trainable(64, 32, 4, 2) == 168768
    m0 = tiny(seg=False, lambda_align=0.0, fusion_layers=(1,))
    assert sum(p.numel() for p in m0.parameters() if p.requires_grad) == expected_trainable(64, 32, 4, 1, False)
    # ViT-B/16: d_v 768, d_t 512, fusion at blocks 5 and 8
    assert GatedCrossModalFusion.count(768, 512) * 2 + 4 * 512 == expected_trainable(768, 512, 4, 2) \
        == 26382848


BAD = [
    (dict(fusion_layers=(4,)), r"fusion_layers must be distinct block indices in \[0, 4\)"),
    (dict(fusion_layers=(1, 1)), r"fusion_layers must be distinct"),
    (dict(num_classes=3), r"class_names needs num_classes=3 names, got 2"),
    (dict(fusion_input="zeros"), r"fusion_input must be one of \('code', 'image-tokens'\)"),
    (dict(low_anchor="visual"), r"low_anchor must be one of"),
    (dict(num_visual_prompts=0), r"needs num_visual_prompts >= 1"),
    (dict(num_visual_prompts=17), r"num_visual_prompts must be in \[0, 16\]"),
    (dict(fusion_heads=5), r"fusion_heads must divide the unified width 64"),
    (dict(lambda_kl=-1.0), r"lambda_kl must be >= 0"),
    (dict(template="a photo of {class}."), r"needs >= num_context=4 tokens before"),
    (dict(template="a photo of a lesion."), r"template must contain"),
    (dict(ctx_init="a photo"), r"ctx_init 'a photo' has fewer than num_context=4 tokens"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_argument_errors_before_any_work(overrides, message, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the backbone was built before the argument was checked")
    monkeypatch.setattr(base, "load_backbone", no_work)
    with pytest.raises(ValueError, match=message) as err:
        tiny(**overrides)
    assert "\n" not in str(err.value)
