"""Baselines on the same frozen open_clip backbone, sharing heads, data path and trainer:
``linear`` (probe), ``full`` (full fine-tuning of the visual tower), ``vpt`` (VPT-deep),
``lora`` (low-rank updates of the attention projections), ``adapter`` (bottleneck adapters after
attention and MLP), ``coop`` (learned text context through the frozen text tower)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import vit
from .base import Method, MethodConfig, register


def _frozen_encode(method: Method, images: Tensor) -> Dict:
    visual = method.visual
    z = vit.embed(visual, vit.patch_embed(visual, images))
    for layer in range(vit.num_layers(visual)):
        z = vit.block(visual, layer, z)
    return dict(z=z)


# ----------------------------------------------------------------------------------------------
@dataclass
class LinearConfig(MethodConfig):
    pass


@register("linear")
class LinearProbe(Method):
    """Frozen backbone; only the heads train."""
    config_class = LinearConfig

    def encode(self, images, maps=None, modality=None, return_attn=False):
        return _frozen_encode(self, images)


# ----------------------------------------------------------------------------------------------
@dataclass
class FullConfig(MethodConfig):
    pass


@register("full")
class FullFineTune(Method):
    """Every parameter of the visual tower trains (the text tower stays frozen)."""
    config_class = FullConfig

    def __init__(self, config):
        super().__init__(config)
        for p in self.visual.parameters():
            p.requires_grad_(True)

    def encode(self, images, maps=None, modality=None, return_attn=False):
        return _frozen_encode(self, images)


# ----------------------------------------------------------------------------------------------
@dataclass
class VPTConfig(MethodConfig):
    num_prompts: int = 10   # K learned tokens per layer


@register("vpt")
class VPTDeep(Method):
    """VPT-deep (Jia et al. 2022): K learned tokens inserted after the class token before every
    block; at each block the previous block's prompt outputs are dropped and replaced by that
    block's own prompts (official VPT). Prompts are removed before pooling."""
    config_class = VPTConfig

    def __init__(self, config):
        super().__init__(config)
        v = self.visual
        dim, layers = vit.width(v), vit.num_layers(v)
        patch = v.patch_size[0] * v.patch_size[1]
        bound = math.sqrt(6.0 / float(3 * patch + dim))  # the official VPT init
        self.prompts = nn.Parameter(torch.empty(layers, config.num_prompts, dim).uniform_(-bound, bound))

    def encode(self, images, maps=None, modality=None, return_attn=False):
        visual = self.visual
        z = vit.embed(visual, vit.patch_embed(visual, images))
        b, k = z.shape[0], self.config.num_prompts
        for layer in range(vit.num_layers(visual)):
            prompt = self.prompts[layer].unsqueeze(0).expand(b, -1, -1).to(z.dtype)
            rest = z[:, 1:] if layer == 0 else z[:, 1 + k:]
            z = vit.block(visual, layer, torch.cat([z[:, :1], prompt, rest], dim=1))
        return dict(z=torch.cat([z[:, :1], z[:, 1 + k:]], dim=1))


# ----------------------------------------------------------------------------------------------
@dataclass
class LoRAConfig(MethodConfig):
    rank: int = 8
    alpha: float = 8.0
    targets: Tuple[str, ...] = ("q", "v")  # any of q, k, v, o


class LoRAMultiheadAttention(nn.Module):
    """Wraps a frozen ``nn.MultiheadAttention``: W_x + (alpha / r) B_x A_x for each target
    projection x in (q, k, v, o); B starts at zero, so the wrapped layer starts unchanged."""

    def __init__(self, mha: nn.MultiheadAttention, rank: int, alpha: float, targets):
        super().__init__()
        bad = set(targets) - set("qkvo")
        if bad or not targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of q, k, v, o, got {targets!r}")
        self.mha, self.targets, self.scaling = mha, tuple(targets), alpha / rank
        d = mha.embed_dim
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for t in self.targets:
            a = torch.empty(rank, d)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[t] = nn.Parameter(a)
            self.lora_B[t] = nn.Parameter(torch.zeros(d, rank))

    @property
    def batch_first(self):
        return self.mha.batch_first

    def _delta(self, t: str) -> Optional[Tensor]:
        if t not in self.targets:
            return None
        return (self.lora_B[t] @ self.lora_A[t]) * self.scaling

    def forward(self, query, key, value, need_weights=False, attn_mask=None, **_):
        mha = self.mha
        w_in = mha.in_proj_weight
        d = mha.embed_dim
        deltas = [self._delta(t) for t in "qkv"]
        if any(x is not None for x in deltas):
            w_in = w_in + torch.cat([x if x is not None else w_in.new_zeros(d, d) for x in deltas])
        w_out = mha.out_proj.weight
        if "o" in self.targets:
            w_out = w_out + self._delta("o")
        if mha.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out, _ = F.multi_head_attention_forward(
            query, key, value, d, mha.num_heads, w_in, mha.in_proj_bias, None, None, False, 0.0,
            w_out, mha.out_proj.bias, training=self.training, need_weights=False, attn_mask=attn_mask)
        if mha.batch_first:
            out = out.transpose(0, 1)
        return out, None


