"""A-VPT's loss (Eqs. 11-17): its terms, each a function, and ``AVPTLoss``, which weights and
switches them.

* CLS (Eq. 14) and SEG (Eq. 15): the terms every method trains, ``avpt.losses``.
* RCL (Eqs. 11-12): supervised contrast of region embeddings r = h_phi(E)/||.||, anchors the
  regions of the batch. Batches are single-modality (``ModalityBatchSampler``), so the cross-modal
  positives the paper intends come from the per-modality memory queues (detached region
  embeddings of earlier batches): with ``positives="cross_modal"`` (the default) a queue entry of
  the same region type from ANOTHER modality is a positive, one of another type a negative (same
  type, same modality: neither). In the batch, the same type in another image is a positive and
  the other types are negatives. ``positives="within_modality"`` (the ablation, and the behaviour
  before issue 13) uses queue entries as negatives only. Region types come from the atlas order
  (slot k is type k) or from EMA-updated centroids. Eq. 12 writes only negatives in the
  denominator; we use the usual InfoNCE / SupCon denominator (positives + negatives), which keeps
  the loss >= 0, and average over anchors with at least one positive.
* TXT (Eq. 13): CLIP-style cross-entropy of region embeddings in the frozen CLIP space against the
  frozen text tower's embeddings of the anatomy phrases.
* LAP (Eq. 16): tr(P^T L P) over prompt tokens with the region-adjacency Laplacian (tokens of one
  region are linked too), averaged over layers and images and divided by D (LayerNorm'd prompts
  have squared norm ~ D, so the raw trace would swamp the other terms).
Total (Eq. 17): CLS + l_seg SEG + l_rcl RCL + l_txt TXT + l_lap LAP; a weight of 0 switches a
term off (Tables 5-7 ablations), and a term whose inputs are absent is skipped.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...losses import cls_seg_terms
from .anatomy import DEFAULT_ADJACENCY, MODALITIES, modality_indices, region_adjacency


class RegionQueue(nn.Module):
    """Per-modality FIFO memory of detached region embeddings and their types.

    Buffers: ``emb`` [M, S, d_c], ``types`` [M, S] (-1 = empty slot), ``ptr`` [M]."""

    def __init__(self, num_modalities: int, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("emb", torch.zeros(num_modalities, size, dim))
        self.register_buffer("types", torch.full((num_modalities, size), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(num_modalities, dtype=torch.long))
        # not in the state dict (derived; older checkpoints load unchanged)
        self.register_buffer("slot_mod", torch.arange(num_modalities).repeat_interleave(size),
                             persistent=False)

    @torch.no_grad()
    def push(self, r: Tensor, types: Tensor, modality: Tensor) -> None:
        """r [B, R, d_c], types [B, R], modality [B]. Per modality, the batch's entries in order
        go to the ring buffer at ``ptr`` (only the last ``size`` of them when there are more).

        No host sync (no ``unique().tolist()``, no boolean indexing): every entry gets its rank
        within its modality from a cumulative count; the entries that would be overwritten in
        the same push (rank below count - size) land on the slot of a kept entry, so the
        targeted slots are zeroed first and the kept entries added (each slot gets exactly one).
        """
        n_mod, dc = self.emb.shape[0], r.shape[-1]
        e = r.reshape(-1, dc).to(self.emb.dtype)
        t = types.reshape(-1).to(self.types.dtype)
        mod = modality.to(device=e.device, dtype=torch.long).repeat_interleave(r.shape[1])
        onehot = F.one_hot(mod, n_mod)                                 # [N, M]
        rank = (onehot.cumsum(0) - 1).gather(1, mod[:, None]).squeeze(1)
        count = onehot.sum(0)                                          # [M]
        pos = rank - (count - self.size).clamp_min(0)[mod]             # < 0: overwritten
        idx = torch.remainder(self.ptr[mod] + pos, self.size)
        keep = pos >= 0
        self.emb.index_put_((mod, idx), torch.zeros_like(e))
        self.emb.index_put_((mod, idx), e * keep[:, None].to(e.dtype), accumulate=True)
        self.types.index_put_((mod, idx), torch.zeros_like(t))
        self.types.index_put_((mod, idx), t * keep.to(t.dtype), accumulate=True)
        self.ptr.copy_(torch.remainder(self.ptr + count.clamp_max(self.size), self.size))

    def entries(self):
        """(embeddings [Q, d_c], types [Q]) of the filled slots of every modality. Boolean
        indexing: a host sync on an accelerator; the loss uses ``slots`` instead."""
        filled = self.types >= 0
        return self.emb[filled], self.types[filled]

    def slot_modality(self) -> Tensor:
        """Modality index of every slot of ``slots()`` [M*S] (slot j is modality j // S)."""
        return self.slot_mod

    def slots(self):
        """(embeddings [M*S, d_c], types [M*S]) of every slot of every modality, empty slots
        with type -1 (``rcl_loss`` ignores them): no boolean indexing, no host sync. The
        embeddings are a copy: the loss saves them for its backward and ``push`` then writes
        the buffer in place."""
        return self.emb.reshape(-1, self.emb.shape[-1]).clone(), self.types.reshape(-1)


class EMACentroids(nn.Module):
    """Region-type centroids [R, d_c], EMA-updated; a region's type is its nearest centroid.
    Initialised from the first batch in atlas order (slot k -> centroid k)."""

    def __init__(self, num_types: int, dim: int, momentum: float = 0.99):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("centroids", torch.zeros(num_types, dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    # Both methods select on the device with torch.where instead of branching on
    # bool(self.initialized) or looping over t.unique().tolist(): no host sync.
    @torch.no_grad()
    def assign(self, r: Tensor) -> Tensor:
        """Types [B, R] of the normalised embeddings r [B, R, d_c] (atlas order until the
        centroids are initialised)."""
        atlas = torch.arange(r.shape[1], device=r.device).expand(r.shape[0], -1)
        nearest = torch.einsum("brd,cd->brc", r, self.centroids.to(r.dtype)).argmax(-1)
        return torch.where(self.initialized, nearest, atlas)

    @torch.no_grad()
    def update(self, r: Tensor, types: Tensor) -> None:
        """First call: centroids from the batch in atlas order. Then, for every type present in
        the batch, an EMA step towards the mean of its embeddings (absent types unchanged)."""
        first = F.normalize(r.float().mean(0), dim=-1)
        flat, t = r.reshape(-1, r.shape[-1]).float(), types.reshape(-1)
        onehot = F.one_hot(t, self.centroids.shape[0]).to(flat.dtype)  # [N, C]
        count = onehot.sum(0)
        mean = (onehot.t() @ flat) / count.clamp_min(1)[:, None]
        new = F.normalize(self.momentum * self.centroids + (1 - self.momentum) * mean, dim=-1)
        ema = torch.where(count[:, None] > 0, new, self.centroids)
        self.centroids.copy_(torch.where(self.initialized, ema, first))
        self.initialized.fill_(True)


RCL_POSITIVES = ("cross_modal", "within_modality")


def rcl_loss(r: Tensor, types: Tensor, modality: Tensor, tau: float = 0.07,
             queue_emb: Optional[Tensor] = None, queue_types: Optional[Tensor] = None,
             cross_modal_only: bool = False, queue_modality: Optional[Tensor] = None,
             positives: str = "cross_modal") -> Tensor:
    """Eq. 12 over anchors (i, k): r [B, R, d_c] normalised, types [B, R], modality [B].

    In-batch positives: same type, another image (another modality only when
    ``cross_modal_only``); in-batch negatives: other types. Queue entries (slots of type -1 are
    empty and ignored): another type is a negative; with ``positives="cross_modal"`` and
    ``queue_modality`` [Q] given, the same type from another modality is a positive (Eq. 12's
    cross-modal alignment); with ``"within_modality"`` queue entries are negatives only.
    Anchors without a positive are skipped; with none at all the loss is 0 (and keeps the
    graph). No host sync: anchors are masked, not selected."""
    if positives not in RCL_POSITIVES:
        raise ValueError(f"positives must be one of {RCL_POSITIVES}, got {positives!r}")
    b, n_reg, dc = r.shape
    flat = r.reshape(b * n_reg, dc)
    t = types.reshape(-1)
    img = torch.arange(b, device=r.device).repeat_interleave(n_reg)
    mod = modality.to(r.device).repeat_interleave(n_reg)
    logits = flat @ flat.t() / tau
    same_type = t[:, None] == t[None, :]
    other_img = img[:, None] != img[None, :]
    pos = same_type & other_img
    if cross_modal_only:
        pos = pos & (mod[:, None] != mod[None, :])
    neg = ~same_type
    if queue_emb is not None and queue_emb.numel():
        q_logits = flat @ queue_emb.to(flat.dtype).t() / tau
        q_types = queue_types[None, :].to(t.device)
        filled = q_types >= 0
        q_neg = (t[:, None] != q_types) & filled
        if positives == "cross_modal" and queue_modality is not None:
            q_mod = queue_modality[None, :].to(mod.device)
            q_pos = (t[:, None] == q_types) & (mod[:, None] != q_mod) & filled
        else:
            q_pos = torch.zeros_like(q_neg)
        logits = torch.cat([logits, q_logits], dim=1)
        pos = torch.cat([pos, q_pos], dim=1)
        neg = torch.cat([neg, q_neg], dim=1)
    has_pos = pos.any(dim=1)
    ninf = torch.finfo(logits.dtype).min
    log_num = torch.logsumexp(logits.masked_fill(~pos, ninf), dim=1)
    log_den = torch.logsumexp(logits.masked_fill(~(pos | neg), ninf), dim=1)
    per_anchor = torch.where(has_pos, log_den - log_num, torch.zeros_like(log_num))
    return per_anchor.sum() / has_pos.sum().clamp_min(1).to(per_anchor.dtype)


def txt_loss(t: Tensor, text: Tensor, types: Tensor, tau: float = 0.07) -> Tensor:
    """Eq. 13: t [B, R, E] normalised region vectors, text [C, E] normalised phrase vectors,
    types [B, R] the phrase index c(i, k) of each region."""
    logits = t.reshape(-1, t.shape[-1]) @ text.to(t.dtype).t() / tau
    return F.cross_entropy(logits, types.reshape(-1))


def token_laplacian(adjacency: Tensor, tokens_per_region: int) -> Tensor:
    """Laplacian over K = R*m prompt tokens from a region adjacency [.., R, R]: tokens of adjacent
    regions are linked with the regions' weight, tokens of one region with weight 1."""
    eye = torch.eye(adjacency.shape[-1], dtype=adjacency.dtype, device=adjacency.device)
    w = (adjacency * (1 - eye) + eye).repeat_interleave(tokens_per_region, -1)
    w = w.repeat_interleave(tokens_per_region, -2)
    k_eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    w = w * (1 - k_eye)
    return torch.diag_embed(w.sum(-1)) - w


def lap_loss(prompts: Tensor, adjacency: Tensor, tokens_per_region: int) -> Tensor:
    """Eq. 16: prompts [L, B, K, D]; adjacency [R, R] or [B, R, R]. Mean over layers and images
    of tr(P^T L P) / D."""
    lap = token_laplacian(adjacency.to(prompts.dtype), tokens_per_region)  # [K,K] or [B,K,K]
    if lap.dim() == 2:
        lap = lap.expand(prompts.shape[1], -1, -1)
    trace = torch.einsum("lbkd,bkj,lbjd->lb", prompts, lap, prompts)
    return trace.mean() / prompts.shape[-1]


class AVPTLoss(nn.Module):
    """Eq. 17 for an A-VPT model: ``loss(out, labels=, masks=, modality=) -> dict`` with the total
    under ``"loss"`` and every active term. Text vectors of the anatomy phrases are computed once
    by the frozen text tower. ``update_state=True`` (training) pushes region embeddings to the
    queues and updates the EMA centroids after the loss is formed. ``rcl_positives``: whether
    same-type queue entries of other modalities are RCL positives (``"cross_modal"``, Eq. 12 as
    the paper intends) or queue entries are negatives only (``"within_modality"``)."""

    def __init__(self, model, text_tokenizer=None, rcl_positives: str = "cross_modal"):
        super().__init__()
        from ...local_backbone import get_tokenizer
        if rcl_positives not in RCL_POSITIVES:
            raise ValueError(f"rcl_positives must be one of {RCL_POSITIVES}, got {rcl_positives!r}")
        self.rcl_positives = rcl_positives
        c = self.config = model.config  # the model itself is not kept: ``out`` carries its parts
        self.tokens_per_region = c.num_prompts // c.num_regions
        self.queue = RegionQueue(len(MODALITIES), c.queue_size, c.contrast_dim) if c.queue_size else None
        self.centroids = EMACentroids(c.num_regions, c.contrast_dim, c.ema_momentum) \
            if c.region_types == "ema" else None
        if c.region_types not in ("atlas", "ema"):
            raise ValueError(f"region_types must be 'atlas' or 'ema', got {c.region_types!r}")
        self.register_buffer("default_adjacency", torch.tensor(DEFAULT_ADJACENCY)
                             if c.num_regions == 3 else 1 - torch.eye(c.num_regions))
        text = torch.zeros(0)
        if c.lambda_txt:
            tokenizer = text_tokenizer or get_tokenizer(c.model_name)
            # the tokens on the backbone's device: the trainer moves the model before make_loss
            tokens = tokenizer(list(c.text_phrases)).to(next(model.backbone.parameters()).device)
            with torch.no_grad():
                text = model.backbone.encode_text(tokens, normalize=True)
        self.register_buffer("text", text)

    def region_types(self, r: Tensor) -> Tensor:
        if self.centroids is not None:
            return self.centroids.assign(r.detach())
        return torch.arange(r.shape[1], device=r.device).expand(r.shape[0], -1)

    def forward(self, out, labels: Optional[Tensor] = None, masks: Optional[Tensor] = None,
                modality=None, update_state: bool = False) -> Dict[str, Tensor]:
        """``out``: the model's ``MethodOutput`` (its ``region_contrast``, ``region_text``,
        ``prompts`` and ``maps`` feed RCL, TXT and LAP); labels [B]; masks [B, 1, H, W];
        modality [B] indices, names or None."""
        c = self.config
        terms = cls_seg_terms(c, out, labels, masks)
        b = out.features.shape[0]
        mod = _modality_tensor(modality, b, out.features.device)
        r = types = None
        if out.region_contrast is not None and (c.lambda_rcl or c.lambda_txt):
            r = out.region_contrast
            types = self.region_types(r)
        if c.lambda_rcl and r is not None:
            q_emb = q_types = q_mod = None
            if self.queue is not None:
                q_emb, q_types = self.queue.slots()
                q_mod = self.queue.slot_modality()
            terms["rcl"] = rcl_loss(r, types, mod, c.tau, q_emb, q_types, queue_modality=q_mod,
                                    positives=self.rcl_positives)
        if c.lambda_txt and r is not None:
            terms["txt"] = txt_loss(out.region_text, self.text, types, c.tau_txt)
        if c.lambda_lap and out.prompts is not None:
            adj = region_adjacency(out.maps) if out.maps is not None else self.default_adjacency
            terms["lap"] = lap_loss(out.prompts, adj, self.tokens_per_region)
        weights = dict(cls=1.0, seg=c.lambda_seg, rcl=c.lambda_rcl, txt=c.lambda_txt, lap=c.lambda_lap)
        if not terms:
            raise ValueError("no loss term is active: pass labels and/or masks, or enable a "
                             "regulariser")
        total = sum(weights[k] * v for k, v in terms.items())
        if update_state and r is not None:
            if self.queue is not None:
                self.queue.push(r.detach(), types, mod)
            if self.centroids is not None:
                self.centroids.update(r.detach(), types)
        terms["loss"] = total
        return terms


def _modality_tensor(modality, batch: int, device) -> Tensor:
    """Modality indices [B] on ``device`` without a host sync: a tensor is used as it is (its
    values are the loader's, validated there), None or one name fills on the device; only a
    Python list of names/indices goes through ``modality_indices`` (a host-to-device copy)."""
    if isinstance(modality, Tensor):
        if modality.shape != (batch,):
            raise ValueError(f"modality must be a tensor [B={batch}] of indices into "
                             f"{MODALITIES}, got shape {tuple(modality.shape)}")
        return modality.to(device=device, dtype=torch.long)
    if modality is None or isinstance(modality, str):
        name = MODALITIES[0] if modality is None else modality
        if name not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        return torch.full((batch,), MODALITIES.index(name), dtype=torch.long, device=device)
    return modality_indices(modality, batch, device)
