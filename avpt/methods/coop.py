"""CoOp (Zhou et al. 2022): learned text context through the frozen text tower."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avpt.recipes import dassl_recipe

from ..local_backbone import get_tokenizer
from ..text_tower import encode_embedded, eot_positions, prompt_length, token_embedding
from .base import Method, MethodConfig, frozen_encode, register


@dataclass
class CoOpConfig(MethodConfig):
    """``num_context`` M learned context tokens; ``context_init``: the words they start from
    (CoOp's default, "a photo of a": M = 4, as many tokens as the words have), or "" for M
    random vectors N(0, 0.02^2) (CoOp's 16-token setting: ``num_context: 16, context_init:
    ""``). ``class_names``: one per class (set from the data's classes when not given)."""
    num_context: int = 4
    context_init: str = "a photo of a"
    class_names: Tuple[str, ...] = ("benign lesion", "malignant lesion")


@register("coop")
class CoOp(Method):
    """CoOp (Zhou et al. 2022): class prompts ``[ctx_1..ctx_M] <class name>.`` with learned
    context vectors through the frozen text tower; logits = logit_scale * cos(image, text).
    The segmentation decoder is the shared one."""
    display_name = "CoOp"
    config_class = CoOpConfig
    # KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16.yaml (16 shots; PREC fp16 in its train.py)
    reference_recipe = dassl_recipe("CoOp's authors: configs/trainers/CoOp/vit_b16.yaml (Dassl)",
                                    lr=0.002, epochs=200, batch_size=32, flip=True, amp="fp16")
    uses_linear_head = False

    def __init__(self, config):
        super().__init__(config)
        if len(config.class_names) != config.num_classes:
            raise ValueError(f"class_names needs num_classes={config.num_classes} names, got "
                             f"{len(config.class_names)}")
        clip = self.backbone
        tokenizer = get_tokenizer(config.model_name)
        placeholder = " ".join(["X"] * config.num_context)
        tokens = tokenizer([f"{placeholder} {name}." for name in config.class_names])
        with torch.no_grad():
            embedded = token_embedding(clip)(tokens)
        m = config.num_context
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("eot", eot_positions(tokens), persistent=False)
        self.prompt_length = prompt_length(tokens)  # int: the cut needs no host sync
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + m:].clone(), persistent=False)
        self.context = nn.Parameter(self._initial_context(tokenizer, m, embedded.shape[-1]))

    def _initial_context(self, tokenizer, m: int, width: int) -> Tensor:
        """[M, width]: the token embeddings of ``context_init`` (which must be M tokens), or
        N(0, 0.02^2) when it is ""."""
        init = self.config.context_init
        if not init:
            return torch.randn(m, width) * 0.02
        tokens = tokenizer([init])
        n = int(eot_positions(tokens)[0]) - 1  # tokens between start- and end-of-text
        if n != m:
            raise ValueError(f"context_init={init!r} is {n} tokens; num_context={m} expected "
                             f"(or context_init='' for random context)")
        with torch.no_grad():
            return token_embedding(self.backbone)(tokens)[0, 1:1 + m].clone()

    def text_features(self) -> Tensor:
        """Class text features [C, E], normalised."""
        clip = self.backbone
        c = self.prefix.shape[0]
        ctx = self.context.unsqueeze(0).expand(c, -1, -1)
        x = torch.cat([self.prefix, ctx, self.suffix], dim=1)
        return F.normalize(encode_embedded(clip, x, self.eot, self.prompt_length), dim=-1)

    def encode(self, images, maps=None, modality=None, return_attn=False):
        return frozen_encode(self, images)

    def classify(self, pooled: Tensor, features: Tensor) -> Tensor:
        scale = self.backbone.logit_scale.exp()
        return scale * F.normalize(features, dim=-1) @ self.text_features().t()
