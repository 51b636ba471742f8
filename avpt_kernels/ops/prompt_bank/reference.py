"""Eq. 4 in literal PyTorch: the ground truth of ``prompt_bank`` (conventions: ``ops.common``)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..._autocast import no_autocast
from ..common import compute_dtype, stage_index


@no_autocast
def prompt_bank(region_emb: Tensor, token_offset: Tensor, U: Tensor, V: Tensor,
                layer_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                layer_stage: Sequence[int], eps: float = 1e-5) -> Tensor:
    """Eq. 4 for every layer: ``P[l] = LN_l(E_tok @ U[s(l)] @ V[s(l)] + b[l])``.

    region_emb:   [B, R, D]  region embeddings E (Eq. 3).
    token_offset: [K, D]     learned offset of each prompt token; K = R*m, token k belongs to
                             region k // m, so ``E_tok[b,k] = E[b, k//m] + token_offset[k]``.
    U: [S, D, r], V: [S, r, D]  stage-shared low-rank factors (W_p = U V).
    layer_bias, ln_weight, ln_bias: [L, D]  per-layer bias and LayerNorm affine.
    layer_stage:  L ints, the stage s(l) of each layer.
    returns:      [L, B, K, D] in the dtype of ``region_emb``.
    """
    cdt = compute_dtype(region_emb.dtype)
    k, r = token_offset.shape[0], region_emb.shape[1]
    e_tok = region_emb.to(cdt).repeat_interleave(k // r, dim=1) + token_offset.to(cdt)
    stage = stage_index(layer_stage, region_emb.device)
    u, v = U.to(cdt)[stage], V.to(cdt)[stage]  # [L, D, r], [L, r, D]
    low = torch.einsum("bkd,ldr->lbkr", e_tok, u)
    x = torch.einsum("lbkr,lre->lbke", low, v) + layer_bias.to(cdt)[:, None, None, :]
    mu = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, unbiased=False, keepdim=True)
    y = (x - mu) * torch.rsqrt(var + eps)
    y = y * ln_weight.to(cdt)[:, None, None, :] + ln_bias.to(cdt)[:, None, None, :]
    return y.to(region_emb.dtype)
