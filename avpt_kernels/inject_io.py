"""Saving and loading what ``inject_pim`` added: ``pim_state_dict`` / ``load_pim_state_dict``
(the added weights only, safetensors, PEFT style) and, for Hugging Face models, whose
``from_pretrained`` rebuilds a model without PIM blocks, ``save_pim_pretrained`` /
``load_pim_pretrained`` (the base model by its own ``save_pretrained`` plus ``pim.safetensors``
beside it, re-injected with the saved settings on load)."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

from ._files import check_regular_target, write_bytes_atomic
from .inject import _pim_blocks, _refuse_save_pretrained, inject_pim

_FORMAT = "avpt-pim"
PIM_FILE = "pim.safetensors"
# Buffers every PIMBlock has that are no weights: kept out of the added weights' files (the
# settings travel in the file's metadata there).
_NOT_WEIGHTS = ("pim_settings",)


def _added(model: nn.Module) -> Dict[str, Tensor]:
    """Name -> tensor of what the PIMBlocks added (PIM weights, prompts, a prompt module's
    state), each tensor once (shared modules under their first name)."""
    found = _pim_blocks(model)
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no PIMBlock: call inject_pim first")
    out, seen = {}, set()
    for name, blk in found:
        for key, t in blk.state_dict(keep_vars=True).items():
            if key.startswith("block.") or key in _NOT_WEIGHTS or id(t) in seen:
                continue
            seen.add(id(t))
            out[f"{name}.{key}" if name else key] = t
    return out


def pim_state_dict(model: nn.Module, path: Optional[Union[str, os.PathLike]] = None
                   ) -> Dict[str, Tensor]:
    """The added weights only (detached): ``{"<block path>.pim.packed": [N], "<block
    path>.prompts": [K, D], ...}``. With ``path``, also written there as safetensors, with
    each block's settings in the metadata: the whole file or none (a temporary file beside it,
    renamed), never over something that is not a regular file; a failed write is one
    ``OSError`` line naming ``path``."""
    state = {k: t.detach() for k, t in _added(model).items()}
    if path is not None:
        from safetensors.torch import save

        check_regular_target(path)
        blocks = {n: b.config() for n, b in _pim_blocks(model)}
        meta = {"format": _FORMAT, "blocks": json.dumps(blocks)}
        write_bytes_atomic(path, save({k: t.cpu().contiguous() for k, t in state.items()},
                                      metadata=meta))
    return state


def _read_pim_file(path: str):
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"state: {path!r} is not a file (a pim_state_dict "
                                f"safetensors file)")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != _FORMAT:
        raise ValueError(f"state: {path!r} is not a pim_state_dict file (metadata format "
                         f"{meta.get('format')!r}, expected {_FORMAT!r})")
    return load_file(path), meta


def load_pim_state_dict(model: nn.Module,
                        state: Union[Dict[str, Tensor], str, os.PathLike]) -> nn.Module:
    """Load ``pim_state_dict`` output (a dict, or the path of the safetensors file) into a model
    injected the same way: the same keys and shapes (and, from a file, the same block
    settings, ``t2p_reduce`` included), else a ValueError naming them. Returns the model."""
    meta = None
    if isinstance(state, (str, os.PathLike)):
        state, meta = _read_pim_file(os.fspath(state))
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensors or a safetensors path, got "
                        f"{type(state).__name__}")
    target = _added(model)
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    if missing or unexpected:
        raise ValueError(f"state does not match the model's PIMBlocks: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]} (inject_pim with the same layers first)")
    if meta is not None:
        saved = json.loads(meta.get("blocks", "{}"))
        for name, blk in _pim_blocks(model):
            if name in saved and saved[name] != blk.config():
                raise ValueError(f"state: block {name!r} was saved with {saved[name]}, the model "
                                 f"has {blk.config()}")
    for key, t in target.items():
        if tuple(state[key].shape) != tuple(t.shape):
            raise ValueError(f"state[{key!r}] has shape {tuple(state[key].shape)}, the model's "
                             f"is {tuple(t.shape)}")
    with torch.no_grad():
        for key, t in target.items():
            t.copy_(state[key])
    return model


def _hf_model(model: nn.Module) -> nn.Module:
    if not callable(getattr(type(model), "save_pretrained", None)) or \
            not callable(getattr(type(model), "from_pretrained", None)):
        raise TypeError(f"model must be a Hugging Face model (save_pretrained / from_pretrained), "
                        f"got {type(model).__name__}; use pim_state_dict(model, path)")
    return model


def save_pim_pretrained(model: nn.Module, directory: Union[str, os.PathLike], **kwargs) -> str:
    """Save an injected Hugging Face model so that ``load_pim_pretrained`` rebuilds it: the base
    model by its own ``save_pretrained(directory, **kwargs)`` (the PIM blocks are taken out for
    it and put back: the files are those of the model without PIM) and ``DIR/pim.safetensors``
    (``pim_state_dict``, with every block's settings). Blocks must have learned prompts or
    prompts=None (a callable cannot be saved). Returns ``directory``."""
    _hf_model(model)
    found = _pim_blocks(model)
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no PIMBlock: use its own "
                         f"save_pretrained")
    odd = [n for n, b in found if b.prompt_kind not in ("learned", "none")]
    if odd:
        raise ValueError(f"blocks {odd} have {found[0][1].prompt_kind} prompts, which a file "
                         f"cannot rebuild: save with pim_state_dict(model, path) and re-inject "
                         f"with the same prompts")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    parents = []
    for name, blk in found:  # the plain model for save_pretrained
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parents.append((parent, child, blk))
        setattr(parent, child, blk.block)
    guard = model.__dict__.pop("save_pretrained", None)
    try:
        type(model).save_pretrained(model, directory, **kwargs)
    finally:
        if guard is _refuse_save_pretrained:
            model.__dict__["save_pretrained"] = guard
        for parent, child, blk in parents:
            setattr(parent, child, blk)
    pim_state_dict(model, os.path.join(directory, PIM_FILE))
    return directory


def load_pim_pretrained(model_class, directory: Union[str, os.PathLike], backend=None,
                        freeze_base: bool = False, **kwargs) -> nn.Module:
    """``model_class.from_pretrained(directory, **kwargs)``, then ``inject_pim`` with the settings
    ``save_pim_pretrained`` stored and the PIM weights loaded: the saved model, PIM included."""
    path = os.path.join(os.fspath(directory), PIM_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {os.fspath(directory)!r} was not saved by "
                                f"save_pim_pretrained (load it with from_pretrained)")
    state, meta = _read_pim_file(path)
    blocks = list(json.loads(meta.get("blocks", "{}")).values())
    first = blocks[0]
    keys = ("dim", "num_heads", "head_dim", "gate_hidden", "t2p_reduce", "prompts", "num_prompts")
    if any({k: b[k] for k in keys} != {k: first[k] for k in keys} for b in blocks):
        raise ValueError(f"{path}: the blocks were injected with different settings; rebuild "
                         f"them with inject_pim per layer and load_pim_state_dict")
    model = model_class.from_pretrained(os.fspath(directory), **kwargs)
    inject_pim(model, [b["layer"] for b in blocks], num_prompts=first["num_prompts"] or 1,
               num_heads=first["num_heads"], head_dim=first["head_dim"],
               gate_hidden=first["gate_hidden"],
               prompts="learned" if first["prompts"] == "learned" else None,
               t2p_reduce=first["t2p_reduce"], freeze_base=freeze_base, backend=backend)
    return load_pim_state_dict(model, path)
