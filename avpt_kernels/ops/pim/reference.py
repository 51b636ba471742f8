"""Eqs. 5-10 (PIM) in literal PyTorch: the ground truth of ``pim`` (conventions: ``ops.common``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._autocast import no_autocast
from ..common import compute_dtype
from .weights import PIMParams


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, S, A] -> [B, H, S, dh]."""
    b, s, a = x.shape
    return x.reshape(b, s, num_heads, a // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[B, H, S, dh] -> [B, S, A]."""
    b, h, s, dh = x.shape
    return x.transpose(1, 2).reshape(b, s, h * dh)


@no_autocast
def pim(z: Tensor, p: Tensor, params: PIMParams, num_heads: int, t2p_reduce: str = "sum",
        return_attn: bool = False):
    """Eqs. 5-10 for one layer.

    z: [B, T, D] visual tokens (class token at index 0); p: [B, K, D] prompts.
    returns ``(z_out [B,T,D], p_tilde [B,K,D])``, plus the prompt->token attention
    ``[B, H, K, T]`` (fp32, or fp64 for fp64 inputs) when ``return_attn``.
    """
    cdt = compute_dtype(z.dtype)
    w = PIMParams(*(t.to(cdt) for t in params))
    zc, pc = z.to(cdt), p.to(cdt)
    head_dim = w.t2p_q_w.shape[0] // num_heads
    scale = 1.0 / math.sqrt(head_dim)

    # (i) token -> prompt: every token spreads itself over the prompts (softmax over K, Eq. 5),
    # the prompts collect what they received (sum over tokens, Eq. 6).
    q1 = _heads(F.linear(zc, w.t2p_q_w, w.t2p_q_b), num_heads)  # [B,H,T,dh]
    k1 = _heads(F.linear(pc, w.t2p_k_w, w.t2p_k_b), num_heads)  # [B,H,K,dh]
    v1 = _heads(F.linear(zc, w.t2p_v_w, w.t2p_v_b), num_heads)  # [B,H,T,dh]
    s1 = torch.softmax((q1 @ k1.transpose(-1, -2)) * scale, dim=-1)  # [B,H,T,K]
    msg = s1.transpose(-1, -2) @ v1  # [B,H,K,dh]
    if t2p_reduce == "mean":
        msg = msg / z.shape[1]
    p_tilde = pc + F.linear(_merge_heads(msg), w.t2p_o_w, w.t2p_o_b)

    # (ii) prompt -> token: every prompt spreads itself over the tokens (softmax over T, Eq. 7),
    # each token collects from the prompts (Eq. 8).
    q2 = _heads(F.linear(p_tilde, w.p2t_q_w, w.p2t_q_b), num_heads)  # [B,H,K,dh]
    k2 = _heads(F.linear(zc, w.p2t_k_w, w.p2t_k_b), num_heads)  # [B,H,T,dh]
    v2 = _heads(F.linear(p_tilde, w.p2t_v_w, w.p2t_v_b), num_heads)  # [B,H,K,dh]
    s2 = torch.softmax((q2 @ k2.transpose(-1, -2)) * scale, dim=-1)  # [B,H,K,T]
    update = F.linear(_merge_heads(s2.transpose(-1, -2) @ v2), w.p2t_o_w, w.p2t_o_b)  # [B,T,D]

    z_hat = zc + update
    # (iii) gated residual fusion, one scalar per image (Eqs. 9-10).
    gate_in = torch.cat([p_tilde.mean(dim=1), zc[:, 0]], dim=-1)  # [B, 2D]
    hidden = F.gelu(F.linear(gate_in, w.gate_w1, w.gate_b1))
    alpha = torch.sigmoid(F.linear(hidden, w.gate_w2, w.gate_b2))  # [B, 1]
    alpha = alpha[:, :, None]
    z_out = (1.0 - alpha) * zc + alpha * z_hat

    out = (z_out.to(z.dtype), p_tilde.to(p.dtype))
    if return_attn:
        return out + (s2,)
    return out
