"""The frozen open_clip text tower run on embedded prompts: what CoOp, CILMP and BiomedAP share.

Prompt-tuning methods build token embeddings themselves (learned context vectors, knowledge
tokens) and need the text tower from there on, sometimes overwriting positions before each
block (deep text prompts). ``encode_embedded`` does that, and cuts every sequence after the
longest end-of-text position: under the causal mask no position attends to a later one, so the
features at and before each end-of-text token are unchanged (exact), and the tower runs on
``length`` columns instead of the full context (16 for avpt-tiny, 77 for ViT-B/16).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

LayerHook = Callable[[int, Tensor], Tensor]


def eot_positions(tokens: Tensor) -> Tensor:
    """End-of-text position of each tokenised prompt: tokens [N, S] (open_clip tokenizer ids,
    where end-of-text has the largest id) -> [N] int64."""
    return tokens.argmax(dim=-1)


def prompt_length(tokens: Tensor) -> int:
    """Columns the text tower needs for these prompts: 1 + the longest end-of-text position.
    Computed once, when the prompts are built, so the forward makes no host sync."""
    return int(eot_positions(tokens).max()) + 1


def _project(clip: nn.Module, x: Tensor) -> Tensor:
    proj = clip.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def encode_embedded(clip: nn.Module, embedded: Tensor, eot: Tensor, length: Optional[int] = None,
                    layer_hook: Optional[LayerHook] = None,
                    return_tokens: bool = False) -> Tensor | Tuple[Tensor, Tensor]:
    """Text features of embedded prompts through the open_clip text tower of ``clip``.

    embedded: [N, S, W]  token embeddings (``clip.token_embedding`` output or learned vectors),
                         positional embedding not yet added; S <= context length.
    eot:      [N]        end-of-text position of each prompt (``eot_positions``).
    length:   columns to keep (``prompt_length``; None keeps S): the cut is exact.
    layer_hook(i, x) -> x: called before block i >= 1 with the tokens [N, length, W], to
                         overwrite deep-prompt positions (block 0 sees ``embedded`` as given).
    returns:  features [N, E] (projected, not normalised); with ``return_tokens`` also the
              ln_final tokens [N, length, W].
    """
    n, s, _ = embedded.shape
    length = s if length is None else length
    if not 0 < length <= s:
        raise ValueError(f"length must be in [1, {s}] for prompts of {s} tokens, got {length}")
    x = embedded[:, :length] + clip.positional_embedding[:length].to(embedded.dtype)
    mask = clip.attn_mask
    mask = mask[:length, :length] if mask is not None else None
    transformer = clip.transformer
    if not getattr(transformer, "batch_first", True):
        raise ValueError("encode_embedded needs an open_clip text transformer with batch_first=True")
    for i, block in enumerate(transformer.resblocks):
        if i > 0 and layer_hook is not None:
            x = layer_hook(i, x)
        x = block(x, attn_mask=mask)
    tokens = clip.ln_final(x)
    features = _project(clip, tokens[torch.arange(n, device=tokens.device), eot])
    return (features, tokens) if return_tokens else features


__all__ = ["eot_positions", "prompt_length", "encode_embedded"]
