"""CILMP (Du, Yu, Wang 2025: "Medical Knowledge Intervention Prompt Tuning", code usr922/cilmp)
on the frozen open_clip backbone. Equations, defaults and departures: docs/methods/cilmp.md.

Per class c, knowledge states h_c [L_c, d_k] (``knowledge.py``). Per image, v = the normalised
image embedding [E] of the prompted ViT. For every text layer l and side p in {prefix, suffix}:

    g(v)  = W_b (W_a v + b_a) + b_b                    (W_a: r x E, W_b: d_k x r)
    s     = W_s [h ; g(v) * h] + b_s                   (W_s: r x 2 d_k)
    Phi   = Dropout(h + R (s - R^T h))                 (R: d_k x r, orthogonal init)
    e     = B_l A_l Phi   (first ``prefix_length`` / last ``suffix_length`` knowledge tokens)
    e     = B_l A_l h     (the tokens between)         (A_l: r x d_k, B_l: W x r)

The text sequence per (image b, class c) is [SOS, ctx_l (K), e_l(b, c, 1..L_c), class name, ".",
EOS], cut after the longest end-of-text; before text block l >= 1 the context and knowledge
positions are overwritten with ctx_l, e_l. Deep visual prompts: K_v tokens replaced before every
vision block. logits[b, c] = exp(logit_scale) * cos(v_b, f_txt(b, c)).

Without active dropout (eval, or ``phi_dropout=0``) the rank-r path computes the same e without
any d_k-wide per-image tensor (``_knowledge_fast``): A_l Phi = A_l h + (A_l R)(M_t u + q_t) with
u = W_a v + b_a, M_t = W_s2 diag(h_t) W_b and q_t = W_s1 h_t + W_s2 (h_t * b_b) + b_s - R^T h_t
precomputed per step. ``project_knowledge`` is the one place the rank-r chain x A_l^T B_l^T runs.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avpt_kernels import low_rank_project
from avpt.recipes import dassl_recipe
from avpt_kernels._autocast import autocast_dtype

from ... import vit
from ...local_backbone import get_tokenizer
from ...text_tower import (encode_embedded, eot_positions, prompt_length, text_embed_dim,
                           token_embedding)
from ...text_tower import text_layers as tower_text_layers, text_width as tower_text_width
from ..base import Method, register
from .config import (_LEGACY_AVERAGING, AVERAGING_MEAN_SHARE, AVERAGING_MODES, AVERAGING_STD_SHARE,
                     INTERVENTION_PARAMS, CILMPConfig)
from .descriptions import descriptions_for, texts_hash
from .knowledge import (description_states, knowledge_source, load_knowledge_dir, pad_states,
                        states_hash)


def project_knowledge(x: Tensor, A: Tensor, B: Tensor, backend: Optional[str] = None) -> Tensor:
    """The per-layer rank-r chain: x [N, Din] (shared) or [L, N, Din], A [L, r, Din],
    B [L, Dout, r] -> [L, N, Dout] = x A_l^T B_l^T for every layer l.

    One ``avpt_kernels.low_rank_project`` call (U = A^T, V = B^T as strided views, no copies;
    stage l for layer l): the fused Triton kernels where they apply (``backend`` None: the
    process-wide avpt_kernels backend, "auto" by default). The three tensors go in one dtype:
    the autocast dtype inside an autocast region (as the einsums it replaces ran), else their
    common dtype."""
    dt = autocast_dtype(x.device) or torch.promote_types(torch.promote_types(x.dtype, A.dtype),
                                                         B.dtype)
    return low_rank_project(x.to(dt), A.to(dt).transpose(1, 2), B.to(dt).transpose(1, 2),
                            range(A.shape[0]), backend=backend)


def _fit_to_context(cfg: CILMPConfig, tokenizer) -> None:
    """Shrink ``knowledge_length`` to the tokens the text context has left after [SOS, context,
    the longest class name, ".", EOS], and prefix/suffix to half of it each where they no longer
    fit (the tiny backbone's 16-token context holds 5; ViT-B/16's 77 hold the paper's 16)."""
    names = tokenizer([f"{n}." for n in cfg.class_names], context_length=tokenizer.context_length
                      + 256)
    available = tokenizer.context_length - 1 - cfg.text_context - int(eot_positions(names).max())
    if available < 1:
        raise ValueError(f"class_names/text_context: no room for knowledge tokens in the "
                         f"{tokenizer.context_length}-token text context")
    cfg.knowledge_length = min(cfg.knowledge_length, available)
    if cfg.prefix_length + cfg.suffix_length > cfg.knowledge_length:
        cfg.prefix_length = min(cfg.prefix_length, cfg.knowledge_length // 2)
        cfg.suffix_length = min(cfg.suffix_length, cfg.knowledge_length // 2)


def _check_lengths(cfg: CILMPConfig, states: List[Tensor]) -> List[Tensor]:
    need = cfg.prefix_length + cfg.suffix_length
    short = [(n, int(h.shape[0])) for n, h in zip(cfg.class_names, states) if h.shape[0] < need]
    if short:
        raise ValueError(f"prefix_length + suffix_length = {need} needs as many knowledge tokens "
                         f"per class; too few for {short}")
    return states


def _uniform_(t: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default init (kaiming_uniform a=sqrt(5) == U(+-1/sqrt(fan_in)))."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


class Intervention(nn.Module):
    """The conditional low-rank interventions of every text layer for one side (prefix or
    suffix), stacked over layers: R [L, d_k, r], W_s [L, r, 2 d_k], b_s [L, r], W_a [L, r, E],
    b_a [L, r], W_b [L, d_k, r], b_b [L, d_k]."""

    def __init__(self, layers: int, d_k: int, rank: int, embed: int):
        super().__init__()
        R = torch.empty(layers, d_k, rank)
        for l in range(layers):
            nn.init.orthogonal_(R[l])
        self.R = nn.Parameter(R)
        self.W_s = nn.Parameter(_uniform_(torch.empty(layers, rank, 2 * d_k), 2 * d_k))
        self.b_s = nn.Parameter(_uniform_(torch.empty(layers, rank), 2 * d_k))
        self.W_a = nn.Parameter(_uniform_(torch.empty(layers, rank, embed), embed))
        self.b_a = nn.Parameter(_uniform_(torch.empty(layers, rank), embed))
        self.W_b = nn.Parameter(_uniform_(torch.empty(layers, d_k, rank), rank))
        self.b_b = nn.Parameter(_uniform_(torch.empty(layers, d_k), rank))

    def u(self, v: Tensor) -> Tensor:
        """v [B, E] -> u = W_a v + b_a [L, B, r]."""
        return torch.einsum("be,lre->lbr", v, self.W_a) + self.b_a[:, None]

    def phi(self, h: Tensor, v: Tensor) -> Tensor:
        """Literal Phi before dropout: h [C, n, d_k], v [B, E] -> [L, B, C, n, d_k]."""
        g = torch.einsum("lbr,ldr->lbd", self.u(v), self.W_b) + self.b_b[:, None]
        gh = g[:, :, None, None, :] * h                                     # [L, B, C, n, d_k]
        hh = torch.cat([h.expand_as(gh), gh], dim=-1)                       # [h ; g(v) * h]
        s = torch.einsum("lbcnk,lrk->lbcnr", hh, self.W_s) + self.b_s[:, None, None, None]
        rth = torch.einsum("cnd,ldr->lcnr", h, self.R)[:, None]             # R^T h
        return h + torch.einsum("lbcnr,ldr->lbcnd", s - rth, self.R)

    def low_rank_delta(self, h: Tensor, v: Tensor) -> Tensor:
        """s - R^T h = M_t u + q_t [L, B, C, n, r] without a d_k-wide per-image tensor."""
        d_k = h.shape[-1]
        W_s1, W_s2 = self.W_s[..., :d_k], self.W_s[..., d_k:]
        M = torch.einsum("lrd,cnd,ldk->lcnrk", W_s2, h, self.W_b)          # W_s2 diag(h) W_b
        q = (torch.einsum("lrd,cnd->lcnr", W_s1 - self.R.transpose(1, 2), h)
             + torch.einsum("lrd,lcnd->lcnr", W_s2, h * self.b_b[:, None, None])
             + self.b_s[:, None, None])
        return torch.einsum("lcnrk,lbk->lbcnr", M, self.u(v)) + q[:, None]


@register("cilmp")
class CILMP(Method):
    """CILMP: deep visual prompts, deep text context, and per-(image, class) knowledge prompts
    from the conditional low-rank intervention. Trainable: ``visual_prompts`` [L_v, K_v, D],
    ``text_context`` [L_t, K, W], ``prefix`` / ``suffix`` interventions, ``A`` [L_t, r, d_k],
    ``B`` [L_t, W, r] (and the shared segmentation decoder when ``seg``)."""
    display_name = "CILMP"
    config_class = CILMPConfig
    # usr922/cilmp configs/trainers/CILMP/vit_b16.yaml (PREC fp16)
    reference_recipe = dassl_recipe("CILMP's authors: configs/trainers/CILMP/vit_b16.yaml (Dassl)",
                                    lr=0.0025, epochs=100, batch_size=64, flip=True, amp="fp16")
    uses_linear_head = False

    def __init__(self, config: CILMPConfig):
        cfg = config
        if len(cfg.class_names) != cfg.num_classes:
            raise ValueError(f"class_names needs num_classes={cfg.num_classes} names, got "
                             f"{len(cfg.class_names)}: {list(cfg.class_names)}")
        for name, value, low in (("rank", cfg.rank, 1), ("visual_prompts", cfg.visual_prompts, 1),
                                 ("text_context", cfg.text_context, 1),
                                 ("prefix_length", cfg.prefix_length, 0),
                                 ("suffix_length", cfg.suffix_length, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 <= cfg.phi_dropout < 1.0:
            raise ValueError(f"phi_dropout must be in [0, 1), got {cfg.phi_dropout!r}")
        cfg.averaging = _LEGACY_AVERAGING.get(cfg.averaging, cfg.averaging)
        if cfg.averaging not in AVERAGING_MODES:
            raise ValueError(f"averaging must be one of {AVERAGING_MODES}, got {cfg.averaging!r}")
        if cfg.knowledge_width is not None and cfg.knowledge_width < 1:
            raise ValueError(f"knowledge_width must be >= 1 or None, got {cfg.knowledge_width!r}")
        states = None
        if cfg.knowledge_dir is not None:  # user files first: their errors before any build
            states = _check_lengths(cfg, load_knowledge_dir(cfg.knowledge_dir, cfg.class_names,
                                                            cfg.knowledge_width))
        super().__init__(config)
        cfg.knowledge_source = knowledge_source(cfg.knowledge_dir)
        clip = self.backbone
        tokenizer = get_tokenizer(cfg.model_name)
        if states is None and cfg.fit_context:
            _fit_to_context(cfg, tokenizer)
        text_width, embed = tower_text_width(clip), text_embed_dim(clip)
        states = _check_lengths(cfg, self._knowledge(clip, tokenizer, text_width, states))
        lengths = [int(h.shape[0]) for h in states]
        h, _ = pad_states(states)
        d_k = h.shape[-1]
        text_layers = tower_text_layers(clip)
        k = cfg.text_context
        self.register_buffer("knowledge", h, persistent=False)             # [C, T, d_k]
        self.register_buffer("knowledge_mask", torch.arange(h.shape[1])[None] <
                             torch.tensor(lengths)[:, None], persistent=False)  # [C, T]
        self.register_buffer("suffix_index", torch.tensor(lengths)[:, None] - cfg.suffix_length
                             + torch.arange(cfg.suffix_length)[None], persistent=False)  # [C, S]
        self._build_prompts(clip, tokenizer, lengths)
        # trainable parts
        v = self.visual
        self.visual_prompts = nn.Parameter(
            torch.randn(vit.num_layers(v), cfg.visual_prompts, vit.width(v)) * 0.02)
        context = torch.randn(text_layers, k, text_width) * 0.02
        init = tokenizer([cfg.context_init])
        n_init = int(eot_positions(init)[0]) - 1
        if n_init != k:
            raise ValueError(f"context_init={cfg.context_init!r} has {n_init} tokens; "
                             f"text_context={k} expected")
        with torch.no_grad():
            context[0] = token_embedding(clip)(init)[0, 1:1 + k]
        self.text_context = nn.Parameter(context)
        # a side of length 0 has no parameters (none unused under DDP)
        self.prefix = Intervention(text_layers, d_k, cfg.rank, embed) if cfg.prefix_length else None
        self.suffix = Intervention(text_layers, d_k, cfg.rank, embed) if cfg.suffix_length else None
        self.A = nn.Parameter(_uniform_(torch.empty(text_layers, cfg.rank, d_k), d_k))
        self.B = nn.Parameter(_uniform_(torch.empty(text_layers, text_width, cfg.rank), cfg.rank))

    # ------------------------------------------------------------------------------------------
    def _knowledge(self, clip: nn.Module, tokenizer, text_width: int,
                   states: Optional[List[Tensor]]) -> List[Tensor]:
        """h_c per class: the loaded ``states`` or the description texts' (hash recorded)."""
        cfg = self.config
        if states is not None:
            self._record_hash(states_hash(cfg.class_names, states), "knowledge_dir states")
            return states
        if cfg.knowledge_width is not None and cfg.knowledge_width != text_width:
            raise ValueError(f"knowledge_width={cfg.knowledge_width}: description states have the "
                             f"text width {text_width}; give knowledge_dir for other widths")
        texts = cfg.knowledge_texts
        if texts is None:
            texts = {n: list(descriptions_for(n)) for n in cfg.class_names}
        self._record_hash(texts_hash(texts), "knowledge texts")
        cfg.knowledge_texts = {n: list(t) for n, t in texts.items()}
        return description_states(clip, tokenizer, texts, cfg.class_names, cfg.knowledge_length)

    def _record_hash(self, digest: str, what: str) -> None:
        """Record the knowledge's hash in the config; a hash given there must match."""
        cfg = self.config
        if cfg.knowledge_hash is not None and cfg.knowledge_hash != digest:
            raise ValueError(f"knowledge_hash={cfg.knowledge_hash!r} does not match the {what} "
                             f"(hash {digest!r}): the knowledge changed since that config")
        cfg.knowledge_hash = digest

    def _build_prompts(self, clip: nn.Module, tokenizer, lengths: List[int]) -> None:
        """Token ids of [SOS, X*K, H*L_c, class name, ".", EOS] per class; errors if too long."""
        cfg = self.config
        texts = [" ".join(["X"] * cfg.text_context + ["H"] * n) + f" {name}."
                 for name, n in zip(cfg.class_names, lengths)]
        context = tokenizer.context_length
        full = tokenizer(texts, context_length=context + 256)
        need = int(eot_positions(full).max()) + 1
        if need > context:
            raise ValueError(f"knowledge_length/class_names: the prompt needs {need} tokens, the "
                             f"text tower has {context} (lower knowledge_length or shorten names)")
        tokens = full[:, :context]
        with torch.no_grad():
            embedded = token_embedding(clip)(tokens)
        self.register_buffer("eot", eot_positions(tokens), persistent=False)          # [C]
        self.prompt_length = prompt_length(tokens)                                   # int, no sync
        self.register_buffer("embedded", embedded, persistent=False)                 # [C, S, W]

    # ------------------------------------------------------------------------------------------
    def _knowledge_literal(self, v: Tensor) -> Tensor:
        """Literal Eqs.: v [B, E] -> e [L, B, C, T, W] (Phi materialised, dropout applied)."""
        cfg, h = self.config, self.knowledge
        L, B = self.A.shape[0], v.shape[0]
        C, T, d_k = h.shape
        x = h.expand(L, B, C, T, d_k)
        if cfg.prefix_length:
            phi = self.prefix.phi(h[:, :cfg.prefix_length], v)
            phi = F.dropout(phi, cfg.phi_dropout, self.training)
            x = torch.cat([phi, x[..., cfg.prefix_length:, :]], dim=3)
        if cfg.suffix_length:
            idx = self.suffix_index[:, :, None].expand(-1, -1, d_k)
            phi = self.suffix.phi(h.gather(1, idx), v)
            phi = F.dropout(phi, cfg.phi_dropout, self.training)
            x = x.scatter(3, idx.expand(L, B, -1, -1, -1), phi)
        return project_knowledge(x.reshape(L, B * C * T, d_k), self.A, self.B,
                                 cfg.backend).view(L, B, C, T, -1)

    def _knowledge_fast(self, v: Tensor) -> Tensor:
        """The same e [L, B, C, T, W] without dropout, every per-image tensor before the output
        rank-r wide: e = B_l A_l h (batch-independent) + B_l [A_l R_pre | A_l R_suf] d with
        d [.., 2r] = (s - R_pre^T h, 0) on prefix tokens, (0, s - R_suf^T h) on suffix tokens, 0
        elsewhere -- one rank-r chain per term."""
        cfg, h = self.config, self.knowledge
        L, B = self.A.shape[0], v.shape[0]
        C, T, d_k = h.shape
        r = self.A.shape[1]
        base = project_knowledge(h.reshape(C * T, d_k), self.A, self.B,
                                 cfg.backend).view(L, 1, C, T, -1)
        ds, ARs = [], []
        if cfg.prefix_length:
            n = cfg.prefix_length
            part = self.prefix.low_rank_delta(h[:, :n], v)
            ds.append(torch.cat([part, part.new_zeros(L, B, C, T - n, r)], dim=3))
            ARs.append(self.A @ self.prefix.R)
        if cfg.suffix_length:
            idx = self.suffix_index[:, :, None]
            part = self.suffix.low_rank_delta(h.gather(1, idx.expand(-1, -1, d_k)), v)
            ds.append(part.new_zeros(L, B, C, T, r).scatter(3, idx.expand(L, B, -1, -1, r), part))
            ARs.append(self.A @ self.suffix.R)
        if not ds:
            return base.expand(L, B, C, T, base.shape[-1])
        d = torch.cat(ds, dim=-1).view(L, B * C * T, -1)                    # [L, N, 2r]
        AR = torch.cat(ARs, dim=-1)                                           # [L, r, 2r]
        return base + project_knowledge(d, AR, self.B, cfg.backend).view(L, B, C, T, -1)

    def knowledge_prompts(self, v: Tensor, fast: Optional[bool] = None) -> Tensor:
        """Knowledge prompts e [L_t, B, C, T, W] for normalised image embeddings v [B, E]
        (positions t >= L_c are padding). ``fast`` None: the rank-r path when it is exact."""
        if fast is None:
            fast = self.config.fast_path and not (self.training and self.config.phi_dropout > 0)
        if fast and self.training and self.config.phi_dropout > 0:
            raise ValueError("fast=True: the rank-r path has no dropout; use it in eval mode or "
                             "with phi_dropout=0")
        return self._knowledge_fast(v) if fast else self._knowledge_literal(v)

    # ------------------------------------------------------------------------------------------
    def text_features(self, v: Tensor, fast: Optional[bool] = None,
                      cut: bool = True) -> Tensor:
        """Text features [B, C, E] (normalised) of every (image, class) sequence for normalised
        image embeddings v [B, E]; ``cut=False`` runs the full context (for the tests)."""
        clip, k = self.backbone, self.config.text_context
        C, T = self.knowledge.shape[:2]
        B = v.shape[0]
        e = self.knowledge_prompts(v, fast)                                   # [L, B, C, T, W]
        e = e.reshape(e.shape[0], B * C, T, -1)
        mask = self.knowledge_mask.repeat(B, 1)[..., None]                    # [B*C, T, 1]
        ctx = self.text_context

        def overwrite(layer: int, x: Tensor) -> Tensor:
            n = x.shape[0]
            know = torch.where(mask, e[layer].to(x.dtype), x[:, 1 + k:1 + k + T])
            return torch.cat([x[:, :1], ctx[layer].to(x.dtype).expand(n, -1, -1), know,
                              x[:, 1 + k + T:]], dim=1)

        length = self.prompt_length if cut else self.embedded.shape[1]
        x = overwrite(0, self.embedded[:, :length].repeat(B, 1, 1))
        f = encode_embedded(clip, x, self.eot.repeat(B), length, layer_hook=overwrite)
        return F.normalize(f.view(B, C, -1), dim=-1)

    def row_label(self) -> str:
        """E.g. "CILMP, CLIP-text knowledge" or "CILMP, <LM name> knowledge"."""
        return f"{self.display_name}, {self.config.knowledge_source} knowledge"

    def encode(self, images, maps=None, modality=None, return_attn=False):
        """Deep visual prompts: K_v tokens after the class token, replaced before every block
        (block 0's through ln_pre, like the class and patch tokens), removed before pooling."""
        visual = self.visual
        z = vit.embed(visual, vit.patch_embed(visual, images))
        b, k = z.shape[0], self.config.visual_prompts
        for layer in range(vit.num_layers(visual)):
            prompt = self.visual_prompts[layer].to(z.dtype)
            if layer == 0:
                prompt = visual.ln_pre(prompt)
            rest = z[:, 1:] if layer == 0 else z[:, 1 + k:]
            z = vit.block(visual, layer, torch.cat([z[:, :1], prompt.expand(b, -1, -1), rest], 1))
        return dict(z=torch.cat([z[:, :1], z[:, 1 + k:]], dim=1))

    def classify(self, pooled: Tensor, features: Tensor) -> Tensor:
        """logits [B, C] = exp(logit_scale) * cos(v_b, f_txt(b, c))."""
        v = F.normalize(features, dim=-1)
        text = self.text_features(v)
        return self.backbone.logit_scale.exp() * torch.einsum("be,bce->bc", v, text.to(v.dtype))

    # ------------------------------------------------------------------------------------------
    def make_epoch_averager(self, epochs: int) -> "PromptAveraging":
        """The trainer's hook (``Method.make_epoch_averager``): CILMP's Gaussian averaging."""
        return self.make_averager(epochs)

    def make_averager(self, epochs: int) -> "PromptAveraging":
        """The Gaussian epoch averaging of this config (``averaging``, mean, std; None: scaled
        to ``epochs`` as the authors' N(100, 30) is to their 100) for a run of ``epochs``."""
        cfg = self.config
        return PromptAveraging(epochs, cfg.averaging_mean, cfg.averaging_std, cfg.averaging)

    @staticmethod
    def num_trainable_formula(layers_v: int, width_v: int, layers_t: int, width_t: int,
                              embed: int, d_k: int, r: int, k_v: int, k_t: int,
                              sides: int = 2) -> int:
        """Trainable parameters without the segmentation decoder (``sides``: interventions
        per layer, 2 unless a prefix or suffix length is 0)."""
        side = d_k * r + r * 2 * d_k + r + r * embed + r + d_k * r + d_k
        return layers_v * k_v * width_v + layers_t * (k_t * width_t + sides * side + r * d_k
                                                      + width_t * r)


class PromptAveraging:
    """Gaussian averaging over epochs (PromptSRC's GPA, as CILMP uses it) of the TRAINABLE state
    only. Epoch e (1-based) gets weight N(e; mean, std); the average is the weight-normalised sum
    over the epochs seen so far (at the last epoch the reference code's sum over all epochs).

    mode "code" (default): as the authors' code, the intervention and projection tensors
    (``INTERVENTION_PARAMS``) keep their latest value, the prompts (and any other trainable
    tensor) are averaged (the code also runs the frozen CLIP weights through the average, which
    returns them unchanged: the weights sum to 1; here they are left out). "all": every
    trainable tensor averaged (a reading of the abstract). "off": the latest state. ``mean``,
    ``std`` None: ``epochs`` and 0.3 ``epochs`` (the authors' N(100, 30) in 100 epochs). Holds no module: the trainer calls
    ``update(model, epoch)`` after each epoch and ``load_into(model)`` at the end; a
    DataParallel/DDP wrapper is unwrapped."""

    def __init__(self, epochs: int, mean: Optional[float] = None, std: Optional[float] = None,
                 mode: str = "code"):
        mode = _LEGACY_AVERAGING.get(mode, mode)
        mean = AVERAGING_MEAN_SHARE * epochs if mean is None else mean
        std = AVERAGING_STD_SHARE * epochs if std is None else std
        if mode not in AVERAGING_MODES:
            raise ValueError(f"averaging mode must be one of {AVERAGING_MODES}, got {mode!r}")
        if not std > 0:
            raise ValueError(f"averaging std must be > 0, got {std!r}")
        self.epochs, self.mean, self.std, self.mode = epochs, float(mean), float(std), mode
        self.total = 0.0
        self.sums: Dict[str, Tensor] = {}
        self.latest: Dict[str, Tensor] = {}

    def weight(self, epoch: int) -> float:
        return math.exp(-0.5 * ((epoch - self.mean) / self.std) ** 2) / (self.std * math.sqrt(2 * math.pi))

    @staticmethod
    def _trainable(model: nn.Module) -> Dict[str, Tensor]:
        model = getattr(model, "module", model)
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def _averaged(self, name: str) -> bool:
        if self.mode == "off":
            return False
        return self.mode == "all" or name.split(".")[-1] not in INTERVENTION_PARAMS

    def update(self, model: nn.Module, epoch: int) -> None:
        w = self.weight(epoch)
        self.total += w
        for name, p in self._trainable(model).items():
            self.latest[name] = p.clone()
            if self._averaged(name):
                acc = p.to(torch.float64) * w
                self.sums[name] = acc if name not in self.sums else self.sums[name] + acc

    def state(self) -> Dict[str, Tensor]:
        """The averaged trainable state (names as in ``named_parameters``)."""
        if not self.latest:
            raise ValueError("PromptAveraging.state: update() was never called")
        return {n: (self.sums[n] / self.total).to(p.dtype) if n in self.sums else p
                for n, p in self.latest.items()}

    def load_into(self, model: nn.Module) -> None:
        params = dict(getattr(model, "module", model).named_parameters())
        with torch.no_grad():
            for name, value in self.state().items():
                params[name].copy_(value)

    def state_dict(self) -> Dict:
        return dict(total=self.total, sums=dict(self.sums), latest=dict(self.latest))

    def load_state_dict(self, state: Dict) -> None:
        self.total, self.sums, self.latest = state["total"], dict(state["sums"]), dict(state["latest"])


__all__ = ["CILMP", "Intervention", "PromptAveraging", "project_knowledge"]
