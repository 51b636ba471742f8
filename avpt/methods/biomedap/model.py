"""BiomedAP: vision-informed dual-anchor prompt tuning with gated cross-modal fusion (issue 15;
paper "BiomedAP", code github tongdiedie/BiomedAP), on the shared frozen open_clip backbone.

* Text: CoOp (``coop``) with M = 4 context vectors initialised from "a {modality} photo of a"
  in the template "a {modality} photo of a {class} in the breast." (the context overwrites the
  template's first M tokens, as the reference code does), through the frozen text tower cut
  after the longest end-of-text (``avpt.text_tower.encode_embedded``).
* Visual: K = 4 prompt tokens overwrite patch tokens 1..K before every block (zeros: not
  trained). Before each fusion block i (default the authors' code's {5, 8} of 12 blocks, scaled to the
  depth) the prompt positions get V_out of ``GatedCrossModalFusion(V, T = ctx)``. V is the
  authors' code feeds zeros (``fusion_input="code"``, the default: one constant for every image,
  computed once per step and broadcast); ``"image-tokens"`` is our reading of the abstract's
  "vision-informed" (the image's own tokens at those positions).
* Loss (``make_loss``): CE + l_h |t^ - a_high| + l_kl KL(p_zs || p)/(B C) + l_l |t^ - a_low|
  + l_a (1 - cos(mean T_out, mean ctx)) (+ lambda_seg SEG), see ``loss.loss_terms``.
  a_high: normalised mean of the per-class description features (``avpt.methods.cilmp.descriptions``);
  a_low: the bare class-name text (``low_anchor="code"``, the default, as the authors' code
  does) or, our reading of the abstract's "few-shot visual evidence", visual prototypes
  (``"visual-prototypes"``: per class the normalised mean of the frozen, normalised image
  features of that class's training images, computed by ``prepare`` before training at every
  start).

The forward returns a ``BiomedAPOutput`` (a ``MethodOutput`` with ``text_features`` [C, E] and
``text_out`` [L_f, B, M, d_t]), so the loss reads everything from this forward's output: the
alignment term is this rank's own under DDP, never a value cached on a module.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avpt.recipes import dassl_recipe

from ... import vit
from ...data import GENERIC_MODALITY_WORD
from ...local_backbone import get_tokenizer, is_local_dir, tower_sizes
from ...text_tower import encode_embedded, eot_positions, prompt_length, text_width, token_embedding
from ..base import register, unaugmented_batches
from ..base import frozen_encode as _frozen_encode
from ..cilmp.descriptions import descriptions_for, texts_hash
from ..coop import CoOp
from .config import (_LEGACY, FUSION_INPUTS, LOW_ANCHORS, BiomedAPConfig, BiomedAPOutput,
                     resolve_fusion_layers)
from .fusion import GatedCrossModalFusion
from .loss import BiomedAPLoss


def _check_config(c: BiomedAPConfig) -> Tuple[int, ...]:
    """Every argument error before any work (one line each); returns the fusion layers."""
    if len(c.class_names) != c.num_classes:
        raise ValueError(f"class_names needs num_classes={c.num_classes} names, got "
                         f"{len(c.class_names)}")
    for name, legacy in _LEGACY.items():
        setattr(c, name, legacy.get(getattr(c, name), getattr(c, name)))
    if c.fusion_input not in FUSION_INPUTS:
        raise ValueError(f"fusion_input must be one of {FUSION_INPUTS}, got {c.fusion_input!r}")
    if c.low_anchor not in LOW_ANCHORS:
        raise ValueError(f"low_anchor must be one of {LOW_ANCHORS}, got {c.low_anchor!r}")
    if c.num_context < 1:
        raise ValueError(f"num_context must be >= 1, got {c.num_context}")
    if "{class}" not in c.template:
        raise ValueError(f"template must contain '{{class}}', got {c.template!r}")
    for name in ("lambda_high", "lambda_kl", "lambda_low", "lambda_align"):
        if getattr(c, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(c, name)}")
    if not 0 <= c.fusion_dropout < 1:
        raise ValueError(f"fusion_dropout must be in [0, 1), got {c.fusion_dropout}")
    if is_local_dir(c.model_name):
        sizes = tower_sizes(c.model_name)
    elif c.model_name not in open_clip.list_models():
        return ()  # load_backbone names the problem
    else:
        cfg = open_clip.get_model_config(c.model_name)
        vis, txt = cfg["vision_cfg"], cfg["text_cfg"]
        sizes = dict(depth=vis["layers"], grid=(vis["image_size"] // vis["patch_size"]) ** 2,
                     vision_width=vis["width"], text_width=txt["width"])
    depth, grid = sizes["depth"], sizes["grid"]
    if not 0 <= c.num_visual_prompts <= grid:
        raise ValueError(f"num_visual_prompts must be in [0, {grid}] (the patch tokens it "
                         f"overwrites), got {c.num_visual_prompts}")
    layers = resolve_fusion_layers(c.fusion_layers, depth)
    if layers and c.num_visual_prompts == 0:
        raise ValueError(f"fusion_layers={list(layers)} needs num_visual_prompts >= 1 (the fused "
                         f"tokens go there); use fusion_layers=() for no fusion")
    u = max(sizes["vision_width"], sizes["text_width"])
    if layers and (c.fusion_heads < 1 or u % c.fusion_heads):
        raise ValueError(f"fusion_heads must divide the unified width {u}, got {c.fusion_heads}")
    return layers


@register("biomedap")
class BiomedAP(CoOp):
    """BiomedAP on CoOp: text context + zero visual prompts + gated fusion + dual anchors.

    Buffers: ``anchor_high`` [C, E], ``anchor_low`` [C, E] (normalised; persistent; in
    ``low_anchor="visual-prototypes"`` mode zero until ``prepare``/``set_visual_prototypes`` in this process,
    which the loss checks with a Python flag: no host sync, nothing for torch.compile to break
    on)."""
    display_name = "BiomedAP"
    config_class = BiomedAPConfig
    # tongdiedie/BiomedAP configs/trainers/BiomedAP/few_shot/*.yaml: no flip; PREC fp32 default
    reference_recipe = dassl_recipe("BiomedAP's authors: configs/trainers/BiomedAP/few_shot "
                                    "(Dassl; few-shot: --shots K)", lr=0.0025, epochs=100,
                                    batch_size=4, flip=False, amp="off")

    def __init__(self, config: BiomedAPConfig):
        if not isinstance(config, BiomedAPConfig):
            raise TypeError(f"BiomedAP needs a BiomedAPConfig, got {type(config).__name__}")
        layers = _check_config(config)
        texts = {name: descriptions_for(name) for name in config.class_names}
        digest = texts_hash(texts)
        if config.descriptions_hash not in (None, digest):
            raise ValueError(f"descriptions_hash={config.descriptions_hash!r} does not match the "
                             f"description texts of {list(config.class_names)} ({digest})")
        tokenizer = get_tokenizer(config.model_name)
        ctx_tokens = self._context_tokens(config, tokenizer)
        config = dataclasses.replace(config, fusion_layers=layers, descriptions_hash=digest)
        super().__init__(config)  # backbone, seg decoder, context ~ N(0, 0.02^2) as coop
        clip, m = self.backbone, config.num_context
        with torch.no_grad():
            if ctx_tokens is not None:
                self.context.copy_(token_embedding(clip)(ctx_tokens)[0, 1:1 + m])
            word = config.modality_word or GENERIC_MODALITY_WORD
            tokens = tokenizer([config.template.replace("{modality}", word).replace("{class}", n)
                                for n in config.class_names])
            embedded = token_embedding(clip)(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + m:].clone(), persistent=False)
        self.register_buffer("eot", eot_positions(tokens), persistent=False)
        self.length = prompt_length(tokens)
        high = torch.stack([self._frozen_text(tokenizer(list(t))).mean(0) for t in texts.values()])
        low = self._frozen_text(tokenizer(list(config.class_names)))
        self.register_buffer("anchor_high", F.normalize(high, dim=-1))
        self.register_buffer("anchor_low", low if config.low_anchor == "code" else torch.zeros_like(low))
        self.prototypes_ready = config.low_anchor == "code"
        d_v, d_t = vit.width(self.visual), text_width(clip)
        text_side = config.lambda_align > 0   # T_out feeds only the alignment loss
        self.fusion = nn.ModuleDict({str(i): GatedCrossModalFusion(
            d_v, d_t, config.fusion_heads, config.fusion_dropout, text_side) for i in layers})
        self.fusion_layers: List[int] = list(layers)

    @staticmethod
    def _context_tokens(config: BiomedAPConfig, tokenizer) -> Optional[Tensor]:
        """Tokens of ``ctx_init`` (None for a random start); checks the template leaves the
        class name after the M context tokens."""
        m, word = config.num_context, config.modality_word or GENERIC_MODALITY_WORD
        head = config.template.replace("{modality}", word).split("{class}")[0]
        if int(eot_positions(tokenizer([head]))[0]) - 1 < m:
            raise ValueError(f"template {config.template!r} needs >= num_context={m} tokens "
                             f"before '{{class}}' (the context overwrites them)")
        if config.ctx_init is None:
            return None
        tokens = tokenizer([config.ctx_init.replace("{modality}", word)])
        if int(eot_positions(tokens)[0]) - 1 < m:
            raise ValueError(f"ctx_init {config.ctx_init!r} has fewer than num_context={m} tokens")
        return tokens

    @torch.no_grad()
    def _frozen_text(self, tokens: Tensor) -> Tensor:
        """Normalised frozen text features [N, E] of tokenised texts [N, S]."""
        clip = self.backbone
        feats = encode_embedded(clip, token_embedding(clip)(tokens), eot_positions(tokens),
                                prompt_length(tokens))
        return F.normalize(feats.float(), dim=-1)

    # ------------------------------------------------------------------------------------------
    def text_features(self) -> Tensor:
        """Class text features t^ [C, E], normalised (the frozen tower, cut after the EOT)."""
        c = self.prefix.shape[0]
        ctx = self.context.unsqueeze(0).expand(c, -1, -1).to(self.prefix.dtype)
        x = torch.cat([self.prefix, ctx, self.suffix], dim=1)
        return F.normalize(encode_embedded(self.backbone, x, self.eot, self.length), dim=-1)

    def _fuse(self, layer: int, z: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Fusion before block ``layer``: z [B, T, D] -> (V_out [B, K, D], T_out [B, M, d_t])."""
        b, k = z.shape[0], self.config.num_visual_prompts
        fusion = self.fusion[str(layer)]
        t = self.context.unsqueeze(0)                                   # [1, M, d_t]
        if self.config.fusion_input == "image-tokens":
            return fusion(z[:, 1:1 + k], t.expand(b, -1, -1))
        if self.config.fusion_broadcast:   # image-independent inputs: once, then broadcast
            v_out, t_out = fusion(z.new_zeros(1, k, z.shape[-1]), t)
            return v_out.expand(b, -1, -1), None if t_out is None else t_out.expand(b, -1, -1)
        return fusion(z.new_zeros(b, k, z.shape[-1]), t.expand(b, -1, -1))

    def encode(self, images, maps=None, modality=None, return_attn=False) -> Dict:
        """images [B, 3, H, W] -> dict(z [B, T, D], text_out [L_f, B, M, d_t] or None)."""
        k = self.config.num_visual_prompts
        if k == 0:
            return dict(_frozen_encode(self, images), text_out=None)
        visual = self.visual
        z = vit.embed(visual, vit.patch_embed(visual, images))
        zeros = z.new_zeros(z.shape[0], k, z.shape[-1])
        text_out = []
        for layer in range(vit.num_layers(visual)):
            prompt = zeros
            if layer in self.fusion_layers:
                prompt, t_out = self._fuse(layer, z)
                if t_out is not None:
                    text_out.append(t_out)
            z = torch.cat([z[:, :1], prompt.to(z.dtype), z[:, 1 + k:]], dim=1)
            z = vit.block(visual, layer, z)
        return dict(z=z, text_out=torch.stack(text_out) if text_out else None)

    def logits(self, features: Tensor, text: Tensor) -> Tensor:
        """logit_scale * cos(image, class text): features [B, E], text [C, E] -> [B, C]."""
        return self.backbone.logit_scale.exp() * F.normalize(features, dim=-1) @ text.t()

    def classify(self, pooled: Tensor, features: Tensor) -> Tensor:
        return self.logits(features, self.text_features())

    def forward(self, images: Tensor, maps: Optional[Tensor] = None, modality=None,
                return_attn: bool = False) -> BiomedAPOutput:
        """images [B, 3, H, W] -> ``BiomedAPOutput`` (logits [B, C], seg_logits [B, 1, H, W] or
        None, features [B, E], pooled [B, D], tokens [B, N, D], text_features [C, E],
        text_out [L_f, B, M, d_t] or None). The class text features are computed once."""
        vit.check_images(self.visual, images)
        enc = self.encode(images)
        pooled, tokens, features = vit.pool(self.visual, enc["z"])
        text = self.text_features()
        decoder = self.seg_decoder
        return BiomedAPOutput(
            logits=self.logits(features, text), features=features, pooled=pooled, tokens=tokens,
            seg_logits=None if decoder is None else decoder(tokens, self.visual.grid_size,
                                                            tuple(images.shape[2:])),
            text_features=text, text_out=enc["text_out"])

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def frozen_image_features(self, images: Tensor) -> Tensor:
        """The frozen backbone's image features [B, E] (no prompts): what the visual
        prototypes average."""
        return vit.pool(self.visual, _frozen_encode(self, images)["z"])[2]

    @torch.no_grad()
    def set_visual_prototypes(self, features: Tensor, labels: Tensor) -> None:
        """``low_anchor="visual-prototypes"``: a_low[c] = normalise(mean of the normalised features of
        class c). features [N, E] (``frozen_image_features`` of the few-shot training images),
        labels [N]. Call it before training, at every start (resume included: the trainer's
        checkpoints hold trainable parameters only; the prototypes are deterministic)."""
        c = self.config.num_classes
        if features.dim() != 2 or features.shape[-1] != self.anchor_low.shape[-1]:
            raise ValueError(f"features must be [N, {self.anchor_low.shape[-1]}], got "
                             f"{tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels must be [N={features.shape[0]}], got {tuple(labels.shape)}")
        self._check_every_class(labels)
        onehot = F.one_hot(labels.long(), c).to(features.device, torch.float32)
        mean = onehot.t() @ F.normalize(features.float(), dim=-1)
        self.anchor_low.copy_(F.normalize(mean, dim=-1))
        self.prototypes_ready = True

    @torch.no_grad()
    def prepare(self, train_set, device, dtype=None, batch_size: int = 64) -> None:
        """``low_anchor="visual-prototypes"``: a_low [C, E] = the visual prototypes of ``train_set`` (the
        whole un-augmented training set, in order: ``frozen_image_features`` of every image
        [N, E] under autocast ``dtype``, ``batch_size`` at a time, then
        ``set_visual_prototypes`` with the labels [N]). Deterministic, so a resume recomputes the
        same anchors. A class without a training image is a one-line ValueError naming it.
        ``low_anchor="code"``: nothing (the class-name text anchor is set at build)."""
        if self.config.low_anchor != "visual-prototypes":
            return
        if hasattr(train_set, "labels"):   # a data set's labels: refuse before any image is read
            self._check_every_class(torch.as_tensor(train_set.labels, dtype=torch.long))
        device = torch.device(device)
        was_training = self.training
        self.eval()
        feats, labels = [], []
        for batch in unaugmented_batches(train_set, batch_size, device):
            images = batch["image"] if dtype is None else batch["image"].to(dtype)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                feats.append(self.frozen_image_features(images).float())
            labels.append(batch["label"])
        self.train(was_training)
        labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        if not feats:  # an empty set: the class check names the first class
            self._check_every_class(labels)
        self.set_visual_prototypes(torch.cat(feats), labels)  # checks every class has an image

    def _check_every_class(self, labels: Tensor) -> None:
        """labels [N]: a one-line ValueError naming the first class without a training image."""
        present = set(labels.tolist())
        missing = [n for i, n in enumerate(self.config.class_names) if i not in present]
        if missing:
            raise ValueError(f"low_anchor='visual-prototypes' needs >= 1 training image of every class; class "
                             f"{missing[0]!r} has none in the {len(labels)} training images (use "
                             f"low_anchor='code' for the class-name text anchor)")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A state dict with a non-zero ``anchor_low`` (e.g. another prepared model's) makes
        this model's prototypes ready too."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "anchor_low" in state_dict and bool(self.anchor_low.abs().sum() > 0):
            self.prototypes_ready = True

    def make_loss(self, **options) -> nn.Module:
        """The BiomedAP objective (``BiomedAPLoss``); trainer options (e.g. rcl_positives) do
        not apply and are ignored."""
        return BiomedAPLoss(self)


__all__ = ["BiomedAP"]
