"""Save and load only the trainable state (safetensors) plus the method's config, PEFT-style.

A directory holds ``avpt_config.json`` (method name + config) and ``trainable.safetensors``
(every parameter with requires_grad, by its name in the method). ``load_trainable`` builds a
fresh method on a fresh backbone (weights from ``pretrained``, by default the saved path) and
loads the trainable tensors into it, checking that exactly those tensors are present.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file, save_file

from .methods.base import Method, build_method, get_config_class

CONFIG_FILE = "avpt_config.json"
WEIGHTS_FILE = "trainable.safetensors"
_KEEP = object()


def save_trainable(method: Method, directory: Union[str, os.PathLike]) -> Path:
    """Write the trainable tensors and the config of ``method`` under ``directory``."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in method.trainable_state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"method": method.name})
    with open(path / CONFIG_FILE, "w") as f:
        json.dump({"method": method.name, "config": method.config.to_dict()}, f, indent=2)
    return path


def load_trainable(directory: Union[str, os.PathLike], pretrained=_KEEP,
                   map_location: str = "cpu") -> Method:
    """Rebuild the saved method on a fresh backbone and load its trainable tensors.

    ``pretrained``: backbone weights for the fresh backbone (default: the saved path; None for
    random weights)."""
    path = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: expected a directory written by "
                                    f"save_trainable ({CONFIG_FILE} + {WEIGHTS_FILE})")
    with open(path / CONFIG_FILE) as f:
        saved = json.load(f)
    config = get_config_class(saved["method"]).from_dict(saved["config"])
    if pretrained is not _KEEP:
        config.pretrained = pretrained
    method = build_method(saved["method"], config)
    state = load_file(str(path / WEIGHTS_FILE), device=map_location)
    params = dict(method.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match method {saved['method']!r}: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{name}: saved shape {tuple(tensor.shape)} != model shape "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)
    return method
