"""The frozen open_clip backbone shared by every method.

``load_backbone("ViT-B-16", pretrained="/path/open_clip_model.safetensors")`` builds the open_clip
CLIP model, loads weights from a LOCAL file only (nothing is ever downloaded), freezes every
parameter and keeps it in eval mode (dropout off). Without a path the weights are random and one
warning says so: results are meaningless without pretrained weights.

``TINY_MODEL`` ("avpt-tiny": width 64, 4 layers, 4 heads, patch 16, image 64; text width 32,
2 layers) is registered with open_clip at import, for CPU tests; ``TINY_P8_MODEL``
("avpt-tiny-p8": the same with patch 8, an 8x8 token grid) for the CPU demo, whose lesions span
one or two 16-pixel patches (a tiny ViT at patch 16 does not learn the phantom's malignancy
signs: supervised, held-out AUC about 0.55 against 0.67-0.73 at patch 8).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import open_clip
from torch import nn

TINY_MODEL = "avpt-tiny"
TINY_P8_MODEL = "avpt-tiny-p8"
VIT_B16 = "ViT-B-16"
# the short names the CLI takes for --backbone (any open_clip config name is taken as it is)
BACKBONE_ALIASES = {"tiny": TINY_MODEL, "tiny-p8": TINY_P8_MODEL, "vit-b-16": VIT_B16,
                    "vit-b/16": VIT_B16, "vitb16": VIT_B16}
_CONFIG_DIR = Path(__file__).with_name("model_configs")

for _name in (TINY_MODEL, TINY_P8_MODEL):
    if _name not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR / f"{_name}.json")

_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
_warned_random = False


class RandomWeightsWarning(UserWarning):
    """The backbone has random weights: any result computed with it is meaningless."""


def _check_pretrained(pretrained) -> str:
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained must be a path to a local open_clip checkpoint "
                        f"({', '.join(_WEIGHT_SUFFIXES)}) or None, got {type(pretrained).__name__}")
    path = os.fspath(pretrained)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrained={path!r} is not a file. Give the path of a local open_clip checkpoint "
            f"({', '.join(_WEIGHT_SUFFIXES)}); nothing is downloaded, so pretrained tags such as "
            f"'openai' or 'laion2b_s34b_b88k' are not accepted")
    if not path.endswith(_WEIGHT_SUFFIXES):
        raise ValueError(f"pretrained={path!r}: expected a file ending in {_WEIGHT_SUFFIXES}")
    return path


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode (dropout off) for every parameter of ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_backbone(model_name: str = VIT_B16, pretrained: Optional[str] = None,
                  quick_gelu: bool = False, device="cpu") -> nn.Module:
    """The frozen open_clip CLIP model ``model_name`` (``.visual`` is the ViT, the text tower is
    the rest), weights from the local file ``pretrained`` or random (with one warning).

    ``quick_gelu=True`` for checkpoints trained with QuickGELU (the OpenAI ones).
    """
    from .local_backbone import create_local_model, is_local_dir, weights_file

    if is_local_dir(model_name):  # open_clip's folder layout (BiomedCLIP): weights from the folder
        if pretrained is not None:
            raise ValueError(f"pretrained={pretrained!r}: a local-dir: backbone takes its weights "
                             f"from its folder; leave --pretrained out")
        model = create_local_model(model_name, quick_gelu=quick_gelu, device=device)
        if weights_file(model_name) is None:
            _warn_random(model_name)
        return freeze(model)
    if model_name not in open_clip.list_models():
        raise ValueError(f"model_name={model_name!r} is not an open_clip config; expected one of "
                         f"{VIT_B16!r}, {TINY_MODEL!r}, {TINY_P8_MODEL!r} or another name in open_clip.list_models()")
    path = _check_pretrained(pretrained) if pretrained is not None else None
    model = open_clip.create_model(model_name, pretrained=path, force_quick_gelu=quick_gelu,
                                   device=device)
    if path is None:
        _warn_random(model_name)
    return freeze(model)


def _warn_random(model_name: str) -> None:
    global _warned_random
    if _warned_random:
        return
    _warned_random = True
    warnings.warn(
        f"open_clip {model_name!r} has RANDOM weights (no pretrained path given): results are "
        f"meaningless without pretrained weights. Pass pretrained='/path/to/open_clip_model."
        f"safetensors' (nothing is downloaded).", RandomWeightsWarning, stacklevel=3)


def visual_param_count(clip_model: nn.Module) -> int:
    """Number of parameters of the visual tower (the denominator of the trainable share)."""
    return sum(p.numel() for p in clip_model.visual.parameters())


def state_dict_mismatch(text: str) -> str:
    """torch's multi-line load_state_dict error in one line: how many keys were missing,
    unexpected or of another shape, with the first of each."""
    import re

    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*?)\.?\s*$"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.?\s*$")):
        for line in text.splitlines():
            m = re.search(pattern, line.strip())
            if m:
                keys = re.findall(r'"([^"]+)"', m.group(1))
                parts.append(f"{len(keys)} {label} keys (e.g. {keys[0]!r})" if keys else label)
    shapes = [line.strip() for line in text.splitlines() if "size mismatch" in line]
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({shapes[0][:120]})")
    return ", ".join(parts) or (text.strip().splitlines() or ["does not load"])[0][:200]
