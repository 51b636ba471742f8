"""Full fine-tuning: every parameter of the visual tower trains (the text tower stays frozen)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, MethodConfig, frozen_encode, register


@dataclass
class FullConfig(MethodConfig):
    pass


@register("full")
class FullFineTune(Method):
    """Every parameter of the visual tower trains (the text tower stays frozen)."""
    display_name = "full fine-tuning"
    config_class = FullConfig

    def __init__(self, config):
        super().__init__(config)
        for p in self.visual.parameters():
            p.requires_grad_(True)

    def encode(self, images, maps=None, modality=None, return_attn=False):
        return frozen_encode(self, images)
