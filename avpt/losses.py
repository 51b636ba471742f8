"""The losses every method trains: CLS (Eq. 14), cross-entropy on the class-token logits; SEG
(Eq. 15), soft Dice on sigmoid(mask logits) + beta * BCE; and the baselines' objective
CLS + lambda_seg SEG (``method_loss``, ``MethodLoss``). A method's own terms live with it:
A-VPT's (RCL, TXT, LAP; Eq. 17) in ``avpt.methods.avpt.loss``, BiomedAP's in
``avpt.methods.biomedap.loss``."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cls_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. 14: logits [B, C], labels [B] (class indices)."""
    return F.cross_entropy(logits, labels)


def seg_loss(mask_logits: Tensor, masks: Tensor, bce_weight: float = 1.0, eps: float = 1.0) -> Tensor:
    """Eq. 15: 1 - (2<M^, M> + eps) / (|M^|_1 + |M|_1 + eps) + beta BCE, per image, averaged.
    mask_logits, masks: [B, 1, H, W] (masks in [0, 1])."""
    if masks.shape != mask_logits.shape:
        raise ValueError(f"masks must have shape {tuple(mask_logits.shape)} [B, 1, H, W] to match "
                         f"the mask logits, got {tuple(masks.shape)}")
    masks = masks.to(mask_logits.dtype)
    prob = torch.sigmoid(mask_logits).flatten(1)
    target = masks.flatten(1)
    dice = 1.0 - (2.0 * (prob * target).sum(1) + eps) / (prob.sum(1) + target.sum(1) + eps)
    bce = F.binary_cross_entropy_with_logits(mask_logits, masks)
    return dice.mean() + bce_weight * bce


def cls_seg_terms(config, out, labels: Optional[Tensor], masks: Optional[Tensor]
                  ) -> Dict[str, Tensor]:
    """The terms every method trains: CLS (Eq. 14) with labels [B], SEG (Eq. 15) with masks
    [B, 1, H, W] when ``config.lambda_seg`` is on and the method segments."""
    terms: Dict[str, Tensor] = {}
    if labels is not None and out.logits is not None:
        terms["cls"] = cls_loss(out.logits, labels)
    if config.lambda_seg and masks is not None and out.seg_logits is not None:
        terms["seg"] = seg_loss(out.seg_logits, masks, config.seg_bce_weight)
    return terms


def method_loss(method, out, labels=None, masks=None) -> Dict[str, Tensor]:
    """CLS + lambda_seg SEG for any method (the baselines' objective)."""
    c = method.config
    terms = cls_seg_terms(c, out, labels, masks)
    if not terms:
        raise ValueError("pass labels and/or masks")
    terms["loss"] = terms.get("cls", 0.0) + c.lambda_seg * terms.get("seg", 0.0)
    return terms


class MethodLoss(nn.Module):
    """``method_loss`` as the loss module of ``Method.make_loss``: no state of its own."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, out, labels: Optional[Tensor] = None, masks: Optional[Tensor] = None,
                modality=None, update_state: bool = False) -> Dict[str, Tensor]:
        """CLS + lambda_seg SEG of ``out`` (``modality`` and ``update_state`` are not used)."""
        return method_loss(self, out, labels=labels, masks=masks)
