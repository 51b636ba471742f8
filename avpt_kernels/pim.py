"""Prompt-token interaction, PIM (Eqs. 5-10): public entry point, checks and dispatch.

``pim(z[B,T,D], p[B,K,D], params, num_heads) -> (z_out[B,T,D], p_tilde[B,K,D])``
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import _checks, reference
from .backend import resolve
from .reference import PIMParams

# Set to True by the kernel issue that adds this op's Triton kernels.
HAS_TRITON = False

T2P_REDUCE = ("sum", "mean")


def check_args(z: Tensor, p: Tensor, params: PIMParams, num_heads: int, t2p_reduce: str) -> None:
    _checks.tensor(z, "z", 3, "[B, T, D]")
    _checks.tensor(p, "p", 3, "[B, K, D]")
    b, t, d = z.shape
    _checks.nonempty(b, "z", "image (B)")
    _checks.nonempty(d, "z", "channel (D)")
    if t < 2:
        raise ValueError(f"z must have at least 2 tokens (class token + patches) [B, T, D], "
                         f"got shape {tuple(z.shape)}")
    if p.shape[0] != b or p.shape[2] != d:
        raise ValueError(f"p must have shape ({b}, K, {d}) [B, K, D] to match z {tuple(z.shape)}, "
                         f"got {tuple(p.shape)}")
    _checks.nonempty(p.shape[1], "p", "prompt token (K)")
    if not isinstance(params, PIMParams):
        raise TypeError(f"params must be a PIMParams, got {type(params).__name__}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if t2p_reduce not in T2P_REDUCE:
        raise ValueError(f"t2p_reduce must be one of {T2P_REDUCE}, got {t2p_reduce!r}")
    for name in PIMParams._fields:
        _checks.tensor(getattr(params, name), f"params.{name}", (1, 2), "")
    a = params.t2p_q_w.shape[0]
    if a < 1 or a % num_heads:
        raise ValueError(f"params.t2p_q_w has A={a} output features, which num_heads={num_heads} "
                         f"must divide (A = num_heads * head_dim)")
    g = params.gate_w1.shape[0]
    _checks.nonempty(g, "params.gate_w1", "hidden unit (G)")
    expected = {}
    for side in ("t2p", "p2t"):
        for proj in "qkv":
            expected[f"{side}_{proj}_w"], expected[f"{side}_{proj}_b"] = (a, d), (a,)
        expected[f"{side}_o_w"], expected[f"{side}_o_b"] = (d, a), (d,)
    expected.update(gate_w1=(g, 2 * d), gate_b1=(g,), gate_w2=(1, g), gate_b2=(1,))
    for name, shape in expected.items():
        _checks.shape(getattr(params, name), f"params.{name}", shape, f"(D={d}, A={a}, G={g})")
    _checks.same_dtype_device("z", z, p=p, **{f"params.{n}": getattr(params, n)
                                              for n in PIMParams._fields})


def pim(z: Tensor, p: Tensor, params: PIMParams, num_heads: int, t2p_reduce: str = "sum",
        return_attn: bool = False, *, backend: Optional[str] = None):
    """PIM, Eqs. 5-10: token->prompt then prompt->token cross-attention and a gated residual.

    z [B,T,D] tokens (class token at index 0), p [B,K,D] prompts, params: ``PIMParams``
    (nn.Linear layout), ``num_heads`` heads of width A / num_heads, scale 1/sqrt(head width).
    ``t2p_reduce``: "sum" (Eq. 6 as written) or "mean" (divide the token sum by T).
    Returns ``(z_out [B,T,D], p_tilde [B,K,D])`` and, with ``return_attn``, the prompt->token
    attention ``[B,H,K,T]`` (for rollout, Eq. 18).
    """
    check_args(z, p, params, num_heads, t2p_reduce)
    resolve("pim", z.device, backend, has_triton=HAS_TRITON)
    return reference.pim(z, p, params, num_heads, t2p_reduce, return_attn)
