"""Per-layer rank-r projection (CILMP's knowledge chain): entry point, checks, Triton kernels,
autograd.

``low_rank_project(x[N,Din] | x[L,N,Din], U[S,Din,r], V[S,r,Dout], layer_stage[L])
-> out[L,N,Dout]`` (all layers, one call): ``low[l] = x(l) @ U[s(l)]`` (rank r),
``out[l] = low[l] @ V[s(l)]``, with ``x(l) = x`` when x is 2-D (one input shared by every layer)
and ``x[l]`` when it is 3-D. CILMP's ``x A_l^T B_l^T`` is ``U = A.transpose(1, 2)``,
``V = B.transpose(1, 2)``, ``layer_stage = range(L)``: the kernels read U and V through their
strides, so those transposed views go in without a copy (and dU, dV are allocated with U's and
V's strides, so dA, dB come back contiguous). x and the upstream gradient are made contiguous.

Kernels (fp32 accumulation, rank padded to 16 for ``tl.dot``, fp32 dots in ieee precision):

* forward, one launch: ``_low_rank_project_fwd_kernel``, grid (L, row tiles). Per tile: ``low``
  (one pass over Din chunks), then ``out`` chunk by chunk over Dout. Nothing Din- or Dout-sized
  is kept beyond one tile; saves low [L,N,r] (fp32) for the backward.
* backward, two launches:
  1. ``_low_rank_project_bwd_out_kernel``, grid (L * row tiles + S * Dout chunks): the first
     jobs ``dlow[l, rows] = dout[l, rows] @ V[s(l)]^T`` (fp32 [L,N,r]), the others
     ``dV[s][:, chunk] = sum_{l in s} low[l]^T dout[l][:, chunk]``.
  2. ``_low_rank_project_bwd_in_kernel``, grid (Din chunks, row jobs + S): the first jobs
     ``dx = dlow @ U^T`` (summed over the layers when x is shared, one layer's rows when it is
     per-layer), the last S ``dU[s] = sum_{l in s} x(l)^T dlow[l]``.
  Every program owns its outputs (no atomics): deterministic.

Counts at the benchmark shape (``spec``: N = B*K = 192 rows of a shared x, Din = Dout = 768,
r = 8, L = 12, S = 3, bf16; 16-row tiles, 64-wide D chunks; 132 SMs):

* forward: grid (12, 12) = 144 programs (one wave), 12 + 12 = 24 serial D-chunk steps. DRAM:
  x 0.29 MB (the 12 layers' programs read it again from L2), out 3.54 MB, low 0.07 MB (floor
  ``low_rank_project_min_bytes`` 3.91 MB); 57 MFLOP (twice that issued: rank padded to 16).
* backward: (1) 144 dlow jobs of 12 serial Dout steps + 3 x 12 dV jobs of 4 layers x 6 row
  steps (24 serial) = 180 programs; (2) grid (12, 12 dx jobs + 3 dU jobs) = 180 programs, dx
  summing 12 layers (12 serial steps), dU 4 layers x 6 row steps (24 serial). DRAM: dout 3.54 MB
  (read by the dlow and the dV jobs: once more if L2 evicts it), x, dx, dlow < 0.7 MB (floor
  4.28 MB). The critical path is the 24-step dU / dV jobs: 64-row steps (12 serial) spill
  16-24 B under Triton 3.6 at 8 warps, so they stay at 32.

Precision (the bounded-error rule of ``avpt_kernels.testing``, tested in
``tests/ops/test_low_rank_project.py``): every operand is loaded in its dtype and converted to fp32,
every ``tl.dot`` takes fp32 operands and accumulates in fp32; ``low`` and ``dlow`` stay fp32
(never rounded to a 16-bit dtype), so each result (out, dx, dU, dV) is rounded to the input
dtype once, when stored. x, U and V share one dtype.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _checks
from ...backend import resolve
from ..common import stage_index
from ..kernel_config import KernelConfig, signature, tl_type, with_aligned
from . import reference

# Dtypes the kernels take (float64 runs on the torch backend: see ``low_rank_project``).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_RANK = 16  # one padded block of rank (tl.dot needs >= 16 anyway)


def check_args(x, U, V, layer_stage) -> None:
    _checks.tensor(x, "x", (2, 3), "[N, Din] (shared) or [L, N, Din]")
    _checks.tensor(U, "U", 3, "[S, Din, r]")
    s, din, rank = U.shape
    _checks.nonempty(s, "U", "stage (S)")
    _checks.nonempty(din, "U", "input channel (Din)")
    _checks.nonempty(rank, "U", "rank (r)")
    _checks.tensor(V, "V", 3, "[S, r, Dout]")
    dout = V.shape[2]
    _checks.nonempty(dout, "V", "output channel (Dout)")
    _checks.shape(V, "V", (s, rank, dout), "[S, r, Dout]")
    stages = list(layer_stage) if not isinstance(layer_stage, (str, bytes, Tensor)) else None
    if stages is None or not stages or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < s for v in stages):
        raise ValueError(f"layer_stage must be a non-empty sequence of ints (one per layer), each "
                         f"a stage index in [0, {s}), got {layer_stage!r}")
    n_layers = len(stages)
    n = x.shape[-2]
    _checks.nonempty(n, "x", "row (N)")
    if x.dim() == 2:
        _checks.shape(x, "x", (n, din), "[N, Din] (Din from U)")
    else:
        _checks.shape(x, "x", (n_layers, n, din), "[L, N, Din] (L from layer_stage, Din from U)")
    _checks.same_dtype_device("x", x, U=U, V=V)


# ---- Triton kernels ---------------------------------------------------------------------------
@triton.jit
def _low_rank_project_fwd_kernel(
        x_ptr, u_ptr, v_ptr, stage_ptr, out_ptr, low_ptr,
        N, DIN, DOUT, RANK, x_layer_rows,
        su_s, su_d, su_r, sv_s, sv_r, sv_o,
        BLOCK_T: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[l, rows] = (x(l)[rows] @ U[s]) @ V[s] for BLOCK_T rows of layer l (s = stage[l]).
    x_layer_rows: 0 (shared x [N,Din]) or N (x [L,N,Din], row l*N + n); out [L,N,Dout];
    low [L,N,RANK] fp32."""
    layer = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_rows = rows < N
    stage = tl.load(stage_ptr + layer)
    offs_q = tl.arange(0, BLOCK_RANK)
    mask_q = offs_q < RANK
    x_rows = x_ptr + (layer * x_layer_rows + rows).to(tl.int64)[:, None] * DIN

    low = tl.zeros((BLOCK_T, BLOCK_RANK), dtype=tl.float32)
    for d0 in range(0, DIN, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < DIN
        x = tl.load(x_rows + offs_d[None, :], mask=mask_rows[:, None] & mask_d[None, :],
                    other=0.0).to(tl.float32)
        u = tl.load(u_ptr + stage * su_s + offs_d[:, None] * su_d + offs_q[None, :] * su_r,
                    mask=mask_d[:, None] & mask_q[None, :], other=0.0).to(tl.float32)
        low += tl.dot(x, u, input_precision="ieee")

    out_rows = out_ptr + (layer * N + rows).to(tl.int64)[:, None] * DOUT
    for o0 in range(0, DOUT, BLOCK_D):
        offs_o = o0 + tl.arange(0, BLOCK_D)
        mask_o = offs_o < DOUT
        v = tl.load(v_ptr + stage * sv_s + offs_q[:, None] * sv_r + offs_o[None, :] * sv_o,
                    mask=mask_q[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
        y = tl.dot(low, v, input_precision="ieee")
        tl.store(out_rows + offs_o[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=mask_rows[:, None] & mask_o[None, :])

    tl.store(low_ptr + (layer * N + rows)[:, None] * RANK + offs_q[None, :], low,
             mask=mask_rows[:, None] & mask_q[None, :])


@triton.jit
def _low_rank_project_bwd_out_kernel(
        dout_ptr, v_ptr, stage_ptr, low_ptr, dlow_ptr, dv_ptr,
        N, DOUT, RANK, L, n_row_tiles, n_low_jobs, n_out_chunks,
        sv_s, sv_r, sv_o, sdv_s, sdv_r, sdv_o,
        BLOCK_T: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_RANK: tl.constexpr,
        BLOCK_D: tl.constexpr):
    """The output-side gradients; axis 0 picks the job:

    [0, n_low_jobs = L * n_row_tiles): dlow[l, rows] = dout[l, rows] @ V[s(l)]^T, fp32
        [L,N,RANK] (one pass over Dout chunks);
    [n_low_jobs, + S * n_out_chunks): dV[s][:, chunk] = sum_{l in s} low[l]^T dout[l][:, chunk]
        (BLOCK_ROWS rows per step), stored in dV's dtype and strides.
    dout [L,N,Dout] contiguous."""
    job = tl.program_id(0)
    offs_q = tl.arange(0, BLOCK_RANK)
    mask_q = offs_q < RANK
    if job < n_low_jobs:
        layer = job // n_row_tiles
        rows = (job % n_row_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_rows = rows < N
        stage = tl.load(stage_ptr + layer)
        dout_rows = dout_ptr + (layer * N + rows).to(tl.int64)[:, None] * DOUT
        dlow = tl.zeros((BLOCK_T, BLOCK_RANK), dtype=tl.float32)
        for o0 in range(0, DOUT, BLOCK_D):
            offs_o = o0 + tl.arange(0, BLOCK_D)
            mask_o = offs_o < DOUT
            dy = tl.load(dout_rows + offs_o[None, :], mask=mask_rows[:, None] & mask_o[None, :],
                         other=0.0).to(tl.float32)
            v = tl.load(v_ptr + stage * sv_s + offs_q[:, None] * sv_r + offs_o[None, :] * sv_o,
                        mask=mask_q[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
            dlow += tl.dot(dy, tl.trans(v), input_precision="ieee")
        tl.store(dlow_ptr + (layer * N + rows)[:, None] * RANK + offs_q[None, :], dlow,
                 mask=mask_rows[:, None] & mask_q[None, :])
    else:
        stage = (job - n_low_jobs) // n_out_chunks
        offs_o = ((job - n_low_jobs) % n_out_chunks) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_o = offs_o < DOUT
        dv = tl.zeros((BLOCK_RANK, BLOCK_D), dtype=tl.float32)
        for layer in range(L):
            if tl.load(stage_ptr + layer) == stage:
                for t0 in range(0, N, BLOCK_ROWS):
                    rows = t0 + tl.arange(0, BLOCK_ROWS)
                    mask_rows = rows < N
                    low = tl.load(low_ptr + (layer * N + rows)[:, None] * RANK + offs_q[None, :],
                                  mask=mask_rows[:, None] & mask_q[None, :], other=0.0)
                    dy = tl.load(dout_ptr + (layer * N + rows).to(tl.int64)[:, None] * DOUT
                                 + offs_o[None, :], mask=mask_rows[:, None] & mask_o[None, :],
                                 other=0.0).to(tl.float32)
                    dv += tl.dot(tl.trans(low), dy, input_precision="ieee")
        tl.store(dv_ptr + stage * sdv_s + offs_q[:, None] * sdv_r + offs_o[None, :] * sdv_o,
                 dv.to(dv_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_o[None, :])


@triton.jit
def _low_rank_project_bwd_in_kernel(
        x_ptr, u_ptr, stage_ptr, dlow_ptr, dx_ptr, du_ptr,
        N, DIN, RANK, L, n_row_tiles, n_dx_jobs, x_layer_rows,
        su_s, su_d, su_r, sdu_s, sdu_d, sdu_r,
        BLOCK_T: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_RANK: tl.constexpr,
        BLOCK_D: tl.constexpr):
    """One Din chunk (axis 0) of the input-side gradients; axis 1 picks the job:

    [0, n_dx_jobs): dx of BLOCK_T rows, ``sum_l dlow[l, rows] @ U[s(l)]^T`` over every layer
        when x is shared (x_layer_rows 0, n_dx_jobs = n_row_tiles), or one layer's
        ``dlow[l, rows] @ U[s(l)]^T`` when x is [L,N,Din] (n_dx_jobs = L * n_row_tiles);
    [n_dx_jobs, + S): dU[s][chunk] = sum_{l in s} x(l)[:, chunk]^T dlow[l] (BLOCK_ROWS rows per
        step), stored in dU's dtype and strides."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIN
    job = tl.program_id(1)
    offs_q = tl.arange(0, BLOCK_RANK)
    mask_q = offs_q < RANK
    if job < n_dx_jobs:
        if x_layer_rows == 0:
            first = job * 0
            last = first + L
        else:
            first = job // n_row_tiles
            last = first + 1
        rows = (job % n_row_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_rows = rows < N
        dx = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for layer in range(first, last):
            stage = tl.load(stage_ptr + layer)
            dlow = tl.load(dlow_ptr + (layer * N + rows)[:, None] * RANK + offs_q[None, :],
                           mask=mask_rows[:, None] & mask_q[None, :], other=0.0)
            u_t = tl.load(u_ptr + stage * su_s + offs_q[:, None] * su_r + offs_d[None, :] * su_d,
                          mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            dx += tl.dot(dlow, u_t, input_precision="ieee")
        tl.store(dx_ptr + (first * x_layer_rows + rows).to(tl.int64)[:, None] * DIN
                 + offs_d[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_rows[:, None] & mask_d[None, :])
    else:
        stage = job - n_dx_jobs
        du = tl.zeros((BLOCK_D, BLOCK_RANK), dtype=tl.float32)
        for layer in range(L):
            if tl.load(stage_ptr + layer) == stage:
                for t0 in range(0, N, BLOCK_ROWS):
                    rows = t0 + tl.arange(0, BLOCK_ROWS)
                    mask_rows = rows < N
                    x = tl.load(x_ptr + (layer * x_layer_rows + rows).to(tl.int64)[:, None] * DIN
                                + offs_d[None, :],
                                mask=mask_rows[:, None] & mask_d[None, :], other=0.0
                                ).to(tl.float32)
                    dlow = tl.load(dlow_ptr + (layer * N + rows)[:, None] * RANK
                                   + offs_q[None, :], mask=mask_rows[:, None] & mask_q[None, :],
                                   other=0.0)
                    du += tl.dot(tl.trans(x), dlow, input_precision="ieee")
        tl.store(du_ptr + stage * sdu_s + offs_d[:, None] * sdu_d + offs_q[None, :] * sdu_r,
                 du.to(du_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_q[None, :])


# ---- Launchers --------------------------------------------------------------------------------
_BLOCK_T = 16  # rows per program (dx at 32 rows spills 48 B on sm_90a in 16-bit, 4 warps)
_BLOCK_ROWS = 32   # rows per step of the dU / dV sums
_BLOCK_RANK = MAX_RANK
_BLOCK_D = 64
_WARPS = 4


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) (``triton.cdiv`` is a constexpr function: ~2 us per host call)."""
    return -(-a // b)


def _stage_tensor(layer_stage: Sequence[int], device: torch.device) -> Tensor:
    """layer_stage as an int32 device tensor, cached (``ops.common.stage_index``): no
    host-to-device copy per call."""
    return stage_index(layer_stage, device, torch.int32)


def _forward(x: Tensor, U: Tensor, V: Tensor, layer_stage: Sequence[int]) -> Tuple[Tensor, Tensor]:
    n_layers, n, din = len(layer_stage), x.shape[-2], x.shape[-1]
    rank, dout = U.shape[2], V.shape[2]
    dev = x.device
    out = torch.empty((n_layers, n, dout), dtype=x.dtype, device=dev)
    low = torch.empty((n_layers, n, rank), dtype=torch.float32, device=dev)
    grid = (n_layers, _cdiv(n, _BLOCK_T))
    _low_rank_project_fwd_kernel[grid](
        x.contiguous(), U, V, _stage_tensor(layer_stage, dev), out, low,
        n, din, dout, rank, n if x.dim() == 3 else 0, *U.stride(), *V.stride(),
        BLOCK_T=_BLOCK_T, BLOCK_RANK=_BLOCK_RANK, BLOCK_D=_BLOCK_D, num_warps=_WARPS)
    return out, low


def _backward(grad_out: Tensor, x: Tensor, U: Tensor, V: Tensor, low: Tensor,
              layer_stage: Sequence[int]) -> Tuple[Tensor, Tensor, Tensor]:
    n_layers, n, din = len(layer_stage), x.shape[-2], x.shape[-1]
    n_stages, rank, dout = U.shape[0], U.shape[2], V.shape[2]
    dev = x.device
    stage = _stage_tensor(layer_stage, dev)
    grad_out = grad_out.contiguous()  # a stride-0 gradient (out.sum()) is materialised once
    x = x.contiguous()
    dlow = torch.empty((n_layers, n, rank), dtype=torch.float32, device=dev)
    d_x = torch.empty(x.shape, dtype=x.dtype, device=dev)
    d_u = torch.empty_like(U)  # U's strides (dense U), so a transposed view's gradient is too
    d_v = torch.empty_like(V)
    n_row_tiles = _cdiv(n, _BLOCK_T)
    n_low_jobs, n_out_chunks = n_layers * n_row_tiles, _cdiv(dout, _BLOCK_D)
    blocks = dict(BLOCK_T=_BLOCK_T, BLOCK_ROWS=_BLOCK_ROWS, BLOCK_RANK=_BLOCK_RANK,
                  BLOCK_D=_BLOCK_D)
    _low_rank_project_bwd_out_kernel[(n_low_jobs + n_stages * n_out_chunks,)](
        grad_out, V, stage, low, dlow, d_v,
        n, dout, rank, n_layers, n_row_tiles, n_low_jobs, n_out_chunks,
        *V.stride(), *d_v.stride(), **blocks, num_warps=_WARPS)
    n_dx_jobs = n_row_tiles * (n_layers if x.dim() == 3 else 1)
    _low_rank_project_bwd_in_kernel[(_cdiv(din, _BLOCK_D), n_dx_jobs + n_stages)](
        x, U, stage, dlow, d_x, d_u,
        n, din, rank, n_layers, n_row_tiles, n_dx_jobs, n if x.dim() == 3 else 0,
        *U.stride(), *d_u.stride(), **blocks, num_warps=_WARPS)
    return d_x, d_u, d_v


# ---- Custom ops + autograd --------------------------------------------------------------------
@torch.library.custom_op("avpt::low_rank_project", mutates_args=())
def low_rank_project_op(x: Tensor, U: Tensor, V: Tensor,
                        layer_stage: List[int]) -> Tuple[Tensor, Tensor]:
    """Triton rank-r projection of every layer. Returns (out [L,N,Dout], and for the backward,
    not differentiable: low [L,N,r] fp32)."""
    return _forward(x, U, V, layer_stage)


@low_rank_project_op.register_fake
def _(x, U, V, layer_stage):
    n_layers, n = len(layer_stage), x.shape[-2]
    return (x.new_empty((n_layers, n, V.shape[2])),
            x.new_empty((n_layers, n, U.shape[2]), dtype=torch.float32))


@torch.library.custom_op("avpt::low_rank_project_backward", mutates_args=())
def low_rank_project_backward_op(grad_out: Tensor, x: Tensor, U: Tensor, V: Tensor, low: Tensor,
                                 layer_stage: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``low_rank_project_op`` w.r.t. (x, U, V), two launches."""
    return _backward(grad_out, x, U, V, low, layer_stage)


@low_rank_project_backward_op.register_fake
def _(grad_out, x, U, V, low, layer_stage):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(U),
            torch.empty_like(V))


def _setup_context(ctx, inputs, output):
    x, U, V, layer_stage = inputs
    _out, low = output
    ctx.mark_non_differentiable(low)
    ctx.save_for_backward(x, U, V, low)
    ctx.layer_stage = list(layer_stage)


def _backward_autograd(ctx, grad_out, _grad_low):
    grads = low_rank_project_backward_op(grad_out, *ctx.saved_tensors, ctx.layer_stage)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + (None,)


low_rank_project_op.register_autograd(_backward_autograd, setup_context=_setup_context)




def triton_unsupported_reason(x: Tensor, U: Tensor) -> Optional[str]:
    """Why the Triton kernels cannot take these (already validated) arguments, or None."""
    if x.dtype not in KERNEL_DTYPES:
        return f"x dtype {x.dtype} (the kernels take {KERNEL_DTYPES})"
    if U.shape[2] > MAX_RANK:
        return f"U with rank r={U.shape[2]} (the kernels take rank r <= {MAX_RANK})"
    return None


def low_rank_project(x: Tensor, U: Tensor, V: Tensor, layer_stage: Sequence[int], *,
                     backend: Optional[str] = None) -> Tensor:
    """Every layer's rank-r projection at once: ``out[l] = x(l) @ U[s(l)] @ V[s(l)]``.

    x [N,Din] (shared by every layer) or [L,N,Din] (one input per layer); U [S,Din,r],
    V [S,r,Dout] stage factors (any strides: ``A.transpose(1, 2)`` goes in without a copy);
    layer_stage: L stage indices. Returns [L,N,Dout] in x's dtype; x, U, V share one dtype and
    device.

    The Triton kernels take float32/bfloat16/float16 and r <= 16; other inputs (float64, larger
    rank) run on the torch backend under ``backend="auto"`` and raise under ``"triton"``.
    """
    check_args(x, U, V, layer_stage)
    stages = [int(s) for s in layer_stage]
    use = resolve("low_rank_project", x.device, backend,
                  lambda: triton_unsupported_reason(x, U))
    if use == "torch":
        return reference.low_rank_project(x, U, V, stages)
    return low_rank_project_op(x, U, V, stages)[0]


# ---- Ahead-of-time compile list ---------------------------------------------------------------
_FP32_POINTERS = ("low_ptr", "dlow_ptr")


def aot_configs() -> List:
    """Every kernel configuration the launchers above can select (one per input dtype and
    kernel); signatures from the kernels' parameter lists: the fp32 low / dlow, the int32 stage
    table, every other pointer in the input dtype."""
    configs = []
    for dt in KERNEL_DTYPES:
        ty = tl_type(dt)
        pointers = {**{n: "*fp32" for n in _FP32_POINTERS}, "stage_ptr": "*i32"}
        for fn in (_low_rank_project_fwd_kernel, _low_rank_project_bwd_out_kernel,
                   _low_rank_project_bwd_in_kernel):
            consts = dict(BLOCK_T=_BLOCK_T, BLOCK_RANK=_BLOCK_RANK, BLOCK_D=_BLOCK_D)
            if fn is not _low_rank_project_fwd_kernel:
                consts["BLOCK_ROWS"] = _BLOCK_ROWS
            sig = signature(fn, pointers, pointer=f"*{ty}")
            configs.append(KernelConfig(fn, sig, consts, num_warps=_WARPS))
    return with_aligned(configs, _MODEL_SHAPE_ODD, _MODEL_SHAPE_ONES)


# At the model's shape (B*K = 192 rows, D = 768, rank 8, 12 layers over 3 stages): the sizes,
# strides and job counts that are no multiple of 16, and the unit strides:
# ``kernel_config.aligned``.
_MODEL_SHAPE_ODD = ("RANK", "L", "su_d", "sdu_d", "n_out_chunks", "n_row_tiles", "n_dx_jobs")
_MODEL_SHAPE_ONES = ("su_r", "sv_o", "sdv_o", "sdu_r")
