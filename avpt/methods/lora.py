"""LoRA: low-rank updates of the attention projections of every block."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Method, MethodConfig, frozen_encode, register


@dataclass
class LoRAConfig(MethodConfig):
    """``rank`` r, ``alpha`` (scale alpha / r), ``targets``: any of q, k, v, o. Presets
    (``preset``): "default" r = 8 on q, v (Hu et al.; 0.38% of ViT-B/16's visual tower with the
    heads); "table10" r = 33 on q, k, v, o with alpha = 33 (the paper's Table 10 share, 2.8%;
    measured 2.785%; like the default, the share's denominator counts the visual tower with
    its LoRA factors, as ``avpt params`` does)."""
    rank: int = 8
    alpha: float = 8.0
    targets: Tuple[str, ...] = ("q", "v")
    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {
        "table10": {"rank": 33, "alpha": 33.0, "targets": ("q", "k", "v", "o")}}


def _lora_factors(targets, rank: int, d_in: int, d_out: int):
    """(A, B) ParameterDicts keyed by target: A [rank, d_in] Kaiming-uniform (PEFT's init), B
    [d_out, rank] zeros, so that B A starts at zero."""
    lora_a, lora_b = nn.ParameterDict(), nn.ParameterDict()
    for t in targets:
        a = torch.empty(rank, d_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        lora_a[t] = nn.Parameter(a)
        lora_b[t] = nn.Parameter(torch.zeros(d_out, rank))
    return lora_a, lora_b


class LoRAMultiheadAttention(nn.Module):
    """Wraps a frozen ``nn.MultiheadAttention``: W_x + (alpha / r) B_x A_x for each target
    projection x in (q, k, v, o); B starts at zero, so the wrapped layer starts unchanged."""

    # W + B A is summed in fp32 before autocast casts it: the wrapped weights must stay fp32
    # (``avpt.frozen_weights`` skips this subtree; a bf16 W would change the sum's bits)
    reads_frozen_weights = True

    def __init__(self, mha: nn.MultiheadAttention, rank: int, alpha: float, targets):
        super().__init__()
        bad = set(targets) - set("qkvo")
        if bad or not targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of q, k, v, o, got {targets!r}")
        self.mha, self.targets, self.scaling = mha, tuple(targets), alpha / rank
        d = mha.embed_dim
        self.lora_A, self.lora_B = _lora_factors(self.targets, rank, d, d)

    @property
    def batch_first(self):
        return self.mha.batch_first

    def _delta(self, t: str) -> Optional[Tensor]:
        if t not in self.targets:
            return None
        return (self.lora_B[t] @ self.lora_A[t]) * self.scaling

    def forward(self, query, key, value, need_weights=False, attn_mask=None, **_):
        mha = self.mha
        w_in = mha.in_proj_weight
        d = mha.embed_dim
        deltas = [self._delta(t) for t in "qkv"]
        if any(x is not None for x in deltas):
            w_in = w_in + torch.cat([x if x is not None else w_in.new_zeros(d, d) for x in deltas])
        w_out = mha.out_proj.weight
        if "o" in self.targets:
            w_out = w_out + self._delta("o")
        if mha.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out, _ = F.multi_head_attention_forward(
            query, key, value, d, mha.num_heads, w_in, mha.in_proj_bias, None, None, False, 0.0,
            w_out, mha.out_proj.bias, training=self.training, need_weights=False, attn_mask=attn_mask)
        if mha.batch_first:
            out = out.transpose(0, 1)
        return out, None


class LoRAFusedLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` whose output stacks ``parts`` equal slices (timm's fused
    ``qkv``: parts "qkv"; its ``proj``: "o"): W + (alpha / r) B_x A_x on the slices in
    ``targets``; B starts at zero."""

    reads_frozen_weights = True  # W + B A in fp32, as LoRAMultiheadAttention

    def __init__(self, linear: nn.Linear, parts: str, rank: int, alpha: float, targets):
        super().__init__()
        self.linear, self.parts, self.scaling = linear, parts, alpha / rank
        self.targets = tuple(t for t in parts if t in targets)
        d_in, d_out = linear.in_features, linear.out_features // len(parts)
        self.lora_A, self.lora_B = _lora_factors(self.targets, rank, d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        w = self.linear.weight
        d_out = w.shape[0] // len(self.parts)
        deltas = [(self.lora_B[t] @ self.lora_A[t]) * self.scaling if t in self.targets
                  else w.new_zeros(d_out, w.shape[1]) for t in self.parts]
        return F.linear(x, w + torch.cat(deltas), self.linear.bias)


def _wrap_timm_attention(attn: nn.Module, rank: int, alpha: float, targets) -> None:
    """LoRA on a timm ``Attention`` (fused ``qkv`` Linear, ``proj`` Linear), in place."""
    bad = set(targets) - set("qkvo")
    if bad or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of q, k, v, o, got {targets!r}")
    if set(targets) & set("qkv"):
        attn.qkv = LoRAFusedLinear(attn.qkv, "qkv", rank, alpha, targets)
    if "o" in targets:
        attn.proj = LoRAFusedLinear(attn.proj, "o", rank, alpha, targets)


@register("lora")
class LoRA(Method):
    """LoRA (Hu et al. 2022) of rank r on the attention projections of every block."""
    display_name = "LoRA"
    config_class = LoRAConfig

    def __init__(self, config):
        super().__init__(config)
        for blk in self.visual.transformer.resblocks:
            if isinstance(blk.attn, nn.MultiheadAttention):
                blk.attn = LoRAMultiheadAttention(blk.attn, config.rank, config.alpha,
                                                  config.targets)
            else:  # a timm block (a local-dir: backbone's timm trunk)
                _wrap_timm_attention(blk.attn, config.rank, config.alpha, config.targets)

    def encode(self, images, maps=None, modality=None, return_attn=False):
        return frozen_encode(self, images)
