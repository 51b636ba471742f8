"""PIM's public entry points (``pim``, ``pim_packed``), argument checks, dispatch (the limits of
``weights`` applied), and the custom ops ``avpt::pim_forward`` / ``avpt::pim_backward`` with
their autograd registration; the launch sequences they run are ``launch``'s."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _checks
from ...backend import resolve
from . import launch, reference
from .weights import (HEAD_WIDTHS, MAX_GATE_HIDDEN, MAX_PROMPTS, MAX_WIDTH, TRITON_DTYPES,
                      PIMParams, pack_weights, packed_size, unpack_weights)

T2P_REDUCE = ("sum", "mean")


def check_args(z: Tensor, p: Tensor, params: PIMParams, num_heads: int, t2p_reduce: str) -> None:
    check_tokens(z, p, num_heads, t2p_reduce)
    _check_params(z, params, num_heads)


def check_tokens(z: Tensor, p: Tensor, num_heads: int, t2p_reduce: str) -> None:
    """The checks of ``check_args`` that do not involve the weights."""
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
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if t2p_reduce not in T2P_REDUCE:
        raise ValueError(f"t2p_reduce must be one of {T2P_REDUCE}, got {t2p_reduce!r}")
    _checks.same_dtype_device("z", z, p=p)


def _check_params(z: Tensor, params: PIMParams, num_heads: int) -> None:
    d = z.shape[2]
    if not isinstance(params, PIMParams):
        raise TypeError(f"params must be a PIMParams, got {type(params).__name__}")
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
    _checks.same_dtype_device("params.t2p_q_w", params.t2p_q_w,
                              **{f"params.{n}": getattr(params, n) for n in PIMParams._fields[1:]})
    _check_weights_match(z, params.t2p_q_w, "params")


def _check_weights_match(z: Tensor, w: Tensor, name: str) -> None:
    if w.device != z.device:
        raise ValueError(f"{name} are on {w.device} but z is on {z.device}; "
                         f"move them to one device")
    if w.dtype not in (z.dtype, torch.float32):
        raise TypeError(f"{name} have dtype {w.dtype}; expected z's dtype "
                        f"({z.dtype}) or float32 master weights")


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
def triton_unsupported_reason(z: Tensor, p: Tensor, params: PIMParams, num_heads: int) -> Optional[str]:
    """Why the Triton path cannot run these (already validated) arguments, or None."""
    a = params.t2p_q_w.shape[0]
    return unsupported_sizes(z.dtype, z.shape[2], p.shape[1], num_heads, a // num_heads,
                             params.gate_w1.shape[0])


def unsupported_sizes(dtype: torch.dtype, d: int, k: int, num_heads: int, head_dim: int,
                      gate_hidden: int) -> Optional[str]:
    """``triton_unsupported_reason`` from the sizes alone (a few comparisons: ``pim_packed``
    needs no weight views for it)."""
    a = num_heads * head_dim
    if dtype not in TRITON_DTYPES:
        return f"z dtype {dtype} (the kernels take float32, float16 or bfloat16)"
    if k > MAX_PROMPTS:
        return f"K={k} prompts (the kernels take 1 to {MAX_PROMPTS})"
    if not HEAD_WIDTHS[0] <= head_dim <= HEAD_WIDTHS[1]:
        return f"head width {head_dim} (the kernels take {HEAD_WIDTHS[0]} to {HEAD_WIDTHS[1]})"
    if a > MAX_WIDTH:
        return f"attention width A={a} (num_heads * head width; the kernels take at most {MAX_WIDTH})"
    if gate_hidden > MAX_GATE_HIDDEN:
        return f"gate hidden width {gate_hidden} (the kernels take at most {MAX_GATE_HIDDEN})"
    return None


def _pick_backend(z: Tensor, p: Tensor, num_heads: int, head_dim: int, gate_hidden: int,
                  backend: Optional[str]) -> str:
    return resolve("pim", z.device, backend,
                   lambda: unsupported_sizes(z.dtype, z.shape[2], p.shape[1], num_heads, head_dim,
                                             gate_hidden))


# --------------------------------------------------------------------------------------------
# Custom ops + autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("avpt::pim_forward", mutates_args=())
def pim_forward_op(z: Tensor, p: Tensor, w: Tensor, num_heads: int, head_dim: int,
                   gate_hidden: int, mean_reduce: bool,
                   return_attn: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """z [B,T,D], p [B,K,D], w [N] fp32 (``pack_weights`` layout) -> z_out [B,T,D],
    p_tilde [B,K,D], attn [B,H,K,T] fp32 (or [0]), and the fp32 state [S] the backward reads."""
    return launch._forward(z, p, w, num_heads, head_dim, gate_hidden, mean_reduce, return_attn)


@pim_forward_op.register_fake
def _(z, p, w, num_heads, head_dim, gate_hidden, mean_reduce, return_attn):
    L = launch._Layout(z, p, num_heads, head_dim, gate_hidden)
    attn = z.new_empty((L.b, num_heads, L.k, L.t) if return_attn else (0,), dtype=torch.float32)
    return (torch.empty_like(z), torch.empty_like(p), attn,
            z.new_empty(L.state_size, dtype=torch.float32))


@torch.library.custom_op("avpt::pim_backward", mutates_args=())
def pim_backward_op(grad_out: Tensor, grad_p_tilde: Optional[Tensor], z: Tensor, p: Tensor,
                    w: Tensor, state: Tensor, num_heads: int, head_dim: int, gate_hidden: int,
                    mean_reduce: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """-> dz, dp, dw (fp32 [N]) of pim_forward_op."""
    return launch._backward(grad_out, grad_p_tilde, z, p, w, state, num_heads, head_dim, gate_hidden,
                     mean_reduce)


@pim_backward_op.register_fake
def _(grad_out, grad_p_tilde, z, p, w, state, num_heads, head_dim, gate_hidden, mean_reduce):
    return torch.empty_like(z), torch.empty_like(p), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    z, p, w, num_heads, head_dim, gate_hidden, mean_reduce, _ = inputs
    ctx.save_for_backward(z, p, w, output[3])
    ctx.sizes = (num_heads, head_dim, gate_hidden, mean_reduce)
    ctx.mark_non_differentiable(output[2], output[3])


def _backward_formula(ctx, grad_out, grad_p_tilde, *unused):
    z, p, w, state = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(z)
    dz, dp, dw = pim_backward_op(grad_out, grad_p_tilde, z, p, w, state, *ctx.sizes)
    return dz, dp, dw, None, None, None, None, None


pim_forward_op.register_autograd(_backward_formula, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
def _fused(z: Tensor, p: Tensor, flat: Tensor, num_heads: int, head_dim: int, gate_hidden: int,
           t2p_reduce: str, return_attn: bool):
    w = flat.float()  # the kernels read fp32 weights: a no-op for fp32 (master) weights
    z_out, p_tilde, attn, _ = pim_forward_op(z, p, w, num_heads, head_dim, gate_hidden,
                                             t2p_reduce == "mean", return_attn)
    return (z_out, p_tilde, attn) if return_attn else (z_out, p_tilde)


def pim(z: Tensor, p: Tensor, params: PIMParams, num_heads: int, t2p_reduce: str = "sum",
        return_attn: bool = False, *, backend: Optional[str] = None):
    """PIM, Eqs. 5-10: token->prompt then prompt->token cross-attention and a gated residual.

    z [B,T,D] tokens (class token at index 0), p [B,K,D] prompts, params: ``PIMParams``
    (nn.Linear layout; in z's dtype or float32 master weights), ``num_heads`` heads of width
    A / num_heads, scale 1/sqrt(head width). ``t2p_reduce``: "sum" (Eq. 6 as written) or "mean"
    (divide the token sum by T). Returns ``(z_out [B,T,D], p_tilde [B,K,D])`` and, with
    ``return_attn``, the prompt->token attention ``[B,H,K,T]`` (for rollout, Eq. 18; fp32, and
    not differentiated on the Triton path). The Triton path packs the weights into one vector
    first (one copy); ``pim_packed`` takes them packed.
    """
    check_args(z, p, params, num_heads, t2p_reduce)
    head_dim, gate_hidden = params.t2p_q_w.shape[0] // num_heads, params.gate_w1.shape[0]
    if _pick_backend(z, p, num_heads, head_dim, gate_hidden, backend) == "torch":
        return reference.pim(z, p, params, num_heads, t2p_reduce, return_attn)
    return _fused(z, p, pack_weights(params), num_heads, head_dim, gate_hidden, t2p_reduce,
                  return_attn)


def pim_packed(z: Tensor, p: Tensor, weights: Tensor, num_heads: int, head_dim: int,
               gate_hidden: int, t2p_reduce: str = "sum", return_attn: bool = False, *,
               backend: Optional[str] = None):
    """``pim`` with the weights packed in one flat vector ``weights`` [N] (``pack_weights``
    layout, ``packed_size(D, num_heads * head_dim, gate_hidden)`` elements): what
    ``PromptTokenInteraction`` calls. The Triton path reads the vector in place (fp32: no copy,
    no per-weight cast) and returns its gradient as one vector."""
    _checks.tensor(z, "z", 3, "[B, T, D]")
    _checks.tensor(weights, "weights", 1, "[N] (pack_weights layout)")
    for name, value in dict(head_dim=head_dim, gate_hidden=gate_hidden).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    d = z.shape[2]
    want = packed_size(d, num_heads * head_dim, gate_hidden)
    if weights.numel() != want:
        raise ValueError(f"weights must have {want} elements (D={d}, A={num_heads * head_dim}, "
                         f"G={gate_hidden}: see packed_size), got {weights.numel()}")
    # The weights are one tensor of the right size, so their views have the right shapes and
    # share one dtype and device: only the token checks and that match remain (host time: this
    # runs every layer of every step).
    check_tokens(z, p, num_heads, t2p_reduce)
    _check_weights_match(z, weights, "weights")
    if _pick_backend(z, p, num_heads, head_dim, gate_hidden, backend) == "torch":
        params = unpack_weights(weights, d, num_heads * head_dim, gate_hidden)
        return reference.pim(z, p, params, num_heads, t2p_reduce, return_attn)
    return _fused(z, p, weights, num_heads, head_dim, gate_hidden, t2p_reduce, return_attn)

