"""BiomedAP's objective: ``loss_terms`` (CE, the dual-anchor terms, KL to the zero-shot
prediction, the fusion alignment) and ``BiomedAPLoss``, the method's loss module (adds the shared
SEG term, ``avpt.losses.seg_loss``).

Loss: CE + l_h mean|t^ - a_high| + l_kl KL(p_zs || p) / (B C) + l_l mean|t^ - a_low|
+ l_a mean_l (1 - mean_b cos(mean_m T_out[l, b], mean_m ctx)).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...losses import seg_loss
from .config import BiomedAPOutput


def _wide(x: Tensor) -> Tensor:
    """At least fp32 (bf16/fp16 under autocast go up; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def alignment_loss(text_out: Tensor, ctx: Tensor) -> Tensor:
    """mean_l (1 - mean_b cos(mean_m T_out[l, b], mean_m ctx)): text_out [L, B, M, d_t] (the
    text side of every fusion layer for this rank's images), ctx [M, d_t]."""
    pooled = F.normalize(_wide(text_out).mean(dim=2), dim=-1)        # [L, B, d_t]
    target = F.normalize(_wide(ctx).mean(dim=0), dim=-1)             # [d_t]
    return (1 - (pooled * target).sum(-1).mean(dim=1)).mean()


def loss_terms(logits: Tensor, features: Tensor, text: Tensor, scale: Tensor, a_high: Tensor,
               a_low: Tensor, labels: Optional[Tensor], weights: Dict[str, float],
               text_out: Optional[Tensor] = None, ctx: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """The BiomedAP terms, unweighted, and their weighted sum under ``"loss"``.

    logits [B, C] = scale * cos(features, text); features [B, E] (image features, not
    normalised); text [C, E] normalised class text features t^; a_high, a_low [C, E]
    normalised anchors; labels [B] or None (no CE); weights: ``high``, ``kl``, ``low``,
    ``align``. p_zs = softmax(scale * cos(features, a_high)) (zero-shot with the expert
    descriptions, as the reference code does: the image features are the prompted ones).
    ``text_out`` [L, B, M, d_t] and ``ctx`` [M, d_t] give the alignment term (absent with no
    fusion layer)."""
    text = _wide(text)
    a_high, a_low = a_high.to(text.dtype), a_low.to(text.dtype)
    logp = F.log_softmax(_wide(logits), dim=-1)
    zs = _wide(scale) * F.normalize(_wide(features), dim=-1) @ a_high.t()
    logp_zs = F.log_softmax(zs, dim=-1)
    terms = {}
    if labels is not None:
        terms["cls"] = F.nll_loss(logp, labels)
    terms["high"] = (text - a_high).abs().mean()
    terms["kl"] = (logp_zs.exp() * (logp_zs - logp)).sum() / logits.numel()
    terms["low"] = (text - a_low).abs().mean()
    if text_out is not None:
        terms["align"] = alignment_loss(text_out, ctx)
    total = terms.get("cls", 0.0)
    for name in ("high", "kl", "low", "align"):
        if name in terms:
            total = total + weights[name] * terms[name]
    terms["loss"] = total
    return terms


class BiomedAPLoss(nn.Module):
    """forward(out: BiomedAPOutput, labels [B] or None, masks [B, 1, H, W] or None, modality,
    update_state) -> terms (cls, high, kl, low, align, seg) and their weighted total "loss".
    Everything comes from ``out`` and the method's parameters/buffers: no state from an earlier
    forward. The method (a ``BiomedAP``) is held by reference (not a submodule: no duplicated parameters)."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method_ref = [method]

    def forward(self, out, labels=None, masks=None, modality=None, update_state: bool = False):
        m = self.method_ref[0]
        c = m.config
        if not isinstance(out, BiomedAPOutput):
            raise TypeError(f"BiomedAPLoss needs the BiomedAPOutput of a BiomedAP forward, got "
                            f"{type(out).__name__}")
        if not m.prototypes_ready:
            raise RuntimeError("low_anchor='visual-prototypes' needs method.set_visual_prototypes("
                               "features, labels) before the loss is used")
        if c.lambda_align > 0 and m.fusion_layers and out.text_out is None:
            raise ValueError("lambda_align > 0 with fusion layers needs out.text_out (the "
                             "output of this forward), got None")
        weights = dict(high=c.lambda_high, kl=c.lambda_kl, low=c.lambda_low, align=c.lambda_align)
        terms = loss_terms(out.logits, out.features, out.text_features,
                           m.backbone.logit_scale.exp(), m.anchor_high, m.anchor_low, labels,
                           weights, out.text_out, m.context)
        if c.seg and c.lambda_seg and masks is not None and out.seg_logits is not None:
            terms["seg"] = seg_loss(out.seg_logits, masks, c.seg_bce_weight)
            terms["loss"] = terms["loss"] + c.lambda_seg * terms["seg"]
        return terms


__all__ = ["BiomedAPLoss", "alignment_loss", "loss_terms"]
