"""Prompt-guided attention rollout (Eq. 18).

Eq. 18 multiplies (I + gamma A_p->t^(l)) over layers, but A_p->t is K x T (prompts over tokens),
not square. We lift it to the token graph it induces: with A_l the head-averaged p->t attention
[K, T], C_l = A_l^T A_l [T, T] couples two tokens through the prompts that attend to both
(row-normalised). The rollout is R = prod_l (I + gamma C_l) (rows renormalised at each step, as
in attention rollout), and the relevance of each patch is the class token's row of R, without the
class token itself, min-max normalised to [0, 1] and bilinearly up-sampled to the image size.

``rollout_and_prompt_types`` draws A-VPT's figures of a run report and of ``avpt explain``: the
rollout overlays and the attention by prompt type (random / static / anatomy, Figs. 7-8).
"""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...figures import gray01, pyplot, sample_title, save_figure, stack_batch


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


class _FixedPrompts(nn.Module):
    """Stands in for the prompt bank: returns ``fn(real prompts)``."""

    def __init__(self, bank: nn.Module, fn):
        super().__init__()
        self.bank, self.fn = bank, fn

    def forward(self, region_emb):
        return self.fn(self.bank(region_emb))


def _relevance(model, batch, maps) -> np.ndarray:
    return relevance(model, batch["image"], maps=maps, modality=batch["modality"]).cpu().numpy()


def _relevance_colorbar(fig, heat, axes) -> None:
    """One shared colorbar for relevance overlays (each map is scaled to [0, 1] per image)."""
    bar = fig.colorbar(heat, ax=list(np.ravel(axes)), fraction=0.03, pad=0.02)
    bar.set_label("relevance (min-max per image)", fontsize=7)
    bar.ax.tick_params(labelsize=6)


def rollout_and_prompt_types(model, dataset, indices: List[int], device, dir_: str):
    """(rollout.png, prompt_types.png) of a model with A-VPT's prompt bank (``model.prompt_bank``
    and PIM attention for ``relevance``), or (None, None) without images."""
    if not indices:
        return None, None
    plt = pyplot()
    model.eval()
    batch = stack_batch(dataset, indices, device)
    maps = model.forward_maps(batch)
    anatomy = _relevance(model, batch, maps)
    fig, axes = plt.subplots(1, len(indices), figsize=(2.2 * len(indices), 2.5), squeeze=False)
    for ax, i, rel in zip(axes[0], indices, anatomy):
        ax.imshow(gray01(dataset[i]["image"]), cmap="gray")
        heat = ax.imshow(rel, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(sample_title(dataset, i), fontsize=7), ax.axis("off")
    _relevance_colorbar(fig, heat, axes)
    fig.suptitle("prompt-guided rollout relevance (Eq. 18)", fontsize=9)
    rollout_path = save_figure(fig, os.path.join(dir_, "rollout.png"))

    gen = torch.Generator(device="cpu").manual_seed(0)

    def random_prompts(p):
        noise = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
        return noise * p.std(dim=(1, 2, 3), keepdim=True) + p.mean(dim=(1, 2, 3), keepdim=True)

    def static_prompts(p):
        return p.mean(dim=1, keepdim=True).expand_as(p).contiguous()

    bank = model.prompt_bank
    rels = {"random": None, "static": None, "anatomy (A-VPT)": anatomy}
    try:
        for name, fn in (("random", random_prompts), ("static", static_prompts)):
            model.prompt_bank = _FixedPrompts(bank, fn)
            rels[name] = _relevance(model, batch, maps)
    finally:
        model.prompt_bank = bank
    n = len(indices)
    fig, axes = plt.subplots(n, 4, figsize=(8.5, 2.1 * n), squeeze=False)
    for r, i in enumerate(indices):
        img = gray01(dataset[i]["image"])
        gt = dataset[i]["mask"][0].numpy()
        axes[r, 0].imshow(img, cmap="gray")
        if gt.any():
            axes[r, 0].contour(gt, levels=[0.5], colors="lime", linewidths=1)
        axes[r, 0].set_ylabel(sample_title(dataset, i), fontsize=7)
        for c, (name, rel) in enumerate(rels.items(), start=1):
            axes[r, c].imshow(img, cmap="gray")
            heat = axes[r, c].imshow(rel[r], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if r == 0:
                axes[r, c].set_title(f"{name} prompts", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_title("image + lesion", fontsize=8)
    _relevance_colorbar(fig, heat, axes[:, 1:])
    fig.suptitle("attention (rollout) by prompt type (Figs. 7-8): prompt swaps of one trained "
                 "model", fontsize=9)
    return rollout_path, save_figure(fig, os.path.join(dir_, "prompt_types.png"))
