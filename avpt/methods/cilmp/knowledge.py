"""CILMP's per-class knowledge states h_c [L_c, d_k], made offline.

Two sources:

* ``description_states``: the project's BI-RADS description texts of each class
  (``descriptions.py``) through the frozen open_clip text tower; h_c is the ``ln_final`` token
  states (before the text projection, so d_k = text width) of each description's words and its
  end-of-text token, descriptions concatenated in their listed order, the first ``length`` kept.
  The paper uses an LLM's token states of a class description (d_k = 4096); none were published.
* ``load_knowledge_dir``: user-supplied states, one safetensors file per class
  ``DIR/<class name>.safetensors`` holding one tensor [L_c, d_k] (key ``states``, or the file's
  only tensor) -- e.g. an LLM's hidden states.

``pad_states`` stacks them into h [C, T, d_k] (T = max L_c, zero padded) with the lengths.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...text_tower import encode_embedded, eot_positions, token_embedding

# the folder record ``avpt knowledge`` writes beside the states, and the source name of the
# default states (description texts through the frozen CLIP text tower)
META_FILE = "knowledge.json"
CLIP_TEXT_SOURCE = "CLIP-text"


@torch.no_grad()
def description_states(clip: nn.Module, tokenizer, texts: Dict[str, Sequence[str]],
                       class_names: Sequence[str], length: int) -> List[Tensor]:
    """h_c for each class in ``class_names``: [min(length, tokens available), W] in the
    tower's dtype.

    texts: class name -> its description texts. Each text is tokenised at the tower's context
    length; its states at positions 1..end-of-text are taken (the causal mask makes them the
    text's own, padding never reaches them)."""
    if length < 1:
        raise ValueError(f"knowledge_length must be >= 1, got {length}")
    states = []
    for name in class_names:
        if name not in texts or not len(texts[name]):
            raise ValueError(f"knowledge texts: no description text for class {name!r}; "
                             f"classes with texts: {sorted(texts)}")
        tokens = tokenizer(list(texts[name]))
        eot = eot_positions(tokens)
        _, tok = encode_embedded(clip, token_embedding(clip)(tokens), eot, return_tokens=True)
        parts = [tok[i, 1:int(eot[i]) + 1] for i in range(tok.shape[0])]
        states.append(torch.cat(parts, dim=0)[:length].clone())
    return states


def load_knowledge_dir(path: str, class_names: Sequence[str],
                       width: Optional[int] = None) -> List[Tensor]:
    """h_c [L_c, d_k] float32 from ``path/<class name>.safetensors`` for each class."""
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        raise FileNotFoundError(f"knowledge_dir={path!r} is not a folder (expected one "
                                f"<class name>.safetensors file per class)")
    states = []
    for name in class_names:
        file = os.path.join(path, f"{name}.safetensors")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"knowledge_dir={path!r} has no file for class {name!r} "
                                    f"(expected {file})")
        tensors = load_file(file)
        if "states" in tensors:
            h = tensors["states"]
        elif len(tensors) == 1:
            h = next(iter(tensors.values()))
        else:
            raise ValueError(f"{file}: expected a tensor 'states' or a single tensor, got keys "
                             f"{sorted(tensors)}")
        if h.dim() != 2 or h.shape[0] < 1 or not h.is_floating_point():
            raise ValueError(f"{file}: expected float states [L_c, d_k], got {h.dtype} "
                             f"{tuple(h.shape)}")
        if width is not None and h.shape[1] != width:
            raise ValueError(f"{file}: knowledge width {h.shape[1]} != knowledge_width={width}")
        states.append(h.float())
    widths = {h.shape[1] for h in states}
    if len(widths) != 1:
        raise ValueError(f"knowledge_dir={path!r}: classes have different widths {sorted(widths)}")
    return states


def states_hash(class_names: Sequence[str], states: Sequence[Tensor]) -> str:
    """sha256 (first 16 hex digits) of the states per class (names, shapes, float32 bytes)."""
    digest = hashlib.sha256()
    for name, h in zip(class_names, states):
        digest.update(f"{name}:{tuple(h.shape)};".encode())
        digest.update(h.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def pad_states(states: Sequence[Tensor]) -> Tuple[Tensor, List[int]]:
    """[L_c, d] per class -> (h [C, T, d] zero padded, T = max L_c; lengths [C])."""
    lengths = [int(h.shape[0]) for h in states]
    out = states[0].new_zeros(len(states), max(lengths), states[0].shape[1])
    for c, h in enumerate(states):
        out[c, :lengths[c]] = h
    return out, lengths


def knowledge_source(knowledge_dir: Optional[str]) -> str:
    """What CILMP's knowledge came from: "CLIP-text" (the description texts through the
    frozen CLIP text tower), the LM's name from ``knowledge.json``, or the folder's name."""
    if knowledge_dir is None:
        return CLIP_TEXT_SOURCE
    try:
        with open(os.path.join(knowledge_dir, META_FILE)) as f:
            return str(json.load(f)["model"])
    except (OSError, ValueError, KeyError, TypeError):
        return os.path.basename(os.path.normpath(knowledge_dir))



__all__ = ["description_states", "knowledge_source", "load_knowledge_dir", "pad_states", "states_hash",
           "CLIP_TEXT_SOURCE", "META_FILE"]
