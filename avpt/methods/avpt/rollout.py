"""Prompt-guided attention rollout (Eq. 18).

Eq. 18 multiplies (I + gamma A_p->t^(l)) over layers, but A_p->t is K x T (prompts over tokens),
not square. We lift it to the token graph it induces: with A_l the head-averaged p->t attention
[K, T], C_l = A_l^T A_l [T, T] couples two tokens through the prompts that attend to both
(row-normalised). The rollout is R = prod_l (I + gamma C_l) (rows renormalised at each step, as
in attention rollout), and the relevance of each patch is the class token's row of R, without the
class token itself, min-max normalised to [0, 1] and bilinearly up-sampled to the image size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def rollout(attns, gamma: float = 1.0) -> Tensor:
    """attns: per injected layer [B, H, K, T] -> token relevance R [B, T, T]."""
    if not attns:
        raise ValueError("rollout needs at least one prompt->token attention map")
    a0 = attns[0]
    b, _, _, t = a0.shape
    eye = torch.eye(t, dtype=torch.float32, device=a0.device).expand(b, t, t)
    rel = eye.clone()
    for attn in attns:
        a = attn.float().mean(dim=1)                               # [B, K, T]
        c = a.transpose(1, 2) @ a                                  # [B, T, T]
        c = c / c.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        step = eye + gamma * c
        step = step / step.sum(dim=-1, keepdim=True)
        rel = step @ rel
    return rel


@torch.no_grad()
def relevance(model, images: Tensor, maps: Optional[Tensor] = None, modality=None,
              gamma: Optional[float] = None) -> Tensor:
    """Prompt-guided relevance maps [B, H, W] in [0, 1] for images [B, 3, H, W] (Eq. 18)."""
    out = model(images, maps=maps, modality=modality, return_attn=True)
    g = model.config.rollout_gamma if gamma is None else gamma
    rel = rollout(out.attn, g)[:, 0, 1:]                           # class token row, patches only
    hg, wg = model.visual.grid_size
    rel = rel.reshape(-1, 1, hg, wg)
    lo = rel.amin(dim=(2, 3), keepdim=True)
    hi = rel.amax(dim=(2, 3), keepdim=True)
    rel = (rel - lo) / (hi - lo).clamp_min(1e-12)
    rel = F.interpolate(rel, size=tuple(images.shape[2:]), mode="bilinear", align_corners=False)
    return rel[:, 0].clamp(0.0, 1.0)
