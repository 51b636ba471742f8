"""What a user would pick instead of the fused kernels: PIM (Eqs. 5-10) written the way a PyTorch
expert would write it, for the benchmarks' "expert" providers (``benchmarks/ops/test_pim.py``:
as it is, and under ``torch.compile(mode="max-autotune")``).

Against ``ops.pim.reference.pim`` (which keeps the paper's one-``nn.Linear``-per-projection
layout and upcasts 16-bit inputs to fp32), this version:

* runs in the input dtype (bf16 stays bf16 on the tensor cores; only the softmax is fp32);
* fuses the projections into one GEMM per input: tokens ``z @ [Wq1*s; Wv1; Wk2]^T`` (the three
  token-side projections, [D -> 3A]), prompts ``p @ Wk1^T``, and the updated prompts
  ``p~ @ [Wq2*s; Wv2]^T`` ([D -> 2A]), with the softmax scale s = dh^-1/2 folded into the query
  weights; the fused weights are made once (``fuse_pim_weights``), as a module would hold them;
* writes the gated residual as ``z + alpha * update`` (one fused multiply-add, the same value as
  ``(1 - alpha) z + alpha (z + update)``).

Why not ``F.scaled_dot_product_attention``: neither PIM direction is attention in SDPA's sense.
SDPA normalises over the keys and sums over the keys. Token->prompt (Eqs. 5-6) normalises each
token's scores over the K prompts and sums over the T tokens (``msg = softmax_K(Q1 K1^T)^T V1``);
prompt->token (Eqs. 7-8) normalises each prompt's scores over the T tokens and sums over the K
prompts (``update = softmax_T(Q2 K2^T)^T V2``). Both are the transpose of SDPA's product, so SDPA
cannot compute either without materialising the probabilities (e.g. SDPA with an identity
value), which is what the explicit softmax + two batched matmuls below do anyway, at K = 6.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops.pim import PIMParams


class ExpertPIMWeights(NamedTuple):
    """PIM's weights in the fused layout (``nn.Linear`` layout, weight [out, in]).

    z_w [3A, D], z_b [3A]: token-side queries (scaled), values (t2p) and keys (p2t);
    p_w [A, D], p_b [A]: prompt keys (t2p); pt_w [2A, D], pt_b [2A]: updated-prompt queries
    (scaled) and values (p2t); o1_*, o2_*: the two output projections [D, A]; gate1_* [G, 2D],
    gate2_* [1, G]: the gate MLP.
    """
    z_w: Tensor
    z_b: Tensor
    p_w: Tensor
    p_b: Tensor
    pt_w: Tensor
    pt_b: Tensor
    o1_w: Tensor
    o1_b: Tensor
    o2_w: Tensor
    o2_b: Tensor
    gate1_w: Tensor
    gate1_b: Tensor
    gate2_w: Tensor
    gate2_b: Tensor


def fuse_pim_weights(params: PIMParams, num_heads: int) -> ExpertPIMWeights:
    """The fused layout of ``params`` (differentiable: gradients flow back to ``params``)."""
    attn = params.t2p_q_w.shape[0]
    if attn % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the attention width A={attn}")
    scale = 1.0 / math.sqrt(attn // num_heads)
    w = params
    return ExpertPIMWeights(
        torch.cat([w.t2p_q_w * scale, w.t2p_v_w, w.p2t_k_w]),
        torch.cat([w.t2p_q_b * scale, w.t2p_v_b, w.p2t_k_b]),
        w.t2p_k_w, w.t2p_k_b,
        torch.cat([w.p2t_q_w * scale, w.p2t_v_w]), torch.cat([w.p2t_q_b * scale, w.p2t_v_b]),
        w.t2p_o_w, w.t2p_o_b, w.p2t_o_w, w.p2t_o_b,
        w.gate_w1, w.gate_b1, w.gate_w2, w.gate_b2)


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, S, H*dh] -> [B, H, S, dh] (a view)."""
    b, s, a = x.shape
    return x.view(b, s, num_heads, a // num_heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """[B, H, S, dh] -> [B, S, H*dh]."""
    b, h, s, dh = x.shape
    return x.transpose(1, 2).reshape(b, s, h * dh)


def _softmax(scores: Tensor) -> Tensor:
    """Softmax over the last axis in at least fp32, back in the scores' dtype."""
    return scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)


def pim_expert(z: Tensor, p: Tensor, w: ExpertPIMWeights, num_heads: int):
    """Eqs. 5-10 for one layer (``t2p_reduce="sum"``), in the input dtype.

    z: [B, T, D] tokens (class token at 0); p: [B, K, D] prompts; w: ``fuse_pim_weights(...)``.
    Returns ``(z_out [B,T,D], p_tilde [B,K,D])``, equal to ``ops.pim.reference.pim`` up to
    rounding.
    """
    attn = w.p_w.shape[0]
    q1, v1, k2 = F.linear(z, w.z_w, w.z_b).split(attn, dim=-1)  # [B,T,A] each
    k1 = F.linear(p, w.p_w, w.p_b)                                 # [B,K,A]
    q1, v1, k2, k1 = (_split_heads(x, num_heads) for x in (q1, v1, k2, k1))
    # (i) token -> prompt: softmax over the K prompts, sum over the T tokens.
    s1 = _softmax(q1 @ k1.transpose(-1, -2))                       # [B,H,T,K]
    p_tilde = p + F.linear(_merge(s1.transpose(-1, -2) @ v1), w.o1_w, w.o1_b)
    # (ii) prompt -> token: softmax over the T tokens, sum over the K prompts.
    q2, v2 = (_split_heads(x, num_heads)
              for x in F.linear(p_tilde, w.pt_w, w.pt_b).split(attn, dim=-1))
    s2 = _softmax(q2 @ k2.transpose(-1, -2))                       # [B,H,K,T]
    update = F.linear(_merge(s2.transpose(-1, -2) @ v2), w.o2_w, w.o2_b)  # [B,T,D]
    # (iii) gated residual: (1 - a) z + a (z + update) = z + a * update, one scalar per image.
    hidden = F.gelu(F.linear(torch.cat([p_tilde.mean(dim=1), z[:, 0]], dim=-1),
                             w.gate1_w, w.gate1_b))
    alpha = torch.sigmoid(F.linear(hidden, w.gate2_w, w.gate2_b))  # [B, 1]
    return torch.addcmul(z, alpha[:, :, None], update), p_tilde
