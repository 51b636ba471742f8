"""BiomedAP's gated cross-modal fusion block (the trainable arithmetic of ``avpt.methods.biomedap``
with its loss terms in ``loss.py``; the fidelity tests compare both with a literal fp64
re-implementation).

Fusion, with V [B, K, d_v] (visual prompt tokens) and T [B, M, d_t] (text context tokens), both
projected to the unified width u = max(d_v, d_t) for attention and back to their own width after:

    V~ = MHA_h(q=V, k=v=T)          T~ = MHA_h(q=T, k=v=V)
    G_v = sigmoid(W_gv V + b_gv)    G_t = sigmoid(W_gt T + b_gt)
    V_f = G_v * V + (1 - G_v) * V~  T_f = G_t * T + (1 - G_t) * T~
    V' = LN(V + V_f)                T' = LN(T + T_f)
    V_out = V' + FFN(V')            T_out = T' + FFN(T')      FFN: 4x, GELU, dropout
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn


def _maybe_linear(d_in: int, d_out: int) -> nn.Module:
    return nn.Linear(d_in, d_out) if d_in != d_out else nn.Identity()


class _Side(nn.Module):
    """The per-modality part after attention: gate, residual LayerNorm, FFN (width d)."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.gate = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x: Tensor, attended: Tensor) -> Tensor:
        """x, attended: [B, N, d] -> [B, N, d]."""
        g = torch.sigmoid(self.gate(x))
        fused = g * x + (1 - g) * attended
        y = self.norm(x + fused)
        return y + self.ffn(y)


class GatedCrossModalFusion(nn.Module):
    """One fusion block (one per fusion layer). ``forward(v [B, K, d_v], t [B, M, d_t])`` ->
    (v_out [B, K, d_v], t_out [B, M, d_t] or None when ``text_side=False``).

    Parameters: the in/out projections exist only for the narrower modality (none when
    d_v = d_t); ``count(d_v, d_t, text_side)`` gives the trainable total."""

    def __init__(self, d_v: int, d_t: int, heads: int = 8, dropout: float = 0.1,
                 text_side: bool = True):
        super().__init__()
        u = max(d_v, d_t)
        if heads < 1 or u % heads:
            raise ValueError(f"fusion_heads must divide the unified width max(d_v={d_v}, "
                             f"d_t={d_t}) = {u}, got {heads}")
        self.text_side = text_side
        self.v_in, self.v_back = _maybe_linear(d_v, u), _maybe_linear(u, d_v)
        self.attn_v = nn.MultiheadAttention(u, heads, dropout=dropout, batch_first=True)
        self.side_v = _Side(d_v, dropout)
        self.t_in = _maybe_linear(d_t, u)
        if text_side:
            self.t_back = _maybe_linear(u, d_t)
            self.attn_t = nn.MultiheadAttention(u, heads, dropout=dropout, batch_first=True)
            self.side_t = _Side(d_t, dropout)

    @staticmethod
    def count(d_v: int, d_t: int, text_side: bool = True) -> int:
        """Trainable parameters of one block: per side d: gate d^2 + d, LayerNorm 2d, FFN
        8d^2 + 5d, MHA 4u^2 + 4u, and (d != u) projections in and out 2ud + u + d; the text
        side's projection in is used by the visual side's attention (k, v) too."""
        u = max(d_v, d_t)

        def side(d):
            return (d * d + d) + 2 * d + (8 * d * d + 5 * d) + (4 * u * u + 4 * u)

        def proj(d, both):
            return 0 if d == u else (u * d + u) + (u * d + d if both else 0)
        total = side(d_v) + proj(d_v, True) + proj(d_t, False)
        if text_side:
            total += side(d_t) + (0 if d_t == u else u * d_t + d_t)
        return total

    def forward(self, v: Tensor, t: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        t = t.to(v.dtype)
        pv, pt = self.v_in(v), self.t_in(t)
        v_att = self.v_back(self.attn_v(pv, pt, pt, need_weights=False)[0])
        v_out = self.side_v(v, v_att)
        if not self.text_side:
            return v_out, None
        t_att = self.t_back(self.attn_t(pt, pv, pv, need_weights=False)[0])
        return v_out, self.side_t(t, t_att)


__all__ = ["GatedCrossModalFusion"]
