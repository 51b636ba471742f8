"""VPT-deep (Jia et al. 2022): learned prompt tokens before every block."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict

import torch
from torch import nn

from .. import vit
from .base import Method, MethodConfig, register


@dataclass
class VPTConfig(MethodConfig):
    """``num_prompts``: K learned tokens per layer. ``prompt_dropout``: dropout on the prompt
    tokens in training, 0.1 as the official VPT code (KMnP/vpt, ``prompt_dropout``); off in
    eval. Presets (``preset``): "default" K = 10 (0.148% of ViT-B/16's visual tower with the
    heads); "table10" K = 192, the paper's Table 10 share (2.1%; measured 2.094% with the
    classification head and segmentation decoder)."""
    num_prompts: int = 10
    prompt_dropout: float = 0.1
    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {"table10": {"num_prompts": 192}}


@register("vpt")
class VPTDeep(Method):
    """VPT-deep (Jia et al. 2022): K learned tokens inserted after the class token before every
    block; at each block the previous block's prompt outputs are dropped and replaced by that
    block's own prompts (official VPT), each [B, K, D] after dropout (training only, as
    the official code). Prompts are removed before pooling."""
    display_name = "VPT-deep"
    config_class = VPTConfig

    def __init__(self, config):
        super().__init__(config)
        v = self.visual
        dim, layers = vit.width(v), vit.num_layers(v)
        patch = v.patch_size[0] * v.patch_size[1]
        bound = math.sqrt(6.0 / float(3 * patch + dim))  # the official VPT init
        self.prompts = nn.Parameter(torch.empty(layers, config.num_prompts, dim).uniform_(-bound, bound))
        self.prompt_dropout = nn.Dropout(config.prompt_dropout)

    def encode(self, images, maps=None, modality=None, return_attn=False):
        visual = self.visual
        z = vit.embed(visual, vit.patch_embed(visual, images))
        b, k = z.shape[0], self.config.num_prompts
        for layer in range(vit.num_layers(visual)):
            prompt = self.prompt_dropout(self.prompts[layer].unsqueeze(0).expand(b, -1, -1)).to(z.dtype)
            rest = z[:, 1:] if layer == 0 else z[:, 1 + k:]
            z = vit.block(visual, layer, torch.cat([z[:, :1], prompt, rest], dim=1))
        return dict(z=torch.cat([z[:, :1], z[:, 1 + k:]], dim=1))
