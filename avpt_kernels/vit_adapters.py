"""Where the blocks of a vision transformer are: one ``ViTAdapter`` per model family (open_clip,
timm, Hugging Face ViT and CLIP vision), ``find_adapter`` and ``register_adapter`` (used by
``avpt_kernels.inject``)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from torch import nn

# ----------------------------------------------------------------------------------------------
# Adapters: where the blocks are, how wide, which token layout
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLayout:
    """How a block's tokens are laid out: ``batch_first`` ([B, T, D]) or sequence-first
    ([T, B, D]), and ``prefix_tokens``, the tokens before the patch tokens (class token first,
    then register tokens, if any)."""
    batch_first: bool
    prefix_tokens: int


@dataclass(frozen=True)
class ViTAdapter:
    """One model family: ``tower(module)`` is the module itself when it is the family's vision
    transformer, else None; ``blocks(tower)`` the block container (``nn.ModuleList`` or
    ``nn.Sequential``), ``dim(tower)`` the token width D, ``layout(tower)`` the ``TokenLayout``."""
    name: str
    tower: Callable[[nn.Module], Optional[nn.Module]]
    blocks: Callable[[nn.Module], nn.Module]
    dim: Callable[[nn.Module], int]
    layout: Callable[[nn.Module], TokenLayout]


def _instance_of(obj, module_name: str, class_name: str) -> bool:
    """isinstance against ``module_name.class_name`` without importing it: a model of a library
    that was never imported cannot be an instance of its classes (timm and transformers stay
    optional)."""
    cls = getattr(sys.modules.get(module_name), class_name, None)
    return cls is not None and isinstance(obj, cls)


def _first_attr(obj, *paths: str):
    for path in paths:
        cur = obj
        for part in path.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    raise ValueError(f"{type(obj).__name__} has none of the block lists {paths}: an unknown "
                     f"version of the library? register_adapter() one for it")


ADAPTERS: List[ViTAdapter] = []


def register_adapter(adapter: ViTAdapter) -> ViTAdapter:
    """Add a model family (tried before the built-in ones)."""
    if not isinstance(adapter, ViTAdapter):
        raise TypeError(f"adapter must be a ViTAdapter, got {type(adapter).__name__}")
    ADAPTERS.insert(0, adapter)
    return adapter


ADAPTERS.extend([
    ViTAdapter(  # open_clip VisionTransformer (CLIP.visual): transformer.resblocks
        "open_clip",
        lambda m: m if _instance_of(m, "open_clip.transformer", "VisionTransformer") else None,
        lambda t: t.transformer.resblocks,
        lambda t: t.transformer.width,
        lambda t: TokenLayout(bool(getattr(t.transformer, "batch_first", False)),
                              0 if getattr(t, "class_embedding", None) is None else 1)),
    ViTAdapter(  # timm VisionTransformer: blocks (nn.Sequential), batch-first
        "timm",
        lambda m: m if _instance_of(m, "timm.models.vision_transformer", "VisionTransformer")
        else None,
        lambda t: t.blocks,
        lambda t: t.embed_dim,
        lambda t: TokenLayout(True, int(t.num_prefix_tokens))),
    ViTAdapter(  # Hugging Face ViTModel: layers (transformers 5), encoder.layer (4.x, untested)
        "transformers-vit",
        lambda m: m if _instance_of(m, "transformers.models.vit.modeling_vit", "ViTModel")
        else None,
        lambda t: _first_attr(t, "layers", "encoder.layer"),
        lambda t: t.config.hidden_size,
        lambda t: TokenLayout(True, 1)),
    ViTAdapter(  # Hugging Face CLIPVisionModel / CLIPVisionTransformer: encoder.layers
        "transformers-clip",
        lambda m: m if (_instance_of(m, "transformers.models.clip.modeling_clip", "CLIPVisionModel")
                        or _instance_of(m, "transformers.models.clip.modeling_clip",
                                        "CLIPVisionTransformer")) else None,
        lambda t: _first_attr(t, "encoder.layers", "vision_model.encoder.layers"),
        lambda t: t.config.hidden_size,
        lambda t: TokenLayout(True, 1)),
])

# Where a vision tower sits inside a bigger model: open_clip CLIP.visual (TimmModel.trunk),
# transformers CLIPModel.vision_model, ViTForImageClassification.vit.
_TOWER_ATTRS = ("visual", "trunk", "vision_model", "vit")


def find_adapter(model: nn.Module) -> Tuple[ViTAdapter, nn.Module]:
    """(adapter, vision tower) for ``model`` or the tower inside it (``model.visual``,
    ``.vision_model``, ``.vit``, ``.visual.trunk``); ValueError naming the families otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (an open_clip, timm or Hugging Face ViT), "
                        f"got {type(model).__name__}")
    frontier = [model]
    for _ in range(3):
        for module in frontier:
            for adapter in ADAPTERS:
                tower = adapter.tower(module)
                if tower is not None:
                    return adapter, tower
        frontier = [getattr(m, a) for m in frontier for a in _TOWER_ATTRS
                    if isinstance(getattr(m, a, None), nn.Module)]
    raise ValueError(f"model must be a vision transformer of a known family "
                     f"({', '.join(a.name for a in ADAPTERS)}) or contain one as "
                     f"{'/'.join(_TOWER_ATTRS)}; got {type(model).__name__} (wrap blocks with "
                     f"PIMBlock yourself, or register_adapter() one)")
