"""Adapters: bottleneck adapters after attention and MLP in every block."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict

import torch.nn.functional as F
from torch import Tensor, nn

from .. import vit
from .base import Method, MethodConfig, register


@dataclass
class AdapterConfig(MethodConfig):
    """``bottleneck``: the adapters' hidden width. Presets (``preset``): "default" 64 (2.80% of
    ViT-B/16's visual tower with the heads); "table10" 83 (the paper's Table 10 share, 3.6%;
    measured 3.615%)."""
    bottleneck: int = 64
    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {"table10": {"bottleneck": 83}}


class Adapter(nn.Module):
    """Bottleneck adapter h -> h + up(GELU(down(h))); ``up`` starts at zero (identity at init)."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(F.gelu(self.down(h)))


@register("adapter")
class AdapterTuning(Method):
    """Houlsby-style adapters on the output of each attention and each MLP sub-layer, before the
    residual add, in every block."""
    display_name = "Adapter"
    config_class = AdapterConfig

    def __init__(self, config):
        super().__init__(config)
        dim, layers = vit.width(self.visual), vit.num_layers(self.visual)
        self.attn_adapters = nn.ModuleList(Adapter(dim, config.bottleneck) for _ in range(layers))
        self.mlp_adapters = nn.ModuleList(Adapter(dim, config.bottleneck) for _ in range(layers))

    def encode(self, images, maps=None, modality=None, return_attn=False):
        visual = self.visual
        batch_first = visual.transformer.batch_first
        z = vit.embed(visual, vit.patch_embed(visual, images))
        x = z if batch_first else z.transpose(0, 1)
        for i, blk in enumerate(visual.transformer.resblocks):
            attn, mlp = vit.residual_branches(blk)
            x = x + self.attn_adapters[i](attn(x))
            x = x + self.mlp_adapters[i](mlp(x))
        return dict(z=x if batch_first else x.transpose(0, 1))
