"""What every method shares: the config base class, the output record, the frozen backbone with
the task heads, and the registry by name (PEFT-style: config dataclass + module + name)."""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Type

from torch import Tensor, nn

from .. import vit
from ..backbone import VIT_B16, load_backbone
from ..heads import ClassificationHead, SegDecoder


@dataclass
class MethodConfig:
    """Fields every method has. ``pretrained``: local open_clip checkpoint path or None (random
    weights, with a warning)."""
    model_name: str = VIT_B16
    pretrained: Optional[str] = None
    quick_gelu: bool = False
    num_classes: int = 2
    seg: bool = True          # build the segmentation decoder (Eq. 15)
    seg_hidden: int = 32
    lambda_seg: float = 1.0   # weight of L_SEG in Eq. 17 (all methods train CLS + SEG)
    seg_bce_weight: float = 1.0  # beta of Eq. 15

    def to_dict(self) -> Dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Dict) -> "MethodConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        fixed = {}
        for k, v in values.items():
            default = names[k].default if names[k].default is not dataclasses.MISSING else None
            if names[k].default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = names[k].default_factory()  # type: ignore[misc]
            fixed[k] = tuple(v) if isinstance(v, list) and isinstance(default, tuple) else v
        return cls(**fixed)


@dataclass
class MethodOutput:
    """What a method's forward returns. logits [B, C]; seg_logits [B, 1, H, W] or None;
    features [B, E] (= encode_image for an unchanged backbone); pooled [B, D] (ln_post class
    token); tokens [B, N, D] (ln_post patch tokens). A-VPT also fills region_emb [B, R, D],
    prompts [L_inj, B, K, D], maps [B, R, h, w] and, on request, attn (one [B, H, K, T] per
    injected layer)."""
    logits: Optional[Tensor]
    seg_logits: Optional[Tensor]
    features: Tensor
    pooled: Tensor
    tokens: Tensor
    region_emb: Optional[Tensor] = None
    prompts: Optional[Tensor] = None
    maps: Optional[Tensor] = None
    attn: Optional[List[Tensor]] = None


class Method(nn.Module):
    """A frozen open_clip backbone plus heads. Subclasses implement ``encode`` (images ->
    final tokens [B, T, D] and extras) and decide what is trainable."""

    name = ""
    config_class: Type[MethodConfig] = MethodConfig

    def __init__(self, config: MethodConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config
        self.backbone = load_backbone(config.model_name, config.pretrained, config.quick_gelu)
        width = vit.width(self.visual)
        self.head = ClassificationHead(width, config.num_classes) if self.uses_linear_head else None
        self.seg_decoder = SegDecoder(width, config.seg_hidden) if config.seg else None

    uses_linear_head = True

    @property
    def visual(self) -> nn.Module:
        return self.backbone.visual

    def train(self, mode: bool = True):
        """The backbone always stays in eval mode (dropout off), trainable or not."""
        super().train(mode)
        self.backbone.eval()
        return self

    def encode(self, images: Tensor, maps=None, modality=None, return_attn: bool = False) -> Dict:
        """-> dict with ``z`` (final tokens [B, T, D], batch-first) and optional extras."""
        raise NotImplementedError

    def classify(self, pooled: Tensor, features: Tensor) -> Tensor:
        return self.head(pooled)

    def forward(self, images: Tensor, maps: Optional[Tensor] = None, modality=None,
                return_attn: bool = False) -> MethodOutput:
        vit.check_images(self.visual, images)
        extras = self.encode(images, maps=maps, modality=modality, return_attn=return_attn)
        pooled, tokens, features = vit.pool(self.visual, extras.pop("z"))
        seg = None
        if self.seg_decoder is not None:
            seg = self.seg_decoder(tokens, self.visual.grid_size, tuple(images.shape[2:]))
        return MethodOutput(logits=self.classify(pooled, features), seg_logits=seg,
                            features=features, pooled=pooled, tokens=tokens, **extras)

    def trainable_state_dict(self) -> Dict[str, Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
_REGISTRY: Dict[str, Type[Method]] = {}
# Modules whose import registers methods (imported lazily: avpt.model imports this file).
_PROVIDERS = ("avpt.methods.baselines", "avpt.model")


def register(name: str):
    """Class decorator: make a ``Method`` subclass buildable by ``name``."""
    def wrap(cls: Type[Method]) -> Type[Method]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def _ensure_registered() -> None:
    for module in _PROVIDERS:
        importlib.import_module(module)


def method_names() -> List[str]:
    _ensure_registered()
    return list(_REGISTRY)


def get_method_class(name: str) -> Type[Method]:
    _ensure_registered()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {list(_REGISTRY)}")
    return _REGISTRY[name]


def get_config_class(name: str) -> Type[MethodConfig]:
    return get_method_class(name).config_class


def build_method(name: str, config: Optional[MethodConfig] = None, **overrides) -> Method:
    """``build_method("avpt", model_name="avpt-tiny", num_classes=3)``: the method ``name`` with
    its config (defaults, updated by ``overrides``)."""
    cls = get_method_class(name)
    if config is None:
        config = cls.config_class(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return cls(config)


__all__ = ["MethodConfig", "MethodOutput", "Method", "register", "build_method", "method_names",
           "get_method_class", "get_config_class"]