@register("lora")
class LoRA(Method):
    """LoRA (Hu et al. 2022) of rank r on the attention projections of every block."""
    config_class = LoRAConfig

    def __init__(self, config):
        super().__init__(config)
        for blk in self.visual.transformer.resblocks:
            blk.attn = LoRAMultiheadAttention(blk.attn, config.rank, config.alpha, config.targets)

    def encode(self, images, maps=None, modality=None, return_attn=False):
        return _frozen_encode(self, images)


# ----------------------------------------------------------------------------------------------
@dataclass
class AdapterConfig(MethodConfig):
    bottleneck: int = 64


class Adapter(nn.Module):
    """Bottleneck adapter h -> h + up(GELU(down(h))); ``up`` starts at zero (identity at init)."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(F.gelu(self.down(h)))


@register("adapter")
class AdapterTuning(Method):
    """Houlsby-style adapters on the output of each attention and each MLP sub-layer, before the
    residual add, in every block."""
    config_class = AdapterConfig

    def __init__(self, config):
        super().__init__(config)
        dim, layers = vit.width(self.visual), vit.num_layers(self.visual)
        self.attn_adapters = nn.ModuleList(Adapter(dim, config.bottleneck) for _ in range(layers))
        self.mlp_adapters = nn.ModuleList(Adapter(dim, config.bottleneck) for _ in range(layers))

    def encode(self, images, maps=None, modality=None, return_attn=False):
        visual = self.visual
        batch_first = visual.transformer.batch_first
        z = vit.embed(visual, vit.patch_embed(visual, images))
        x = z if batch_first else z.transpose(0, 1)
        for i, blk in enumerate(visual.transformer.resblocks):
            x = x + self.attn_adapters[i](blk.ls_1(blk.attention(q_x=blk.ln_1(x))))
            x = x + self.mlp_adapters[i](blk.ls_2(blk.mlp(blk.ln_2(x))))
        return dict(z=x if batch_first else x.transpose(0, 1))


# ----------------------------------------------------------------------------------------------
@dataclass
class CoOpConfig(MethodConfig):
    num_context: int = 4
    class_names: Tuple[str, ...] = ("benign lesion", "malignant lesion")


@register("coop")
class CoOp(Method):
    """CoOp (Zhou et al. 2022): class prompts ``[ctx_1..ctx_M] <class name>.`` with learned
    context vectors through the frozen text tower; logits = logit_scale * cos(image, text).
    The segmentation decoder is the shared one."""
    config_class = CoOpConfig
    uses_linear_head = False

    def __init__(self, config):
        super().__init__(config)
        if len(config.class_names) != config.num_classes:
            raise ValueError(f"class_names needs num_classes={config.num_classes} names, got "
                             f"{len(config.class_names)}")
        clip = self.backbone
        tokenizer = open_clip.get_tokenizer(config.model_name)
        placeholder = " ".join(["X"] * config.num_context)
        tokens = tokenizer([f"{placeholder} {name}." for name in config.class_names])
        with torch.no_grad():
            embedded = clip.token_embedding(tokens)
        m = config.num_context
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + m:].clone(), persistent=False)
        self.context = nn.Parameter(torch.randn(m, embedded.shape[-1]) * 0.02)

    def text_features(self) -> Tensor:
        """Class text features [C, E], normalised."""
        clip = self.backbone
        c = self.prefix.shape[0]
        ctx = self.context.unsqueeze(0).expand(c, -1, -1)
        x = torch.cat([self.prefix, ctx, self.suffix], dim=1)
        x = x + clip.positional_embedding.to(x.dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = x[torch.arange(c, device=x.device), self.tokens.argmax(dim=-1)]  # end-of-text token
        x = x @ clip.text_projection if not isinstance(clip.text_projection, nn.Linear) \
            else clip.text_projection(x)
        return F.normalize(x, dim=-1)

    def encode(self, images, maps=None, modality=None, return_attn=False):
        return _frozen_encode(self, images)

    def classify(self, pooled: Tensor, features: Tensor) -> Tensor:
        scale = self.backbone.logit_scale.exp()
        return scale * F.normalize(features, dim=-1) @ self.text_features().t()
