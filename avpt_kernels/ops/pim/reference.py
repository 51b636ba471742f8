"""Literal PyTorch of the A-VPT equations: the ground truth every backend is tested against.

Each function computes in fp32 (fp64 stays fp64) whatever the input dtype and casts the outputs
back to the input dtype, so that the low-precision backends are compared with the exact answer
rather than with another rounding of it. Autocast is switched off inside (``no_autocast``): an
enclosing ``torch.autocast`` region does not turn the fp32 math into bf16/fp16 math, and the
outputs have the documented dtypes whatever the caller's autocast state. (Autograd replays the
backward outside this guard: take the backward outside the autocast region, as PyTorch
recommends.) No argument checking happens here: the public entry points
(``avpt_kernels.region_pool`` / ``prompt_bank`` / ``pim`` / ``low_rank_project``) validate
before dispatching.

Notation: B batch, T = N+1 tokens (class token at index 0), N patch tokens, D hidden size,
K prompt tokens, R regions, H heads, dh head width, A = H*dh, L layers, S stages, r rank.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autocast import no_autocast


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: fp64 stays fp64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Eq. 2 — soft region pooling
# --------------------------------------------------------------------------------------------
def downsample_maps(maps: Tensor, grid: Tuple[int, int]) -> Tensor:
    """Area-average pixel-resolution maps onto the patch grid.

    maps: [B, R, Hm, Wm] with Hm = f*Hg, Wm = f*Wg  ->  [B, N=Hg*Wg, R] (row-major patch order).

    The paper says "bilinearly downsampled"; for an integer factor, bilinear interpolation with
    anti-aliasing tends to the box (area) average, which is exact, cheap and fusable, so that is
    the contract here.
    """
    b, r, hm, wm = maps.shape
    hg, wg = grid
    pooled = F.avg_pool2d(maps, kernel_size=(hm // hg, wm // wg))  # [B, R, Hg, Wg]
    return pooled.reshape(b, r, hg * wg).transpose(1, 2)


@no_autocast
def region_pool(features: Tensor, maps: Tensor, eps: float = 1e-6,
                grid: Optional[Tuple[int, int]] = None) -> Tensor:
    """Eq. 2: ``out[b,k] = sum_p A[b,p,k] F[b,p] / (sum_p A[b,p,k] + eps)``.

    features: [B, T, D] (class token first, excluded) or [B, N, D] (patch tokens only).
    maps:     [B, N, R] at token resolution, or [B, R, Hm, Wm] at pixel resolution together with
              ``grid=(Hg, Wg)``, Hg*Wg = N.
    returns:  [B, R, D] in the dtype of ``features``.
    """
    cdt = compute_dtype(features.dtype)
    a = maps.to(cdt)
    if a.dim() == 4:
        a = downsample_maps(a, grid)
    n = a.shape[1]
    f = features[:, features.shape[1] - n:].to(cdt)  # drop the class token if present
    num = torch.einsum("bpk,bpd->bkd", a, f)
    den = a.sum(dim=1).unsqueeze(-1) + eps
    return (num / den).to(features.dtype)


# --------------------------------------------------------------------------------------------
# Eq. 4 — low-rank, stage-shared prompt bank, all layers at once
# --------------------------------------------------------------------------------------------
_STAGE_INDEX: Dict[Tuple[Tuple[int, ...], torch.device, torch.dtype], Tensor] = {}


def stage_index(layer_stage: Sequence[int], device: torch.device,
                dtype: torch.dtype = torch.long) -> Tensor:
    """``layer_stage`` as a tensor on ``device``, cached per (stages, device, dtype): building it
    from the Python list on every call (``torch.as_tensor(list, device="cuda")``) would be a
    blocking host-to-device copy, a host sync, per forward. Made outside inference mode (the
    index is saved for the backward). Under a FakeTensorMode (launch counting, export) the cache
    lives on that mode; while torch.compile traces, no cache (the graph holds the constant)."""
    key = (tuple(int(s) for s in layer_stage), torch.device(device), dtype)
    if torch.compiler.is_compiling():
        return torch.tensor(key[0], dtype=dtype, device=device)
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode()
    cache = _STAGE_INDEX if fake_mode is None else fake_mode.__dict__.setdefault(
        "_avpt_stage_index", {})
    cached = cache.get(key)
    if cached is None:
        with torch.inference_mode(False):
            cached = cache[key] = torch.tensor(key[0], dtype=dtype, device=device)
    return cached


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


@no_autocast
def low_rank_project(x: Tensor, U: Tensor, V: Tensor, layer_stage: Sequence[int]) -> Tensor:
    """Every layer's rank-r projection, ``out[l] = x(l) U[s(l)] V[s(l)]`` (CILMP's x A_l^T B_l^T).

    x: [N, Din] (shared by every layer) or [L, N, Din] (x(l) = x[l]).
    U: [S, Din, r], V: [S, r, Dout]  stage factors; layer_stage: L ints, the stage of each layer.
    returns: [L, N, Dout] in the dtype of ``x``.
    """
    cdt = compute_dtype(x.dtype)
    stage = stage_index(layer_stage, x.device)
    u, v = U.to(cdt)[stage], V.to(cdt)[stage]  # [L, Din, r], [L, r, Dout]
    low = torch.einsum("nd,ldr->lnr" if x.dim() == 2 else "lnd,ldr->lnr", x.to(cdt), u)
    return (low @ v).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Eqs. 5-10 — prompt-token interaction (PIM)
# --------------------------------------------------------------------------------------------
class PIMParams(NamedTuple):
    """Every weight of a PIM layer, in ``nn.Linear`` layout (weight [out, in], bias [out]).

    t2p_*: token->prompt attention (Eqs. 5-6), p2t_*: prompt->token attention (Eqs. 7-8);
    q/k/v weights are [A, D], o weights [D, A]; gate: Linear(2D, G) -> GELU -> Linear(G, 1).
    """
    t2p_q_w: Tensor
    t2p_q_b: Tensor
    t2p_k_w: Tensor
    t2p_k_b: Tensor
    t2p_v_w: Tensor
    t2p_v_b: Tensor
    t2p_o_w: Tensor
    t2p_o_b: Tensor
    p2t_q_w: Tensor
    p2t_q_b: Tensor
    p2t_k_w: Tensor
    p2t_k_b: Tensor
    p2t_v_w: Tensor
    p2t_v_b: Tensor
    p2t_o_w: Tensor
    p2t_o_b: Tensor
    gate_w1: Tensor
    gate_b1: Tensor
    gate_w2: Tensor
    gate_b2: Tensor


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
