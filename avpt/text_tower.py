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
    """End-of-text position of each tokenised prompt: tokens [N, S] -> [N] int64, the last
    non-padding (non-zero) token: open_clip's end-of-text (its largest id, padded with 0 after)
    and a Hugging Face BERT tokenizer's [SEP] (pad id 0) alike."""
    columns = torch.arange(tokens.shape[-1], device=tokens.device)
    return torch.where(tokens != 0, columns, torch.zeros_like(columns)).amax(dim=-1)


def is_hf_text(clip: nn.Module) -> bool:
    """Whether ``clip``'s text tower is open_clip's Hugging Face adapter (``clip.text``,
    e.g. BiomedCLIP's PubMedBERT) rather than its own TextTransformer."""
    text = getattr(clip, "text", None)
    return text is not None and hasattr(text, "transformer") and hasattr(text, "pooler")


def _own_text(clip: nn.Module) -> nn.Module:
    """Where open_clip's own text tower keeps its parts: the CLIP model itself, or
    ``clip.text`` (a TextTransformer) in a CustomTextCLIP."""
    return clip.text if hasattr(getattr(clip, "text", None), "token_embedding") else clip


def token_embedding(clip: nn.Module) -> nn.Embedding:
    """The text tower's token embedding (ids -> [.., W]), for either kind of text tower."""
    return clip.text.transformer.get_input_embeddings() if is_hf_text(clip) \
        else _own_text(clip).token_embedding


def text_width(clip: nn.Module) -> int:
    """W, the width of the text tower's tokens."""
    return token_embedding(clip).weight.shape[1]


def text_embed_dim(clip: nn.Module) -> int:
    """E, the width of the projected text features (the joint image-text space)."""
    if is_hf_text(clip):
        return int(clip.text.output_dim)
    proj = _own_text(clip).text_projection
    return proj.shape[1] if isinstance(proj, Tensor) else proj.out_features


def _hf_layers(text: nn.Module) -> nn.ModuleList:
    from open_clip.hf_configs import arch_dict

    model = text.transformer
    encoder = getattr(model, "encoder", model)
    attr = arch_dict.get(text.config.model_type, {}).get("config_names", {}).get("layer_attr",
                                                                                 "layer")
    return getattr(encoder, attr)


def text_layers(clip: nn.Module) -> int:
    """Number of blocks of the text tower."""
    return len(_hf_layers(clip.text)) if is_hf_text(clip) \
        else len(_own_text(clip).transformer.resblocks)


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
    if is_hf_text(clip):
        features, tokens = _encode_embedded_hf(clip.text, embedded[:, :length], eot, layer_hook)
        return (features, tokens) if return_tokens else features
    clip = _own_text(clip)
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


def _encode_embedded_hf(text: nn.Module, embedded: Tensor, eot: Tensor,
                        layer_hook: Optional[LayerHook]) -> Tuple[Tensor, Tensor]:
    """``encode_embedded`` through open_clip's HFTextEncoder (e.g. BERT): the model's own
    embeddings (positions, token types, norm) on ``embedded`` [N, S, W], attention masked after
    each prompt's end (as HFTextEncoder masks padding), then its pooler and projection.
    ``layer_hook`` runs as a forward pre-hook of layers i >= 1. -> ([N, E], tokens [N, S, W]).
    The cut after the longest end is exact: padded keys are masked, positions are absolute."""
    columns = torch.arange(embedded.shape[1], device=embedded.device)
    mask = (columns[None, :] <= eot[:, None]).long()                           # [N, S]
    handles = []
    if layer_hook is not None:
        for i, layer in enumerate(_hf_layers(text)):
            if i > 0:
                def hook(module, args, kwargs, i=i):
                    if args:
                        return (layer_hook(i, args[0]),) + tuple(args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": layer_hook(i, kwargs["hidden_states"])}
                handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        out = text.transformer(inputs_embeds=embedded, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return text.proj(text.pooler(out, mask)), out.last_hidden_state


__all__ = ["eot_positions", "prompt_length", "encode_embedded", "is_hf_text", "token_embedding",
           "text_width", "text_embed_dim", "text_layers"]
