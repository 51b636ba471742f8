"""Linear probe: the frozen backbone; only the heads train."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, MethodConfig, frozen_encode, register


@dataclass
class LinearConfig(MethodConfig):
    pass


@register("linear")
class LinearProbe(Method):
    """Frozen backbone; only the heads train."""
    display_name = "linear probe"
    config_class = LinearConfig

    def encode(self, images, maps=None, modality=None, return_attn=False):
        return frozen_encode(self, images)
