"""Running open_clip's VisionTransformer piece by piece, so methods can act between blocks.

``embed`` + ``block`` over every resblock + ``pool`` reproduces ``visual(x)`` (= ``encode_image``)
exactly; the tests prove it. Tokens are kept batch-first ``[B, T, D]`` between blocks whatever
``transformer.batch_first`` is.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn


def check_images(visual: nn.Module, images) -> None:
    """Images must be a float tensor [B, 3, H, W] at the backbone's image size."""
    h, w = visual.image_size
    expected = f"[B, 3, {h}, {w}] (float, the backbone's image size)"
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor {expected}, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be {expected}, got shape {tuple(images.shape)}")
    if images.shape[1] != visual.conv1.in_channels:
        raise ValueError(f"images must have {visual.conv1.in_channels} channels: expected {expected}, "
                         f"got shape {tuple(images.shape)}")
    if tuple(images.shape[2:]) != (h, w):
        raise ValueError(f"images must be {h}x{w}: expected {expected}, got shape "
                         f"{tuple(images.shape)} (resize first)")
    if images.shape[0] < 1:
        raise ValueError(f"images must hold at least one image: expected {expected}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point {expected}, got {images.dtype}")


def patch_embed(visual: nn.Module, images: Tensor) -> Tensor:
    """Frozen patch projection, Eq. 1 without the positional term: [B, 3, H, W] -> [B, N, D]."""
    x = visual.conv1(images)
    return x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)


def embed(visual: nn.Module, patches: Tensor) -> Tensor:
    """``visual._embeds`` after the patch projection: class token, positions, ln_pre -> [B, T, D]."""
    b = patches.shape[0]
    cls = visual.class_embedding.view(1, 1, -1).expand(b, -1, -1).to(patches.dtype)
    x = torch.cat([cls, patches], dim=1) + visual.positional_embedding.to(patches.dtype)
    x = visual.patch_dropout(x)
    return visual.ln_pre(x)


def eq1_patch_features(visual: nn.Module, patches: Tensor) -> Tensor:
    """Eq. 1: z_i^(0) = u_i W_e + PE_i for the patch tokens only: [B, N, D]."""
    return patches + visual.positional_embedding[1:].to(patches.dtype)


def block(visual: nn.Module, index: int, x: Tensor) -> Tensor:
    """Resblock ``index`` on batch-first tokens [B, T, D]."""
    blk = visual.transformer.resblocks[index]
    if visual.transformer.batch_first:
        return blk(x)
    return blk(x.transpose(0, 1)).transpose(0, 1)


def pool(visual: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Final tokens [B, T, D] -> (pooled [B, D] after ln_post, patch tokens [B, N, D] after
    ln_post, image features [B, E] = pooled @ proj, i.e. ``encode_image``)."""
    pooled, tokens = visual._pool(x)
    features = pooled @ visual.proj if visual.proj is not None else pooled
    return pooled, tokens, features


def residual_branches(blk: nn.Module):
    """(attention branch, MLP branch) of a pre-norm block, each x -> branch(x) before its
    residual add: open_clip ResidualAttentionBlock (ln_1, attention, ls_1 / ln_2, mlp, ls_2)
    or timm Block (norm1, attn, ls1, drop_path1 / norm2, mlp, ls2, drop_path2)."""
    if hasattr(blk, "ln_1"):
        return (lambda x: blk.ls_1(blk.attention(q_x=blk.ln_1(x))),
                lambda x: blk.ls_2(blk.mlp(blk.ln_2(x))))
    return (lambda x: blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x)))),
            lambda x: blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))))


def num_layers(visual: nn.Module) -> int:
    return len(visual.transformer.resblocks)


def width(visual: nn.Module) -> int:
    return visual.conv1.out_channels
