"""Low-rank, stage-shared prompt bank (Eq. 4): entry point, checks, launchers, autograd (the
Triton kernels described here live in ``kernels``).

``prompt_bank(region_emb[B,R,D], token_offset[K,D], U[S,D,r], V[S,r,D], layer_bias[L,D],
ln_weight[L,D], ln_bias[L,D], layer_stage[L]) -> prompts[L,B,K,D]`` (all layers, one call).

Rows are the B*K prompt tokens (row = b*K + k, token k of region k // m, m = K / R):
``e[row] = E[b, k // m] + off[k]``, ``low[l, row] = e[row] @ U[s(l)]`` (rank r),
``x = low @ V[s(l)] + bias[l]``, ``P[l, row] = LN(x) * ln_weight[l] + ln_bias[l]``.

Kernels (fp32 accumulation, rank padded to 16 for ``tl.dot``, fp32 dots in ieee precision; no
atomics: every sum runs in one fixed order, so results are deterministic). Counts at the model
shape (B=32, R=3, K=6, D=768, L=12, S=3, r=8, bf16: BK = 192 rows, 12 row tiles of 16, 12 D
chunks of 64; an H100/H200 has 132 SMs):

* forward, one launch: ``_prompt_bank_fwd_kernel``, grid (L, row tiles) = 144 programs (one
  wave). Per tile: ``low`` (one pass over D), then the LayerNorm mean, variance and output in
  three passes over D chunks that recompute ``x`` from ``low`` (r FMAs per element) instead of
  holding rows of D in registers: 4 x 12 = 48 serial D-chunk steps. Saves low [L,BK,r], mean and
  rstd [L,BK] (fp32) for the backward. DRAM: 3.92 MB (prompts 3.54 MB, inputs and weights 0.28
  MB, low/mean/rstd 0.09 MB; floor ``prompt_bank_min_bytes`` 3.82 MB); ~0.13 GFLOP.
* backward, two launches:
  1. ``_prompt_bank_bwd_rows_kernel``, grid (L, row tiles) = 144 programs, 2 x 12 = 24 serial
     D-chunk steps: the LayerNorm row terms ``c1 = mean(dxhat)``, ``c2 = mean(dxhat * xhat)``
     (pass 1, registers), then ``dx``, ``dlow = dx @ V^T`` and the tile's column partials
     (pass 2): sums over its rows of dout, dout * xhat, dx (d ln_bias, d ln_weight, d
     layer_bias) and ``low^T dx`` (its share of dV), fp32 [L, tiles, 3 + r, D]. Reads dout once
     from DRAM (3.54 MB; pass 2 from L2), writes 4.9 MB of partials (L2-resident on a 50 MB L2);
     ~0.15 GFLOP.
  2. ``_prompt_bank_bwd_inputs_kernel``, grid (D chunks, E tiles + offset tiles + S + L) =
     (12, 6 + 1 + 3 + 12) = 264 programs: d region_emb, d token_offset (``dlow @ U^T`` summed
     over the layers: 12 serial layer steps, up to 32 images or M tokens summed per load), per
     stage dU = ``e^T sum_{l in s} dlow[l]`` (4 x 3 steps of 64 rows) and dV (the partials, 16
     tiles per load), per layer the three [D] gradients (the partials, one load of 16 tiles).
     Writes 0.3 MB of gradients.
  DRAM at B=32: 3.8 MB (partials in L2) to 8.7 MB (partials spilled to DRAM); floor 4.11 MB.
  Before (three launches): the same rows kernel without the partials; a per-layer kernel, grid
  (L, D chunks) = 144 programs of 12 serial row-tile steps that read dout a second time (3.54 MB)
  for the column sums; the inputs kernel on (12, 10) = 120 programs (fewer than the SMs) with
  24 serial steps in its offset job; 11 allocations per call (now one fp32 workspace + the 7
  gradients).
  The launchers make inputs, parameters and the prompts' gradient contiguous (a stride-0
  gradient, from ``prompts.sum()``, is materialised once). Under autocast (16-bit region_emb,
  fp32 master weights) the rows kernel reads the 16-bit gradient as it is (before: cast to fp32
  first, one more launch and 3x its bytes) and only region_emb is cast for the inputs kernel.

Precision (the bounded-error rule of ``avpt_kernels.testing``, tested in
``tests/ops/test_prompt_bank.py``): no contraction here has two exact 16-bit operands, so every
``tl.dot`` takes fp32 operands and accumulates in fp32 (``e = E + off`` is an fp32 sum; low, dx,
dlow are fp32 intermediates). The LayerNorm statistics, c1, c2 and the column sums are fp32, and
the backward rebuilds x from the fp32 ``low``, never from the prompts rounded to the input dtype.
Each result is rounded to the input dtype once, when stored.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ... import _checks
from ...backend import resolve
from ..common import stage_index
from ..kernel_config import KernelConfig, signature, tl_type, with_aligned
from . import reference
from .kernels import (_prompt_bank_bwd_inputs_kernel, _prompt_bank_bwd_rows_kernel,
                      _prompt_bank_fwd_kernel)

# Dtypes the kernels take (float64 runs on the torch backend: see ``prompt_bank``).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_RANK = 16  # one padded block of rank (tl.dot needs >= 16 anyway)


def check_args(region_emb, token_offset, U, V, layer_bias, ln_weight, ln_bias, layer_stage,
               eps) -> None:
    _checks.tensor(region_emb, "region_emb", 3, "[B, R, D]")
    b, r, d = region_emb.shape
    _checks.nonempty(b, "region_emb", "image (B)")
    _checks.nonempty(r, "region_emb", "region (R)")
    _checks.nonempty(d, "region_emb", "channel (D)")
    _checks.tensor(token_offset, "token_offset", 2, "[K, D]")
    k = token_offset.shape[0]
    _checks.nonempty(k, "token_offset", "prompt token (K)")
    if k % r:
        raise ValueError(f"token_offset has K={k} tokens, which is not a multiple of R={r} "
                         f"regions: each region expands to K/R tokens")
    _checks.shape(token_offset, "token_offset", (k, d), "[K, D]")
    _checks.tensor(U, "U", 3, "[S, D, r]")
    s, _, rank = U.shape
    _checks.nonempty(s, "U", "stage (S)")
    _checks.nonempty(rank, "U", "rank (r)")
    _checks.shape(U, "U", (s, d, rank), "[S, D, r]")
    _checks.tensor(V, "V", 3, "[S, r, D]")
    _checks.shape(V, "V", (s, rank, d), "[S, r, D]")
    _checks.tensor(layer_bias, "layer_bias", 2, "[L, D]")
    n_layers = layer_bias.shape[0]
    _checks.nonempty(n_layers, "layer_bias", "layer (L)")
    for name, t in (("layer_bias", layer_bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _checks.tensor(t, name, 2, "[L, D]")
        _checks.shape(t, name, (n_layers, d), "[L, D]")
    _checks.same_dtype_device("token_offset", token_offset, U=U, V=V, layer_bias=layer_bias,
                              ln_weight=ln_weight, ln_bias=ln_bias)
    if token_offset.device != region_emb.device:
        raise ValueError(f"the weights are on {token_offset.device} but region_emb is on "
                         f"{region_emb.device}; move them to one device")
    if token_offset.dtype not in (region_emb.dtype, torch.float32):
        raise TypeError(f"the weights have dtype {token_offset.dtype}; expected region_emb's "
                        f"dtype ({region_emb.dtype}) or float32 master weights")
    stages = list(layer_stage) if not isinstance(layer_stage, (str, bytes)) else None
    if stages is None or len(stages) != n_layers or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < s for x in stages):
        raise ValueError(f"layer_stage must be {n_layers} ints (one per layer), each a stage "
                         f"index in [0, {s}), got {layer_stage!r}")
    _checks.positive(eps, "eps")



# ---- Launchers --------------------------------------------------------------------------------
_BLOCK_T = 16
_BLOCK_RANK = MAX_RANK
_BLOCK_D = 64
_WARPS = 4
_INPUTS_WARPS = 16  # 4 warps spill (fp32, sm_80); 8 spill a few bytes as launched (Triton 3.8)
# images / tokens summed per load; dU rows per step; row tiles of partials summed per load
_INPUTS_BLOCKS = dict(BLOCK_INNER=32, BLOCK_ROWS=64, BLOCK_TILES=16)


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) (``triton.cdiv`` is a constexpr function: ~2 us per host call)."""
    return -(-a // b)

def _stage_tensor(layer_stage: Sequence[int], device: torch.device) -> Tensor:
    """layer_stage as an int32 device tensor, cached: a host-to-device copy on every call would
    stall the host on CUDA. The cache is ``ops.common.stage_index``'s (fake tensors, e.g. of the
    launch counter, are cached on their FakeTensorMode, never in the process-wide cache)."""
    return stage_index(layer_stage, device, torch.int32)


def _forward(region_emb, token_offset, U, V, layer_bias, ln_weight, ln_bias, layer_stage, eps):
    b, r, d = region_emb.shape
    k, rank, n_layers = token_offset.shape[0], U.shape[2], layer_bias.shape[0]
    dev = region_emb.device
    out = torch.empty((n_layers, b, k, d), dtype=region_emb.dtype, device=dev)
    low = torch.empty((n_layers, b * k, rank), dtype=torch.float32, device=dev)
    mean = torch.empty((n_layers, b * k), dtype=torch.float32, device=dev)
    rstd = torch.empty_like(mean)
    grid = (n_layers, _cdiv(b * k, _BLOCK_T))
    _prompt_bank_fwd_kernel[grid](
        region_emb.contiguous(), token_offset.contiguous(), U.contiguous(), V.contiguous(),
        layer_bias.contiguous(), ln_weight.contiguous(), ln_bias.contiguous(),
        _stage_tensor(layer_stage, dev), out, low, mean, rstd,
        b * k, k, k // r, r, d, rank, eps,
        BLOCK_T=_BLOCK_T, BLOCK_RANK=_BLOCK_RANK, BLOCK_D=_BLOCK_D, num_warps=_WARPS)
    return out, low, mean, rstd


def _backward(grad_out, region_emb, token_offset, U, V, layer_bias, ln_weight, low, mean, rstd,
              layer_stage):
    b, r, d = region_emb.shape
    k, rank, n_layers, n_stages = token_offset.shape[0], U.shape[2], layer_bias.shape[0], U.shape[0]
    dev, dt, wdt = region_emb.device, region_emb.dtype, token_offset.dtype
    bk = b * k
    stage = _stage_tensor(layer_stage, dev)
    grad_out = grad_out.contiguous()
    if wdt != dt:  # 16-bit inputs, fp32 master weights: the rows kernel reads the 16-bit grad_out
        # as it is; the inputs kernel runs on fp32 region_emb (its mixed-dtype build spills under
        # Triton 3.6): a small cast, d_emb cast back
        region_emb = region_emb.float()
    V, layer_bias, ln_weight = V.contiguous(), layer_bias.contiguous(), ln_weight.contiguous()
    n_row_tiles = _cdiv(bk, _BLOCK_T)
    # One fp32 workspace: dlow [L,BK,r], colsum [L,tiles,3,D], dv_part [L,tiles,r,D].
    # Each part padded to 32 floats: 128-byte aligned, as a tensor of its own would be.
    sizes = [-(-n // 32) * 32 for n in (n_layers * bk * rank, n_layers * n_row_tiles * 3 * d,
                                        n_layers * n_row_tiles * rank * d)]
    dlow, colsum, dv_part = torch.empty(sum(sizes), dtype=torch.float32, device=dev).split(sizes)
    d_emb = torch.empty((b, r, d), dtype=region_emb.dtype, device=dev)
    d_off = torch.empty((k, d), dtype=wdt, device=dev)  # weight gradients in the weights' dtype
    d_u = torch.empty(U.shape, dtype=wdt, device=dev)
    d_v = torch.empty(V.shape, dtype=wdt, device=dev)
    d_bias = torch.empty((n_layers, d), dtype=wdt, device=dev)
    d_lnw = torch.empty((n_layers, d), dtype=wdt, device=dev)
    d_lnb = torch.empty((n_layers, d), dtype=wdt, device=dev)
    blocks = dict(BLOCK_T=_BLOCK_T, BLOCK_RANK=_BLOCK_RANK, BLOCK_D=_BLOCK_D)

    _prompt_bank_bwd_rows_kernel[(n_layers, n_row_tiles)](
        grad_out, V, layer_bias, ln_weight, stage, low, mean, rstd, dlow, colsum, dv_part,
        bk, d, rank, **blocks, num_warps=_WARPS)
    n_group_tiles, n_token_tiles = _cdiv(b * r, _BLOCK_T), _cdiv(k, _BLOCK_T)
    _prompt_bank_bwd_inputs_kernel[(_cdiv(d, _BLOCK_D),
                                    n_group_tiles + n_token_tiles + n_stages + n_layers)](
        region_emb.contiguous(), token_offset.contiguous(), U.contiguous(), stage, dlow,
        colsum, dv_part, d_emb, d_off, d_u, d_v, d_lnw, d_lnb, d_bias,
        b, k, k // r, r, d, rank, n_layers, n_stages, n_group_tiles, n_token_tiles, n_row_tiles,
        **blocks, **_INPUTS_BLOCKS, num_warps=_INPUTS_WARPS)
    return d_emb.to(dt), d_off, d_u, d_v, d_bias, d_lnw, d_lnb


# ---- Custom ops + autograd --------------------------------------------------------------------
@torch.library.custom_op("avpt::prompt_bank", mutates_args=())
def prompt_bank_op(region_emb: Tensor, token_offset: Tensor, U: Tensor, V: Tensor,
                   layer_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                   layer_stage: List[int], eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton Eq. 4. Returns (prompts [L,B,K,D], and for the backward, not differentiable:
    low [L,B*K,r], LayerNorm mean and rstd [L,B*K], all fp32)."""
    return _forward(region_emb, token_offset, U, V, layer_bias, ln_weight, ln_bias, layer_stage,
                    eps)


@prompt_bank_op.register_fake
def _(region_emb, token_offset, U, V, layer_bias, ln_weight, ln_bias, layer_stage, eps):
    b, _, d = region_emb.shape
    k, rank, n_layers = token_offset.shape[0], U.shape[2], layer_bias.shape[0]
    stats = region_emb.new_empty((n_layers, b * k), dtype=torch.float32)
    return (region_emb.new_empty((n_layers, b, k, d)),
            region_emb.new_empty((n_layers, b * k, rank), dtype=torch.float32),
            stats, torch.empty_like(stats))


@torch.library.custom_op("avpt::prompt_bank_backward", mutates_args=())
def prompt_bank_backward_op(grad_out: Tensor, region_emb: Tensor, token_offset: Tensor,
                            U: Tensor, V: Tensor, layer_bias: Tensor, ln_weight: Tensor,
                            low: Tensor, mean: Tensor, rstd: Tensor,
                            layer_stage: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor,
                                                             Tensor, Tensor, Tensor]:
    """Gradients of ``prompt_bank_op`` w.r.t. (region_emb, token_offset, U, V, layer_bias,
    ln_weight, ln_bias), three launches."""
    return _backward(grad_out, region_emb, token_offset, U, V, layer_bias, ln_weight, low, mean,
                     rstd, layer_stage)


@prompt_bank_backward_op.register_fake
def _(grad_out, region_emb, token_offset, U, V, layer_bias, ln_weight, low, mean, rstd,
      layer_stage):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return (like(region_emb), like(token_offset), like(U), like(V), like(layer_bias),
            like(ln_weight), like(ln_weight))


def _setup_context(ctx, inputs, output):
    region_emb, token_offset, U, V, layer_bias, ln_weight, _ln_bias, layer_stage, _eps = inputs
    _out, low, mean, rstd = output
    ctx.mark_non_differentiable(low, mean, rstd)
    ctx.save_for_backward(region_emb, token_offset, U, V, layer_bias, ln_weight, low, mean, rstd)
    ctx.layer_stage = list(layer_stage)


def _backward_autograd(ctx, grad_out, _grad_low, _grad_mean, _grad_rstd):
    grads = prompt_bank_backward_op(grad_out, *ctx.saved_tensors, ctx.layer_stage)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + (None, None)


prompt_bank_op.register_autograd(_backward_autograd, setup_context=_setup_context)




def triton_unsupported_reason(region_emb: Tensor, U: Tensor) -> Optional[str]:
    """Why the Triton kernels cannot take these (already validated) arguments, or None."""
    if region_emb.dtype not in KERNEL_DTYPES:
        return f"region_emb dtype {region_emb.dtype} (the kernels take {KERNEL_DTYPES})"
    if U.shape[2] > MAX_RANK:
        return f"U with rank r={U.shape[2]} (the kernels take rank r <= {MAX_RANK})"
    return None


def prompt_bank(region_emb: Tensor, token_offset: Tensor, U: Tensor, V: Tensor,
                layer_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                layer_stage: Sequence[int], eps: float = 1e-5, *,
                backend: Optional[str] = None) -> Tensor:
    """Eq. 4 for all L layers at once: ``P[l] = LN_l((E_tok U[s(l)]) V[s(l)] + b[l])``.

    region_emb [B,R,D]; token_offset [K,D] with K = R*m (token k belongs to region k // m);
    U [S,D,r], V [S,r,D] stage-shared factors; layer_bias, ln_weight, ln_bias [L,D];
    layer_stage: L stage indices. Returns prompts [L,B,K,D] in the dtype of ``region_emb``.
    The weights share one dtype: region_emb's, or float32 (master weights, read as they are).

    The Triton kernels take float32/bfloat16/float16 and r <= 16; other inputs (float64, larger
    rank) run on the torch backend under ``backend="auto"`` and raise under ``"triton"``.
    """
    check_args(region_emb, token_offset, U, V, layer_bias, ln_weight, ln_bias, layer_stage, eps)
    stages = [int(x) for x in layer_stage]
    use = resolve("prompt_bank", region_emb.device, backend,
                  lambda: triton_unsupported_reason(region_emb, U))
    if use == "torch":
        return reference.prompt_bank(region_emb, token_offset, U, V, layer_bias, ln_weight,
                                     ln_bias, stages, eps)
    return prompt_bank_op(region_emb, token_offset, U, V, layer_bias, ln_weight, ln_bias, stages,
                          float(eps))[0]


# ---- Ahead-of-time compile list ---------------------------------------------------------------
_INPUT_POINTERS = ("emb_ptr", "out_ptr", "dout_ptr", "demb_ptr")
_FP32_POINTERS = ("low_ptr", "mean_ptr", "rstd_ptr", "dlow_ptr", "colsum_ptr", "dv_part_ptr")


def aot_configs() -> List:
    """Every kernel configuration the launchers above can select (per input and weight dtype);
    signatures from the kernels' parameter lists: pointers in the input dtype, the fp32
    intermediates, the int32 stage table, and the weights (and their gradients) in the rest."""
    blocks = dict(BLOCK_T=_BLOCK_T, BLOCK_RANK=_BLOCK_RANK, BLOCK_D=_BLOCK_D)
    configs = []
    # (input dtype, weight dtype): the weights in the input dtype, or fp32 master weights
    types = [tl_type(dt) for dt in KERNEL_DTYPES]
    for ty, wty in [(ty, ty) for ty in types] + [("bf16", "fp32"), ("fp16", "fp32")]:
        pointers = {**{n: f"*{ty}" for n in _INPUT_POINTERS},
                    **{n: "*fp32" for n in _FP32_POINTERS}, "stage_ptr": "*i32"}
        for fn in (_prompt_bank_fwd_kernel, _prompt_bank_bwd_rows_kernel,
                   _prompt_bank_bwd_inputs_kernel):
            if wty != ty and fn is _prompt_bank_bwd_inputs_kernel:
                continue  # mixed-dtype calls run it on fp32 region_emb (see _backward)
            consts = dict(blocks)
            warps = _WARPS
            if fn is _prompt_bank_bwd_inputs_kernel:
                consts.update(_INPUTS_BLOCKS)
                warps = _INPUTS_WARPS
            sig = signature(fn, pointers, ("eps",), pointer=f"*{wty}")
            configs.append(KernelConfig(fn, sig, consts, num_warps=warps))
    return with_aligned(configs, _MODEL_SHAPE_ODD, _MODEL_SHAPE_ONES)


# At the model's shape (K=6 prompts, R=3 regions, rank 8, 12 layers): the sizes and tile counts
# that are no multiple of 16, and the ints equal to 1: ``kernel_config.aligned``.
_MODEL_SHAPE_ODD = ("K", "M", "R", "RANK", "L", "n_group_tiles", "n_row_tiles")
_MODEL_SHAPE_ONES = ("S", "n_token_tiles")
