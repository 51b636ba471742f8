"""Prompt-token interaction, PIM (Eqs. 5-10): public entry point, checks, dispatch, and the fused
Triton forward/backward kernels with their custom-op registration.

``pim(z[B,T,D], p[B,K,D], params, num_heads) -> (z_out[B,T,D], p_tilde[B,K,D])``

Triton path (``backend="triton"``). The products are reassociated so that the token tensor Z
(T x D per image) is only ever multiplied by small per-image matrices. Columns ``c = h*K + k``
index (head, prompt) pairs, padded to ``HKP`` (a power of two >= 16; padding is masked):

  logits1[t,c] = Z_t . Mq[:,c] + cq[c]     Mq = scale * Wq_h^T k1[k,h]  [D,HKP],  cq = scale bq_h.k1[k,h]
  S1 = softmax over k inside each head (per token, local to a row block)
  G = S1^T Z [HKP,D], colsum = sum_t S1 [HKP]   ->  msg_h = G_h Wv_h^T + colsum bv_h  (tiny)
  logits2[t,c] = Z_t . Mk[:,c]             Mk = scale * W'k_h^T q2[k,h]  (b'k only shifts a softmax
                                           row over T, so it drops out exactly)
  S2 = softmax over t per column c;  z_out_t = Z_t + alpha * (sum_c S2[c,t] Nv[c] + b'o),
                                           Nv[c] = v2[k,h] W'o_h^T  [HKP,D]

Forward: 3 kernel launches plus tiny torch algebra on [B,K,D]/[D,A]-sized matrices. Z is read
twice from DRAM and z_out written once (the DESIGN floor) on the 2-read path, taken when the raw
prompt->token keys K2 = Z W'k^T [T, A] (fp32) are cheap: A padded to KEY_COLS (a power of two
>= 16) with 12 * KEY_COLS <= D * element size and KEY_COLS <= MAX_KEY_COLS[dtype] (64: at 128
the backward kernels that rebuild K2 spill; ``key_columns`` decides). The A-VPT model's layout
(A = 4 x 16 = 64, K = 6, so HKP = 32, with D = 768) takes the 2-read path in every dtype.
There logits2[t,(h,k)] = K2_t . Qexp[:,(h,k)], Qexp [KEY_COLS,HKP] block-diagonal
(scale * q2[k,h] in rows h*dh .. (h+1)*dh), which needs only q2, i.e. G, after pass 1:
  1. ``_t2p_reduce_kernel``   reads Z once from DRAM: G, colsum, and (2-read path) writes K2
     [B,T,KEY_COLS] in fp32 from the Z tiles already on chip. A program owns a chunk of
     row blocks of one image (``TARGET_PROGRAMS``); it parks the chunk's S1 in an L2-resident
     fp32 scratch, re-reads the chunk's Z tiles (L2 hits) D block by D block and adds its
     [HKP, D] partial of G once with fp32 atomics.
  2. ``_p2t_stats_kernel``    per-row-block max / sum-exp of logits2 (combined in torch), from
     (K2, Qexp) on the 2-read path (reads T x KEY_COLS, not Z), else from (Z, Mk) (reads Z).
  3. ``_p2t_update_kernel``   reads Z once, writes z_out once (and the attention if asked); its
     logits2 come from the same operands as pass 2's, so S2 is normalised exactly.
  => 2-read path: Z read twice, z_out written once, K2 written once and read twice (12 * KEY_COLS
     bytes a token in all, at most one Z read); fallback (larger A, or small D, where K2 would not
     pay): Z read 3 times. K2 is a forward temporary, never saved: the backward kernels rebuild
     logits2 = K2 Qexp from the Z tiles they load anyway (``_key_step``/``_key_logits``, the
     same operations and roundings as the forward), so that they agree with the saved statistics.

Backward: 3 launches over (Z, dY = dL/dz_out), nothing of size T x A or T x K saved:
  A. ``_p2t_grad_reduce_kernel`` (chunked like 1) reads Z, dY once: E = S2^T dY, the
     chunk-centred F1 = (S2*(yn - delta_c))^T Z, F2 = S2^T Z, G1 = sum_chunks delta_c F2_chunk
     ([HKP,D]), sum_t dY and delta = sum_t S2*yn, with yn[t,c] = dY_t . Nv[c]; from them
     dNv = alpha E, dMk = alpha (F1 + G1 - delta F2) (no cancellation of two large sums: see the
     kernel), dalpha in closed form (delta is the softmax-backward row sum: no extra pass).
  B. ``_grad_z_kernel`` reads Z, dY once, writes dZ once (and dl1 [T,HKP] fp32 to scratch).
  C. ``_t2p_grad_reduce_kernel`` (chunked) reads Z once more: dMq = Z^T dl1.
  => Z read 3 times, dY twice, dZ written once (the floor: Z and dY twice each). On the 2-read
  path, A and B also recompute K2 = Z W'k^T (no extra traffic) for logits2 = K2 Qexp.
  The small per-image algebra (P, weights -> Mq, cq, Mk, Nv, alpha, p_tilde) is recomputed in
  backward and differentiated by hand (plain torch on [B,K,D]/[D,A]-sized tensors). Saved for
  backward: z, p, weights (inputs) and G [B,HKP,D], colsum, softmax stats [B,HKP]: O(B*K*D).

Precision (the bounded-error rule, ``avpt_kernels.testing.assert_bounded_error``: in fp16 and
bf16 the error against the fp64 truth is at most 2x the torch backend's, which computes in fp32).
Products of two operands that are exact in the input dtype (Z, dY, the weights W'k) are single
16-bit tensor-core dots with fp32 accumulation: exact products. Every product with an fp32
intermediate (softmax probabilities S1, S2, the per-image matrices Mq, Mk, Nv, the gradients
dG, dl1, dl2) is a split dot (``_mm_split``: the fp32 operand as 16-bit hi + lo parts, 2-3 dots,
~fp32 accuracy), because rounding those operands to 16 bits is amplified: a high-norm token
(x100) turns a 2^-9 relative error of Mq or Mk into logit errors of ~0.2 and softmax errors of
20%, and dMk is a difference of sums that cancel to many digits when the attention sits on one
token. K2 . Qexp (both fp32, KEY_COLS deep) is an IEEE fp32 dot. The small per-image matrices
are passed in fp32 (no 16-bit copies) and all torch algebra runs in fp32 with autocast off.

Supported by the Triton path: fp32/fp16/bf16, D a multiple of 16 up to 1024, 1 <= K <= 16, head
width 8..64, H*K <= 64 head-prompt columns (e.g. 4 heads x K <= 16, 12 heads x K <= 5; wider,
the dZ kernel spills under Triton 3.6 or 3.8 in every dtype: the split dots hold several
[BLOCK_T, HKP] fp32 tiles, and fp32's IEEE FMA dots need more registers still). Anything
else: ``ValueError`` for ``backend="triton"``, the torch path for ``"auto"``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _checks, reference
from ._autocast import no_autocast
from .backend import get_backend, resolve
from .reference import PIMParams

HAS_TRITON = True

T2P_REDUCE = ("sum", "mean")

MAX_DIM = 1024
MAX_PROMPTS = 16
HEAD_WIDTHS = (8, 64)
# Most (head, prompt) columns H*K: beyond 64 the dZ kernel spills (AOT, Triton 3.6 or 3.8).
MAX_COLUMNS = {torch.float32: 64, torch.float16: 64, torch.bfloat16: 64}
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DOT_MODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dot_mode(dtype: torch.dtype, device: torch.device) -> int:
    if device.type == "cpu" and dtype != torch.float32:
        return {torch.bfloat16: 3, torch.float16: 4}[dtype]  # interpreter: see _mm
    return _DOT_MODE[dtype]


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


# --------------------------------------------------------------------------------------------
# Shapes, padding and launch configuration
# --------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_columns(num_heads: int, num_prompts: int) -> int:
    """HKP: the (head, prompt) column axis c = h*K + k padded to a power of two >= 16."""
    return max(16, _next_pow2(num_heads * num_prompts))


def launch_config(columns: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for HKP = ``columns`` and the input dtype: row blocks shrink
    as the [BLOCK_T, HKP] fp32 tiles widen, so the widest kernel (the dZ kernel, ~7 such tiles)
    does not spill; fp32 (IEEE FMA dots) needs smaller tiles than the tensor-core dtypes."""
    return _LAUNCH[(columns, dtype == torch.float32)]


# (HKP, fp32?) -> (BLOCK_T, BLOCK_D, num_warps); every entry is in aot_configs (num_stages=1:
# the D loops are short and software pipelining only adds registers here).
_LAUNCH = {
    (16, True): (16, 32, 8), (32, True): (16, 32, 8), (64, True): (16, 16, 8),
    (16, False): (32, 32, 8), (32, False): (32, 32, 8), (64, False): (16, 32, 4),
}
NUM_STAGES = 1
# Every launch lets ptxas use up to 255 registers a thread: left to itself, at 8 warps it caps
# some of these kernels at 128 and spills (AOT, Triton 3.6 and 3.8), where 130-170 fit.
MAX_REGISTERS = 255

# The 2-read forward: pass 1 also writes the raw prompt->token keys K2 = Z W'k^T [B,T,KEY_COLS]
# (fp32) and the stats pass reads K2 instead of Z. Taken where K2's write + 2 reads cost no more
# than the Z read they replace (``key_columns``) and K2's [BLOCK_T, KEY_COLS] fp32 accumulator
# keeps every kernel that builds K2 (pass 1 and the backward kernels A and B) spill-free
# (KEY_COLS <= MAX_KEY_COLS, checked by aot_configs: at 128 the dZ and grad-reduce kernels spill
# for some HKP in every dtype); else the 3-read path. (With ptxas free to use 255 registers,
# MAX_REGISTERS, no (HKP, KEY_COLS) layout below that needs excluding any more.)
MAX_KEY_COLS = {torch.float32: 64, torch.float16: 64, torch.bfloat16: 64}


def key_columns(d: int, a: int, dtype: torch.dtype) -> int:
    """KEY_COLS of the 2-read forward for D, A = H * head width (padded to a power of two >= 16),
    and the input dtype, or 0 where the forward takes the 3-read path."""
    width = max(16, _next_pow2(a))
    # K2 is fp32: written once and read twice, it must cost no more than the Z read it replaces
    if width > MAX_KEY_COLS[dtype] or 3 * width * 4 > d * dtype.itemsize:
        return 0
    return width


def triton_unsupported_reason(z: Tensor, p: Tensor, params: PIMParams, num_heads: int) -> Optional[str]:
    """Why the Triton path cannot run these (already validated) arguments, or None."""
    d, k, a = z.shape[2], p.shape[1], params.t2p_q_w.shape[0]
    head_dim = a // num_heads
    if z.dtype not in TRITON_DTYPES:
        return f"dtype {z.dtype} (the kernels take float32, float16 or bfloat16)"
    if d % 16 or d > MAX_DIM:
        return f"D={d} (the kernels need D a multiple of 16, at most {MAX_DIM})"
    if k > MAX_PROMPTS:
        return f"K={k} prompts (the kernels take 1 to {MAX_PROMPTS})"
    if not HEAD_WIDTHS[0] <= head_dim <= HEAD_WIDTHS[1]:
        return f"head width {head_dim} (the kernels take {HEAD_WIDTHS[0]} to {HEAD_WIDTHS[1]})"
    if num_heads * k > MAX_COLUMNS[z.dtype]:
        return (f"num_heads={num_heads} with K={k} ({num_heads * k} head-prompt columns, the "
                f"{z.dtype} kernels take at most {MAX_COLUMNS[z.dtype]})")
    return None


def pim_min_bytes(B: int, T: int, D: int, K: int, A: int, dtype: torch.dtype,
                  backward: bool = False) -> int:
    """Traffic floor of one PIM layer (the DESIGN.md target): forward reads Z twice and writes
    z_out once; backward reads Z and dZ_out twice each and writes dZ once. The K- and A-sized
    operands (P, P~, weights) are added once. What the kernels here move: ``pim_achieved_bytes``."""
    e = torch.empty((), dtype=dtype).element_size()
    big = B * T * D * e
    small = (2 * B * K * D + 8 * A * D) * e
    return (5 if backward else 3) * big + small


def pim_achieved_bytes(B: int, T: int, D: int, K: int, A: int, dtype: torch.dtype,
                       backward: bool = False) -> int:
    """DRAM traffic model of these kernels (Z-sized streams plus the small operands). Forward on
    the 2-read path (``key_columns(D, A, dtype) > 0``): 2 reads of Z + 1 write of z_out, plus the
    key scratch K2 [B,T,KEY_COLS] (fp32) written once and read twice (stats, update);
    otherwise 3 reads of Z + 1 write. Backward: 3 reads of Z, 2 of dY, 1 write of dZ. Not counted:
    the [T, HKP] fp32 scratch rows (S1, S2, dl1), written and read back at once (L2), and the
    re-read of a program's own Z tiles inside the chunked reductions (L2 hits)."""
    e = torch.empty((), dtype=dtype).element_size()
    big = B * T * D * e
    small = (2 * B * K * D + 8 * A * D) * e
    if backward:
        return 6 * big + small
    key_cols = key_columns(D, A, dtype)
    if key_cols:
        return 3 * big + 3 * B * T * key_cols * 4 + small
    return 4 * big + small


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, DOT_MODE: tl.constexpr):
    """a @ b with fp32 accumulation for operands that are exact in the input dtype (Z, dZ_out,
    the weights): fp32 operands in IEEE precision (no TF32), or 16-bit tensor-core dots. Modes 3
    and 4 are modes 2 and 1 for TRITON_INTERPRET=1, whose tl.dot on bfloat16 operands returns
    garbage (triton 3.8): exact fp32 products of the rounded operands; they are never compiled."""
    if DOT_MODE == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT_MODE == 1 or DOT_MODE == 4:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DOT_MODE == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32),
                      input_precision="ieee")


@triton.jit
def _fp16_parts(x):
    """fp32 tile x -> (hi, lo, inv_scale) with x = (hi + lo) * inv_scale + O(2^-22 max|x|), hi and
    lo float16. The tile is first scaled by a power of two that puts its largest |x| in
    [2^14, 2^15): no part overflows fp16's 65504 (whatever the magnitude of x, e.g. a gradient
    under a loss scaler), and lo stays above fp16's subnormal floor. The scale is built from the
    exponent bits, so scaling is exact."""
    big = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    exponent = tl.maximum((big.to(tl.int32, bitcast=True) >> 23) & 0xFF, 15)  # biased
    scale = ((268 - exponent) << 23).to(tl.float32, bitcast=True)  # 2^(14 - (exponent - 127))
    inv_scale = ((exponent - 14) << 23).to(tl.float32, bitcast=True)
    xs = x * scale
    hi = xs.to(tl.float16)
    return hi, (xs - hi.to(tl.float32)).to(tl.float16), inv_scale


@triton.jit
def _mm_split(a, b, EXACT: tl.constexpr, DOT_MODE: tl.constexpr):
    """a @ b to near-fp32 accuracy on 16-bit tensor cores, for products with an fp32
    intermediate operand (softmax probabilities, the per-image matrices Mq/Mk/Nv, gradients).
    Rounding such an operand to 16 bits errs by 2^-9 (bf16) of each element; where the result
    feeds a softmax over high-norm tokens or a difference of nearly equal sums, that error is
    amplified far beyond the torch backend's (fp32) error. Instead each fp32 operand is split
    into 16-bit parts x = hi + lo (lo: the rounding error of hi) and hi*hi + hi*lo + lo*hi is
    summed with fp32 accumulation; an operand exact in the input dtype (EXACT = 1: ``a``, 2:
    ``b``; Z, dZ_out) has no lo part, so 2 dots. bf16 inputs: bf16 parts (fp32's range, error
    ~2^-17). fp16 inputs: fp16 parts of the tile scaled by a power of two (``_fp16_parts``,
    error ~2^-22: fp16's unit roundoff is 8x finer than bf16's, so bf16 parts would not do).
    Mode 0 (fp32 inputs): one IEEE fp32 dot. Modes 3, 4 (interpreter): the same products, bf16
    ones as exact fp32 products of the parts (the interpreter's bf16 tl.dot is broken)."""
    if DOT_MODE == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    a32 = a.to(tl.float32)
    b32 = b.to(tl.float32)
    if DOT_MODE == 1 or DOT_MODE == 4:
        if EXACT == 1:
            b_hi, b_lo, b_inv = _fp16_parts(b32)
            a16 = a.to(tl.float16)
            return (tl.dot(a16, b_hi) + tl.dot(a16, b_lo)) * b_inv
        if EXACT == 2:
            a_hi, a_lo, a_inv = _fp16_parts(a32)
            b16 = b.to(tl.float16)
            return (tl.dot(a_hi, b16) + tl.dot(a_lo, b16)) * a_inv
        a_hi, a_lo, a_inv = _fp16_parts(a32)
        b_hi, b_lo, b_inv = _fp16_parts(b32)
        return (tl.dot(a_hi, b_hi) + tl.dot(a_lo, b_hi) + tl.dot(a_hi, b_lo)) * (a_inv * b_inv)
    a_hi = a32.to(tl.bfloat16)
    b_hi = b32.to(tl.bfloat16)
    a_lo = (a32 - a_hi.to(tl.float32)).to(tl.bfloat16)
    b_lo = (b32 - b_hi.to(tl.float32)).to(tl.bfloat16)
    if DOT_MODE == 3:
        a_hi, a_lo = a_hi.to(tl.float32), a_lo.to(tl.float32)
        b_hi, b_lo = b_hi.to(tl.float32), b_lo.to(tl.float32)
        acc = tl.dot(a_hi, b_hi, input_precision="ieee")
        if EXACT != 1:  # a_lo = 0 when a is exact in bf16
            acc = tl.dot(a_lo, b_hi, acc, input_precision="ieee")
        if EXACT != 2:  # b_lo = 0 when b is exact in bf16
            acc = tl.dot(a_hi, b_lo, acc, input_precision="ieee")
        return acc
    acc = tl.dot(a_hi, b_hi)
    if EXACT != 1:
        acc = tl.dot(a_lo, b_hi, acc)
    if EXACT != 2:
        acc = tl.dot(a_hi, b_lo, acc)
    return acc


@triton.jit
def _columns(K, H, HKP: tl.constexpr):
    """Column indices c = h*K + k, the head of each column, and which columns are real."""
    cols = tl.arange(0, HKP)
    return cols, cols // K, cols < H * K


@triton.jit
def _head_softmax(logits, head, col_ok, H, BLOCK_T: tl.constexpr, HKP: tl.constexpr):
    """Softmax over the K prompt columns of each head, per row; padded columns give 0.
    (A loop over heads with masks: the column axis is h*K + k for any K, no reshape needed.)"""
    x = tl.where(col_ok[None, :], logits, -1.0e30)
    m = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
    for h in range(H):
        sel = (head == h)[None, :]
        m = tl.where(sel, tl.max(tl.where(sel, x, -1.0e30), axis=1)[:, None], m)
    e = tl.where(col_ok[None, :], tl.exp(x - m), 0.0)
    return e / _head_sum(e, head, H, BLOCK_T, HKP)


@triton.jit
def _head_sum(x, head, H, BLOCK_T: tl.constexpr, HKP: tl.constexpr):
    """Sum over the prompt columns of each head, broadcast back to every column of the head
    (padded columns get 1, so that dividing by it is safe)."""
    s = tl.full((BLOCK_T, HKP), 1.0, dtype=tl.float32)
    for h in range(H):
        sel = (head == h)[None, :]
        s = tl.where(sel, tl.sum(tl.where(sel, x, 0.0), axis=1)[:, None], s)
    return s


@triton.jit
def _key_step(zt, wk_ptr, dd, d_ok, KEY_COLS: tl.constexpr, DOT_MODE: tl.constexpr):
    """One D block of the raw prompt->token keys K2 = Z W'k^T: zt [BLOCK_T,BLOCK_D] times rows dd
    of wk = W'k^T [D,KEY_COLS] (zero-padded columns). Pass 1 and the backward kernels share it,
    so that the backward rebuilds the forward's K2 operation for operation."""
    kc = tl.arange(0, KEY_COLS)
    wk = tl.load(wk_ptr + dd[:, None] * KEY_COLS + kc[None, :], mask=d_ok[:, None], other=0.0)
    return _mm(zt, wk, DOT_MODE)


@triton.jit
def _t2p_reduce_kernel(z_ptr, mq_ptr, cq_ptr, wk_ptr, s1_ptr, g_ptr, colsum_ptr, k2_ptr,
                       T, D, K, H, chunk_blocks,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
                       KEY_COLS: tl.constexpr, DOT_MODE: tl.constexpr):
    """Token->prompt pass. Grid (B, n_chunks); a program owns chunk_blocks row blocks of one image.
    z [B,T,D], mq [B,D,HKP] fp32, cq [B,HKP] fp32 -> g [B,HKP,D] += S1^T Z, colsum [B,HKP] += sum_t S1.
    s1 [B,n_chunks*chunk_blocks*BLOCK_T,HKP] fp32 is scratch: the chunk's S1 is parked there
    (L2-resident) so that G is accumulated in registers per D block and added once per chunk,
    instead of once per row block.
    KEY_COLS > 0 (the 2-read forward): also k2 [B,T,KEY_COLS] fp32 = Z W'k^T, the raw
    prompt->token keys, from the Z tiles already on chip; wk [D,KEY_COLS] (z dtype) is W'k^T
    zero-padded. KEY_COLS = 0: wk and k2 are not touched."""
    b = tl.program_id(0).to(tl.int64)
    row0 = tl.program_id(1) * chunk_blocks * BLOCK_T
    cols, head, col_ok = _columns(K, H, HKP)
    z_img = z_ptr + b * T * D
    s1_img = s1_ptr + b * tl.num_programs(1) * chunk_blocks * BLOCK_T * HKP
    colsum = tl.zeros((HKP,), dtype=tl.float32)
    for blk in range(0, chunk_blocks):
        rows = row0 + blk * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        logits = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
        if KEY_COLS > 0:
            keys = tl.zeros((BLOCK_T, KEY_COLS), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            zt = tl.load(z_img + rows[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            mq = tl.load(mq_ptr + b * D * HKP + dd[:, None] * HKP + cols[None, :], mask=d_ok[:, None], other=0.0)
            logits += _mm_split(zt, mq, 1, DOT_MODE)
            if KEY_COLS > 0:
                keys += _key_step(zt, wk_ptr, dd, d_ok, KEY_COLS, DOT_MODE)
        if KEY_COLS > 0:
            kc = tl.arange(0, KEY_COLS)
            tl.store(k2_ptr + b * T * KEY_COLS + rows[:, None] * KEY_COLS + kc[None, :], keys,
                     mask=row_ok[:, None])
        logits += tl.load(cq_ptr + b * HKP + cols)[None, :]
        s1 = tl.where(row_ok[:, None], _head_softmax(logits, head, col_ok, H, BLOCK_T, HKP), 0.0)
        colsum += tl.sum(s1, axis=0)
        tl.store(s1_img + rows[:, None] * HKP + cols[None, :], s1)
    tl.atomic_add(colsum_ptr + b * HKP + cols, colsum, sem="relaxed")
    tl.debug_barrier()  # the chunk's S1 rows, written by other threads, are read back below
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        acc = tl.zeros((HKP, BLOCK_D), dtype=tl.float32)
        for blk in range(0, chunk_blocks):
            rows = row0 + blk * BLOCK_T + tl.arange(0, BLOCK_T)
            row_ok = rows < T
            zt = tl.load(z_img + rows[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            s1 = tl.load(s1_img + rows[:, None] * HKP + cols[None, :])
            acc += _mm_split(tl.trans(s1), zt, 2, DOT_MODE)
        tl.atomic_add(g_ptr + b * HKP * D + cols[:, None] * D + dd[None, :], acc, mask=d_ok[None, :],
                      sem="relaxed")


@triton.jit
def _p2t_logits(x_img, m_img, rows, row_ok, W, HKP: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_D: tl.constexpr, FROM_KEYS: tl.constexpr, DOT_MODE: tl.constexpr):
    """[BLOCK_T, HKP] fp32 logits2 = X_rows M for X [T,W] and M [W,HKP] fp32 of one image:
    (Z, Mk) with W = D (split dots), or with FROM_KEYS (K2, Qexp), both fp32, W = KEY_COLS
    (IEEE fp32 dots)."""
    cols = tl.arange(0, HKP)
    acc = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
    for d0 in range(0, W, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < W
        xt = tl.load(x_img + rows[:, None] * W + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m = tl.load(m_img + dd[:, None] * HKP + cols[None, :], mask=d_ok[:, None], other=0.0)
        if FROM_KEYS:  # K2 Qexp, both fp32 and KEY_COLS deep: IEEE fp32 (mode 0)
            acc += _mm(xt, m, 0)
        else:
            acc += _mm_split(xt, m, 1, DOT_MODE)
    return acc


@triton.jit
def _key_logits(keys, qexp_img, HKP: tl.constexpr, KEY_COLS: tl.constexpr):
    """[BLOCK_T, HKP] fp32 logits2 = K2 Qexp from the raw keys K2 = Z W'k^T [BLOCK_T, KEY_COLS]
    (fp32 accumulator, bit for bit what pass 1 stored) and Qexp [KEY_COLS, HKP] fp32, so that the
    backward recomputes the very logits whose softmax statistics the forward took."""
    kc = tl.arange(0, KEY_COLS)
    qexp = tl.load(qexp_img + kc[:, None] * HKP + tl.arange(0, HKP)[None, :])
    return _mm(keys, qexp, 0)


@triton.jit
def _p2t_stats_kernel(x_ptr, m_ptr, mpart_ptr, lpart_ptr, T, W,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
                      FROM_KEYS: tl.constexpr, DOT_MODE: tl.constexpr):
    """Softmax-over-T statistics of logits2 = X M, per row block. Grid (B, NTB).
    m [B,W,HKP] fp32; x [B,T,W]: either Z with W = D (3-read forward) or, FROM_KEYS, K2 fp32 with
    W = KEY_COLS (2-read forward: K2 = Z W'k^T from pass 1, M = Qexp the block-diagonal scaled
    queries) -> mpart, lpart [B,NTB,HKP] (block max and sum of exp(logit - max))."""
    b = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, HKP)
    logits = _p2t_logits(x_ptr + b * T * W, m_ptr + b * W * HKP, rows, row_ok, W, HKP,
                         BLOCK_T, BLOCK_D, FROM_KEYS, DOT_MODE)
    logits = tl.where(row_ok[:, None], logits, float("-inf"))
    m = tl.max(logits, axis=0)  # every block holds at least one valid row: finite
    l = tl.sum(tl.exp(logits - m[None, :]), axis=0)
    out = (b * tl.num_programs(1) + tb) * HKP + cols
    tl.store(mpart_ptr + out, m)
    tl.store(lpart_ptr + out, l)


@triton.jit
def _p2t_probs(logits, m2_ptr, l2_ptr, b, row_ok, HKP: tl.constexpr):
    cols = tl.arange(0, HKP)
    m = tl.load(m2_ptr + b * HKP + cols)
    inv_l = 1.0 / tl.load(l2_ptr + b * HKP + cols)
    s2 = tl.exp(logits - m[None, :]) * inv_l[None, :]
    return tl.where(row_ok[:, None], s2, 0.0)


@triton.jit
def _p2t_update_kernel(z_ptr, x_ptr, m_ptr, m2_ptr, l2_ptr, nv_ptr, bo_ptr, alpha_ptr, out_ptr,
                       attn_ptr, T, D, W, HK, return_attn,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
                       FROM_KEYS: tl.constexpr, DOT_MODE: tl.constexpr):
    """Prompt->token update and gated residual. Grid (B, cdiv(T, BLOCK_T)).
    z_out = Z + alpha * (S2^T Nv + b'o); nv [B,HKP,D] fp32, bo [D] fp32, alpha [B] fp32;
    attn [B,H,K,T] = [B,HK,T] fp32 written when return_attn != 0. logits2 = X M as in the stats
    pass (FROM_KEYS: X = K2, the 2-read forward, Z itself is then read only for the residual)."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, HKP)
    z_img = z_ptr + b * T * D
    logits = _p2t_logits(x_ptr + b * T * W, m_ptr + b * W * HKP, rows, row_ok, W, HKP, BLOCK_T,
                         BLOCK_D, FROM_KEYS, DOT_MODE)
    s2 = _p2t_probs(logits, m2_ptr, l2_ptr, b, row_ok, HKP)
    if return_attn:
        dst = attn_ptr + b * HK * T + cols[None, :] * T + rows[:, None]
        tl.store(dst, s2, mask=row_ok[:, None] & (cols < HK)[None, :])
    alpha = tl.load(alpha_ptr + b)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        nv = tl.load(nv_ptr + b * HKP * D + cols[:, None] * D + dd[None, :], mask=d_ok[None, :], other=0.0)
        upd = _mm_split(s2, nv, 0, DOT_MODE) + tl.load(bo_ptr + dd, mask=d_ok, other=0.0)[None, :]
        ptrs = rows[:, None] * D + dd[None, :]
        mask = row_ok[:, None] & d_ok[None, :]
        zt = tl.load(z_img + ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * T * D + ptrs, (zt + alpha * upd).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _p2t_grad_reduce_kernel(z_ptr, y_ptr, mk_ptr, wk_ptr, qexp_ptr, nv_ptr, m2_ptr, l2_ptr, s2_ptr,
                            ws2_ptr, e_ptr, f1_ptr, f2_ptr, g1_ptr, ysum_ptr, delta_ptr, T, D,
                            chunk_blocks, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                            HKP: tl.constexpr, KEY_COLS: tl.constexpr, DOT_MODE: tl.constexpr):
    """Backward reductions of the prompt->token side. Grid (B, n_chunks), chunks as in
    _t2p_reduce_kernel; s2, ws2 [B,n_chunks*chunk_blocks*BLOCK_T,HKP] fp32 are scratch.
    y = dL/dz_out [B,T,D]; with yn[t,c] = y_t . Nv[c] (nv [B,HKP,D] fp32) the prompt->token
    keys need dMk = alpha sum_t S2 (yn - delta) Z_t, delta = sum_t S2*yn over the whole image.
    Written as F1 - delta F2, two sums that cancel to many digits when the attention sits on one
    high-norm token, it loses everything in 16-bit products. So each chunk centres yn on its own
    S2-weighted mean delta_c (known once the chunk's rows are in), and the correction to the global
    delta is exact algebra on fp32 sums:
      f1 += (S2*(yn - delta_c))^T Z,  f2 += S2^T Z,  g1 += delta_c * (chunk's S2^T Z)
      => dMk = alpha (f1 + g1 - delta f2);  e += S2^T y;  ysum += sum_t y;
      delta += sum_t S2*yn ([B,HKP]: the softmax-backward row sum, from the very yn values the
      dZ kernel recomputes, so that yn - delta cancels exactly for a one-hot softmax).
    All products with S2, yn or Nv are split dots (``_mm_split``), so nothing is rounded to 16 bits.
    logits2 = Z Mk, or with KEY_COLS > 0 (the forward took its softmax statistics from K2 Qexp)
    K2 Qexp from K2 = Z W'k^T recomputed here (wk [D,KEY_COLS], qexp [B,KEY_COLS,HKP]); mk unused."""
    b = tl.program_id(0).to(tl.int64)
    row0 = tl.program_id(1) * chunk_blocks * BLOCK_T
    cols = tl.arange(0, HKP)
    z_img = z_ptr + b * T * D
    y_img = y_ptr + b * T * D
    nv_img = nv_ptr + b * HKP * D
    scratch = b * tl.num_programs(1) * chunk_blocks * BLOCK_T * HKP
    delta = tl.zeros((HKP,), dtype=tl.float32)
    mass = tl.zeros((HKP,), dtype=tl.float32)
    for blk in range(0, chunk_blocks):
        rows = row0 + blk * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        if KEY_COLS > 0:
            keys = tl.zeros((BLOCK_T, KEY_COLS), dtype=tl.float32)
        else:
            logits = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
        yn = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            tile = rows[:, None] * D + dd[None, :]
            mask = row_ok[:, None] & d_ok[None, :]
            zt = tl.load(z_img + tile, mask=mask, other=0.0)
            yt = tl.load(y_img + tile, mask=mask, other=0.0)
            if KEY_COLS > 0:
                keys += _key_step(zt, wk_ptr, dd, d_ok, KEY_COLS, DOT_MODE)
            else:
                mk = tl.load(mk_ptr + b * D * HKP + dd[:, None] * HKP + cols[None, :], mask=d_ok[:, None], other=0.0)
                logits += _mm_split(zt, mk, 1, DOT_MODE)
            nvt = tl.load(nv_img + cols[None, :] * D + dd[:, None], mask=d_ok[:, None], other=0.0)
            yn += _mm_split(yt, nvt, 1, DOT_MODE)
        if KEY_COLS > 0:
            logits = _key_logits(keys, qexp_ptr + b * KEY_COLS * HKP, HKP, KEY_COLS)
        s2 = _p2t_probs(logits, m2_ptr, l2_ptr, b, row_ok, HKP)
        ws2 = s2 * yn
        delta += tl.sum(ws2, axis=0)
        mass += tl.sum(s2, axis=0)
        tl.store(s2_ptr + scratch + rows[:, None] * HKP + cols[None, :], s2)
        tl.store(ws2_ptr + scratch + rows[:, None] * HKP + cols[None, :], ws2)
    tl.atomic_add(delta_ptr + b * HKP + cols, delta, sem="relaxed")
    delta_c = tl.where(mass > 0.0, delta / tl.where(mass > 0.0, mass, 1.0), 0.0)
    tl.debug_barrier()  # the chunk's S2 rows, written by other threads, are read back below
    out = b * HKP * D + cols[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        acc_e = tl.zeros((HKP, BLOCK_D), dtype=tl.float32)
        acc_f1 = tl.zeros((HKP, BLOCK_D), dtype=tl.float32)
        acc_f2 = tl.zeros((HKP, BLOCK_D), dtype=tl.float32)
        ysum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for blk in range(0, chunk_blocks):
            rows = row0 + blk * BLOCK_T + tl.arange(0, BLOCK_T)
            row_ok = rows < T
            tile = rows[:, None] * D + dd[None, :]
            mask = row_ok[:, None] & d_ok[None, :]
            zt = tl.load(z_img + tile, mask=mask, other=0.0)
            yt = tl.load(y_img + tile, mask=mask, other=0.0)
            s2 = tl.load(s2_ptr + scratch + rows[:, None] * HKP + cols[None, :])
            ws2 = tl.load(ws2_ptr + scratch + rows[:, None] * HKP + cols[None, :])
            s2t = tl.trans(s2)
            acc_e += _mm_split(s2t, yt, 2, DOT_MODE)
            acc_f1 += _mm_split(tl.trans(ws2 - s2 * delta_c[None, :]), zt, 2, DOT_MODE)
            acc_f2 += _mm_split(s2t, zt, 2, DOT_MODE)
            ysum += tl.sum(yt.to(tl.float32), axis=0)
        dst = out + dd[None, :]
        tl.atomic_add(e_ptr + dst, acc_e, mask=d_ok[None, :], sem="relaxed")
        tl.atomic_add(f1_ptr + dst, acc_f1, mask=d_ok[None, :], sem="relaxed")
        tl.atomic_add(f2_ptr + dst, acc_f2, mask=d_ok[None, :], sem="relaxed")
        tl.atomic_add(g1_ptr + dst, acc_f2 * delta_c[:, None], mask=d_ok[None, :], sem="relaxed")
        tl.atomic_add(ysum_ptr + b * D + dd, ysum, mask=d_ok, sem="relaxed")


@triton.jit
def _grad_z_kernel(z_ptr, y_ptr, mq_ptr, cq_ptr, mk_ptr, wk_ptr, qexp_ptr, nv_ptr, m2_ptr, l2_ptr,
                   alpha_ptr, delta_ptr, dg_ptr, dcolsum_ptr, dz0_ptr, dz_ptr, dl1_ptr, dcq_ptr, T, D,
                   K, H, t_pad, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
                   KEY_COLS: tl.constexpr, DOT_MODE: tl.constexpr):
    """dZ through both attentions, and the token-side reductions of the token->prompt backward.
    Grid (B, cdiv(T, BLOCK_T)): one row block per program (the register-heaviest kernel).
    With dG [B,HKP,D], dcolsum [B,HKP] (gradients of G, colsum), delta [B,HKP] = sum_t S2*yn,
    alpha [B] (mq, mk, nv, dg fp32):
      dS1 = Z dG^T + dcolsum; dl1 = S1 * (dS1 - headsum(S1*dS1))
      dl2 = alpha * S2^T * (y Nv^T - delta)
      dz = y + dl2 Mk^T + S1 dG + dl1 Mq^T (+ dz0 [B,D] fp32 on the class token, which the gate
      reads: added before the one rounding to the output dtype);
      dcq [B,HKP] += sum_t dl1;  dl1 -> [B,t_pad,HKP] fp32
    (dMq = Z^T dl1 is reduced by _t2p_grad_reduce_kernel, chunked, instead of one atomic add of
    a [D, HKP] partial per row block here). logits2 as in _p2t_grad_reduce_kernel (KEY_COLS).
    Every product with an fp32 intermediate is a split dot (``_mm_split``)."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols, head, col_ok = _columns(K, H, HKP)
    z_img = z_ptr + b * T * D
    y_img = y_ptr + b * T * D
    mq_img = mq_ptr + b * D * HKP
    mk_img = mk_ptr + b * D * HKP
    nv_img = nv_ptr + b * HKP * D
    dg_img = dg_ptr + b * HKP * D
    logits1 = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
    if KEY_COLS > 0:
        keys = tl.zeros((BLOCK_T, KEY_COLS), dtype=tl.float32)
    else:
        logits2 = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
    yn = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
    ds1 = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        tile = rows[:, None] * D + dd[None, :]
        mask = row_ok[:, None] & d_ok[None, :]
        zt = tl.load(z_img + tile, mask=mask, other=0.0)
        yt = tl.load(y_img + tile, mask=mask, other=0.0)
        small = dd[:, None] * HKP + cols[None, :]  # [BLOCK_D, HKP] of a [D, HKP] matrix
        small_t = cols[None, :] * D + dd[:, None]  # [BLOCK_D, HKP] of a [HKP, D] matrix
        logits1 += _mm_split(zt, tl.load(mq_img + small, mask=d_ok[:, None], other=0.0), 1, DOT_MODE)
        if KEY_COLS > 0:
            keys += _key_step(zt, wk_ptr, dd, d_ok, KEY_COLS, DOT_MODE)
        else:
            logits2 += _mm_split(zt, tl.load(mk_img + small, mask=d_ok[:, None], other=0.0), 1, DOT_MODE)
        yn += _mm_split(yt, tl.load(nv_img + small_t, mask=d_ok[:, None], other=0.0), 1, DOT_MODE)
        ds1 += _mm_split(zt, tl.load(dg_img + small_t, mask=d_ok[:, None], other=0.0), 1, DOT_MODE)
    if KEY_COLS > 0:
        logits2 = _key_logits(keys, qexp_ptr + b * KEY_COLS * HKP, HKP, KEY_COLS)
    logits1 += tl.load(cq_ptr + b * HKP + cols)[None, :]
    s1 = tl.where(row_ok[:, None], _head_softmax(logits1, head, col_ok, H, BLOCK_T, HKP), 0.0)
    ds1 += tl.load(dcolsum_ptr + b * HKP + cols)[None, :]
    dl1 = s1 * (ds1 - _head_sum(s1 * ds1, head, H, BLOCK_T, HKP))
    alpha = tl.load(alpha_ptr + b)
    delta = tl.load(delta_ptr + b * HKP + cols)
    s2 = _p2t_probs(logits2, m2_ptr, l2_ptr, b, row_ok, HKP)
    dl2 = alpha * s2 * (yn - delta[None, :])
    tl.atomic_add(dcq_ptr + b * HKP + cols, tl.sum(dl1, axis=0), sem="relaxed")
    tl.store(dl1_ptr + b * t_pad * HKP + rows[:, None] * HKP + cols[None, :], dl1)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        tile = rows[:, None] * D + dd[None, :]
        mask = row_ok[:, None] & d_ok[None, :]
        yt = tl.load(y_img + tile, mask=mask, other=0.0).to(tl.float32)
        small_t = dd[None, :] * HKP + cols[:, None]  # [HKP, BLOCK_D] of a [D, HKP] matrix
        big = cols[:, None] * D + dd[None, :]  # [HKP, BLOCK_D] of a [HKP, D] matrix
        dz = yt + _mm_split(dl2, tl.load(mk_img + small_t, mask=d_ok[None, :], other=0.0), 0, DOT_MODE)
        dz += _mm_split(s1, tl.load(dg_img + big, mask=d_ok[None, :], other=0.0), 0, DOT_MODE)
        dz += _mm_split(dl1, tl.load(mq_img + small_t, mask=d_ok[None, :], other=0.0), 0, DOT_MODE)
        dz0 = tl.load(dz0_ptr + b * D + dd, mask=d_ok, other=0.0)
        dz += tl.where(rows[:, None] == 0, dz0[None, :], 0.0)
        tl.store(dz_ptr + b * T * D + tile, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _t2p_grad_reduce_kernel(z_ptr, dl1_ptr, dmq_ptr, T, D, t_pad, chunk_blocks,
                            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
                            DOT_MODE: tl.constexpr):
    """dMq [B,D,HKP] += Z^T dl1. Grid (B, n_chunks), chunks as in _t2p_reduce_kernel; dl1 from
    _grad_z_kernel [B,t_pad,HKP] fp32 (rows >= T are ignored)."""
    b = tl.program_id(0).to(tl.int64)
    row0 = tl.program_id(1) * chunk_blocks * BLOCK_T
    cols = tl.arange(0, HKP)
    z_img = z_ptr + b * T * D
    dl1_img = dl1_ptr + b * t_pad * HKP
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        acc = tl.zeros((BLOCK_D, HKP), dtype=tl.float32)
        for blk in range(0, chunk_blocks):
            rows = row0 + blk * BLOCK_T + tl.arange(0, BLOCK_T)
            row_ok = rows < T
            zt = tl.load(z_img + rows[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            dl1 = tl.load(dl1_img + rows[:, None] * HKP + cols[None, :], mask=row_ok[:, None], other=0.0)
            acc += _mm_split(tl.trans(zt), dl1, 1, DOT_MODE)
        tl.atomic_add(dmq_ptr + b * D * HKP + dd[:, None] * HKP + cols[None, :], acc,
                      mask=d_ok[:, None], sem="relaxed")


# --------------------------------------------------------------------------------------------
# Small per-image algebra (torch, fp32): [B,K,D]- and [D,A]-sized, forward and backward
# --------------------------------------------------------------------------------------------
def _pad_columns(x: Tensor, hkp: int) -> Tensor:
    """[..., H, K] -> [..., HKP] (c = h*K + k), zero-padded."""
    x = x.flatten(-2)
    return F.pad(x, (0, hkp - x.shape[-1]))


def _unpad_columns(x: Tensor, h: int, k: int, dim: int) -> Tensor:
    """[.., HKP, ..] at ``dim`` -> [.., H, K, ..]."""
    x = x.narrow(dim, 0, h * k)
    return x.reshape(x.shape[:dim] + (h, k) + x.shape[dim + 1:])


def _t2p_small(p: Tensor, w: PIMParams, num_heads: int, hkp: int):
    """P [B,K,D] -> Mq [B,D,HKP], cq [B,HKP] (scale folded in), and k1 [B,K,H,dh] for backward."""
    b, k, d = p.shape
    dh = w.t2p_q_w.shape[0] // num_heads
    scale = 1.0 / math.sqrt(dh)
    k1 = F.linear(p, w.t2p_k_w, w.t2p_k_b).reshape(b, k, num_heads, dh)
    mq = torch.einsum("hjd,bkhj->bdhk", w.t2p_q_w.reshape(num_heads, dh, d), k1) * scale
    cq = torch.einsum("hj,bkhj->bhk", w.t2p_q_b.reshape(num_heads, dh), k1) * scale
    return _pad_columns(mq, hkp), _pad_columns(cq, hkp), k1


def _t2p_small_backward(grad_mq: Tensor, grad_cq: Tensor, p: Tensor, k1: Tensor, w: PIMParams,
                        grads: dict) -> Tensor:
    """Backward of _t2p_small: accumulates the t2p q/k weight gradients into ``grads``, returns dP."""
    b, k, num_heads, dh = k1.shape
    d = p.shape[2]
    scale = 1.0 / math.sqrt(dh)
    dmq = _unpad_columns(grad_mq, num_heads, k, 2) * scale  # [B,D,H,K]
    dcq = _unpad_columns(grad_cq, num_heads, k, 1) * scale  # [B,H,K]
    wq, bq = w.t2p_q_w.reshape(num_heads, dh, d), w.t2p_q_b.reshape(num_heads, dh)
    dk1 = (torch.einsum("hjd,bdhk->bkhj", wq, dmq) + torch.einsum("hj,bhk->bkhj", bq, dcq))
    grads["t2p_q_w"] = torch.einsum("bkhj,bdhk->hjd", k1, dmq).reshape(-1, d)
    grads["t2p_q_b"] = torch.einsum("bkhj,bhk->hj", k1, dcq).reshape(-1)
    dk1 = dk1.reshape(b, k, -1)
    grads["t2p_k_w"] = torch.einsum("bka,bkd->ad", dk1, p)
    grads["t2p_k_b"] = dk1.sum(dim=(0, 1))
    return dk1 @ w.t2p_k_w


def _p2t_small(g: Tensor, colsum: Tensor, p: Tensor, z0: Tensor, w: PIMParams, num_heads: int,
               hkp: int, inv_tokens: float):
    """(G [B,HKP,D], colsum [B,HKP], P [B,K,D], Z[:,0] [B,D], fp32 weights) ->
    p_tilde [B,K,D], Mk [B,D,HKP], Nv [B,HKP,D], alpha [B], and the intermediates for backward."""
    b, k, d = p.shape
    a = w.t2p_q_w.shape[0]
    dh = a // num_heads
    scale = 1.0 / math.sqrt(dh)
    gh = _unpad_columns(g, num_heads, k, 1)  # [B,H,K,D]
    ch = _unpad_columns(colsum, num_heads, k, 1)  # [B,H,K]
    msg = (torch.einsum("bhkd,hjd->bkhj", gh, w.t2p_v_w.reshape(num_heads, dh, d))
           + ch.transpose(1, 2)[..., None] * w.t2p_v_b.reshape(num_heads, dh)) * inv_tokens
    msg = msg.reshape(b, k, a)
    p_tilde = p + F.linear(msg, w.t2p_o_w, w.t2p_o_b)
    q2 = F.linear(p_tilde, w.p2t_q_w, w.p2t_q_b).reshape(b, k, num_heads, dh)
    mk = torch.einsum("hjd,bkhj->bdhk", w.p2t_k_w.reshape(num_heads, dh, d), q2) * scale
    v2 = F.linear(p_tilde, w.p2t_v_w, w.p2t_v_b).reshape(b, k, num_heads, dh)
    nv = torch.einsum("bkhj,ehj->bhke", v2, w.p2t_o_w.reshape(d, num_heads, dh))
    gate_in = torch.cat([p_tilde.mean(dim=1), z0], dim=-1)
    pre = F.linear(gate_in, w.gate_w1, w.gate_b1)
    hidden = F.gelu(pre)
    alpha = torch.sigmoid(F.linear(hidden, w.gate_w2, w.gate_b2))[:, 0]
    nv = F.pad(nv.reshape(b, num_heads * k, d), (0, 0, 0, hkp - num_heads * k))
    saved = dict(gh=gh, ch=ch, msg=msg, p_tilde=p_tilde, q2=q2, v2=v2, gate_in=gate_in, pre=pre,
                 hidden=hidden)
    return p_tilde, _pad_columns(mk, hkp), nv, alpha, saved


def _block_diagonal_queries(q2: Tensor, key_cols: int, hkp: int) -> Tensor:
    """q2 [B,K,H,dh] -> Qexp [B,KEY_COLS,HKP]: column c = h*K + k holds scale * q2[k,h] in rows
    h*dh .. (h+1)*dh, zeros elsewhere, so that K2 Qexp = Z Mk (= logits2 up to b'k, which drops
    out of the softmax over T) for the raw keys K2 = Z W'k^T [T, A]."""
    b, k, num_heads, dh = q2.shape
    eye = torch.eye(num_heads, device=q2.device, dtype=q2.dtype)
    qexp = torch.einsum("bkhj,hg->bhjgk", q2, eye).reshape(b, num_heads * dh, num_heads * k)
    return F.pad(qexp / math.sqrt(dh), (0, hkp - num_heads * k, 0, key_cols - num_heads * dh))


def _p2t_small_backward(grad_p_tilde: Tensor, grad_mk: Tensor, grad_nv: Tensor, grad_alpha: Tensor,
                        alpha: Tensor, s: dict, w: PIMParams, inv_tokens: float, hkp: int,
                        grads: dict):
    """Backward of _p2t_small (chain rule written out; the gate uses the exact erf GELU).
    grad_mk [B,D,HKP], grad_nv [B,HKP,D], grad_alpha [B]. Fills ``grads`` with every weight's
    gradient it reaches; returns (dG [B,HKP,D], dcolsum [B,HKP], dP [B,K,D], dZ[:,0] [B,D])."""
    b, k, num_heads, dh = s["q2"].shape
    d = grad_p_tilde.shape[2]
    scale = 1.0 / math.sqrt(dh)
    # gate: alpha = sigmoid(W2 gelu(W1 gate_in + b1) + b2)
    d_logit = (grad_alpha * alpha * (1.0 - alpha))[:, None]  # [B,1]
    grads["gate_w2"] = d_logit.t() @ s["hidden"]
    grads["gate_b2"] = d_logit.sum(dim=0)
    pre = s["pre"]
    gelu_grad = 0.5 * (1.0 + torch.erf(pre * 0.5 ** 0.5)) + pre * torch.exp(-0.5 * pre * pre) \
        * (2.0 * math.pi) ** -0.5
    d_pre = (d_logit @ w.gate_w2) * gelu_grad  # [B,G]
    grads["gate_w1"] = d_pre.t() @ s["gate_in"]
    grads["gate_b1"] = d_pre.sum(dim=0)
    d_gate_in = d_pre @ w.gate_w1  # [B,2D]
    d_pt = grad_p_tilde + d_gate_in[:, None, :d] / k
    # Nv[h,k,:] = v2[k,h] W'o_h^T
    dnv = _unpad_columns(grad_nv, num_heads, k, 1)  # [B,H,K,D]
    wo2 = w.p2t_o_w.reshape(d, num_heads, dh)
    dv2 = torch.einsum("bhke,ehj->bkhj", dnv, wo2).reshape(b, k, -1)
    grads["p2t_o_w"] = torch.einsum("bhke,bkhj->ehj", dnv, s["v2"]).reshape(d, -1)
    grads["p2t_v_w"] = torch.einsum("bka,bkd->ad", dv2, s["p_tilde"])
    grads["p2t_v_b"] = dv2.sum(dim=(0, 1))
    d_pt = d_pt + dv2 @ w.p2t_v_w
    # Mk[:,h,k] = scale W'k_h^T q2[k,h]; the key bias b'k does not reach the output
    dmk = _unpad_columns(grad_mk, num_heads, k, 2) * scale  # [B,D,H,K]
    wk2 = w.p2t_k_w.reshape(num_heads, dh, d)
    dq2 = torch.einsum("hjd,bdhk->bkhj", wk2, dmk).reshape(b, k, -1)
    grads["p2t_k_w"] = torch.einsum("bkhj,bdhk->hjd", s["q2"], dmk).reshape(-1, d)
    grads["p2t_k_b"] = torch.zeros_like(w.p2t_k_b)
    grads["p2t_q_w"] = torch.einsum("bka,bkd->ad", dq2, s["p_tilde"])
    grads["p2t_q_b"] = dq2.sum(dim=(0, 1))
    d_pt = d_pt + dq2 @ w.p2t_q_w
    # p_tilde = P + msg Wo^T + bo; msg = (G_h Wv_h^T + colsum bv_h) * inv_tokens
    grads["t2p_o_w"] = torch.einsum("bkd,bka->da", d_pt, s["msg"])
    grads["t2p_o_b"] = d_pt.sum(dim=(0, 1))
    dmsg = (d_pt @ w.t2p_o_w).reshape(b, k, num_heads, dh) * inv_tokens
    wv = w.t2p_v_w.reshape(num_heads, dh, d)
    dgh = torch.einsum("bkhj,hjd->bhkd", dmsg, wv)
    dch = torch.einsum("bkhj,hj->bhk", dmsg, w.t2p_v_b.reshape(num_heads, dh))
    grads["t2p_v_w"] = torch.einsum("bkhj,bhkd->hjd", dmsg, s["gh"]).reshape(-1, d)
    grads["t2p_v_b"] = torch.einsum("bkhj,bhk->hj", dmsg, s["ch"]).reshape(-1)
    d_g = F.pad(dgh.reshape(b, num_heads * k, d), (0, 0, 0, hkp - num_heads * k))
    return d_g, _pad_columns(dch, hkp), d_pt, d_gate_in[:, d:]


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
# Programs to aim for in the reduction kernels: a few waves on a 132-SM GPU. Fewer programs mean
# fewer fp32 atomic adds of [HKP, D] partials (one per program and D block); more programs mean
# more parallelism for small batches.
TARGET_PROGRAMS = 512


def _f32(x: Tensor) -> Tensor:
    """A per-image matrix (Mq, Mk, Nv, Qexp, dG) as the kernels take it: fp32, contiguous. The
    kernels split it into bf16 hi + lo parts on chip (``_mm_split``); rounding it to the input
    dtype instead would cost the accuracy of high-norm tokens and sharp attention."""
    return x.float().contiguous()


def _layout(z: Tensor, p: Tensor, num_heads: int):
    b, t, d = z.shape
    hkp = num_columns(num_heads, p.shape[1])
    block_t, block_d, warps = launch_config(hkp, z.dtype)
    return b, t, d, p.shape[1], hkp, block_t, block_d, warps


def _keys_layout(z: Tensor, wk: Tensor) -> Tuple[int, Tensor]:
    """(KEY_COLS, W'k^T [D,KEY_COLS] zero-padded, z dtype: exact, as the weight came in) for the
    2-read path; (0, z) otherwise (a placeholder pointer the kernels never touch with KEY_COLS = 0)."""
    key_cols = key_columns(z.shape[2], wk.shape[0], z.dtype)
    if not key_cols:
        return 0, z
    return key_cols, F.pad(wk.t(), (0, key_cols - wk.shape[0])).to(z.dtype).contiguous()


def _chunks(b: int, t: int, block_t: int) -> Tuple[int, int]:
    """(n_chunks, chunk_blocks): each image's row blocks split into n_chunks programs."""
    blocks = triton.cdiv(t, block_t)
    n_chunks = max(1, min(blocks, TARGET_PROGRAMS // b))
    chunk_blocks = triton.cdiv(blocks, n_chunks)
    return triton.cdiv(blocks, chunk_blocks), chunk_blocks


@no_autocast  # the per-image algebra is fp32 by contract
def _forward(z: Tensor, p: Tensor, weights: List[Tensor], num_heads: int, mean_reduce: bool,
             return_attn: bool):
    z = z.contiguous()
    b, t, d, k, hkp, block_t, block_d, warps = _layout(z, p, num_heads)
    ntb = triton.cdiv(t, block_t)
    mode = _dot_mode(z.dtype, z.device)
    P = PIMParams(*(x.float() for x in weights))
    pf = p.float()
    mq, cq, _ = _t2p_small(pf, P, num_heads, hkp)
    mq, cq = _f32(mq), _f32(cq)
    g = torch.zeros(b, hkp, d, device=z.device, dtype=torch.float32)
    colsum = torch.zeros(b, hkp, device=z.device, dtype=torch.float32)
    n_chunks, chunk_blocks = _chunks(b, t, block_t)
    s1 = torch.empty(b, n_chunks * chunk_blocks * block_t, hkp, device=z.device, dtype=torch.float32)
    key_cols, wk = _keys_layout(z, weights[PIMParams._fields.index("p2t_k_w")])
    # 2-read forward: pass 1 also writes K2 = Z W'k^T in fp32 (else a placeholder the kernel ignores)
    k2 = torch.empty(b, t, key_cols, device=z.device, dtype=torch.float32) if key_cols else z
    _t2p_reduce_kernel[(b, n_chunks)](z, mq, cq, wk, s1, g, colsum, k2, t, d, k, num_heads,
                                      chunk_blocks, BLOCK_T=block_t, BLOCK_D=block_d, HKP=hkp,
                                      KEY_COLS=key_cols, DOT_MODE=mode, num_warps=warps,
                                      num_stages=NUM_STAGES, maxnreg=MAX_REGISTERS)
    p_tilde, mk, nv, alpha, small = _p2t_small(g, colsum, pf, z[:, 0].float(), P, num_heads, hkp,
                                               1.0 / t if mean_reduce else 1.0)
    nv = _f32(nv)
    mpart = torch.empty(b, ntb, hkp, device=z.device, dtype=torch.float32)
    lpart = torch.empty_like(mpart)
    if key_cols:  # logits2 = K2 Qexp: stats and update read K2 [T, KEY_COLS], not Z [T, D]
        logits_in = (k2, _f32(_block_diagonal_queries(small["q2"], key_cols, hkp)))
        logits_width = key_cols
    else:
        logits_in, logits_width = (z, _f32(mk)), d
    _p2t_stats_kernel[(b, ntb)](*logits_in, mpart, lpart, t, logits_width, BLOCK_T=block_t,
                                BLOCK_D=block_d, HKP=hkp, FROM_KEYS=bool(key_cols), DOT_MODE=mode,
                                num_warps=warps, num_stages=NUM_STAGES, maxnreg=MAX_REGISTERS)
    m2 = mpart.amax(dim=1)
    l2 = (lpart * torch.exp(mpart - m2[:, None])).sum(dim=1)
    out = torch.empty_like(z)
    attn = torch.empty((b, num_heads, k, t) if return_attn else (0,), device=z.device,
                       dtype=torch.float32)
    _p2t_update_kernel[(b, ntb)](z, *logits_in, m2, l2, nv, P.p2t_o_b.contiguous(), alpha.contiguous(),
                                 out, attn, t, d, logits_width, num_heads * k, int(return_attn),
                                 BLOCK_T=block_t, BLOCK_D=block_d, HKP=hkp, FROM_KEYS=bool(key_cols),
                                 DOT_MODE=mode, num_warps=warps, num_stages=NUM_STAGES,
                                 maxnreg=MAX_REGISTERS)
    return out, p_tilde.to(p.dtype), attn, g, colsum, m2, l2


@no_autocast
def _backward(grad_out: Tensor, grad_p_tilde: Tensor, z: Tensor, p: Tensor, weights: List[Tensor],
              g: Tensor, colsum: Tensor, m2: Tensor, l2: Tensor, num_heads: int, mean_reduce: bool):
    z, y = z.contiguous(), grad_out.contiguous()
    b, t, d, k, hkp, block_t, block_d, warps = _layout(z, p, num_heads)
    mode = _dot_mode(z.dtype, z.device)
    w = PIMParams(*(x.float() for x in weights))
    pf, z0 = p.float(), z[:, 0].float()
    inv_tokens = 1.0 / t if mean_reduce else 1.0
    # Recompute the small per-image matrices (cheap, O(B*K*D*A)) instead of saving them.
    mq, cq, k1 = _t2p_small(pf, w, num_heads, hkp)
    _, mk, nv, alpha, saved = _p2t_small(g, colsum, pf, z0, w, num_heads, hkp, inv_tokens)
    mq, mk, nv, cq = _f32(mq), _f32(mk), _f32(nv), _f32(cq)
    alpha = alpha.contiguous()
    # logits2 exactly as the forward's softmax statistics saw them (K2 Qexp on the 2-read path)
    key_cols, wk = _keys_layout(z, weights[PIMParams._fields.index("p2t_k_w")])
    qexp = _f32(_block_diagonal_queries(saved["q2"], key_cols, hkp)) if key_cols else mk

    # Pass A: prompt->token reductions over (Z, dZ_out).
    e, f1, f2, g1 = torch.zeros(4, b, hkp, d, device=z.device, dtype=torch.float32)
    ysum = torch.zeros(b, d, device=z.device, dtype=torch.float32)
    delta = torch.zeros(b, hkp, device=z.device, dtype=torch.float32)  # sum_t S2[c,t] (y_t . Nv[c])
    n_chunks, chunk_blocks = _chunks(b, t, block_t)
    s2 = torch.empty(b, n_chunks * chunk_blocks * block_t, hkp, device=z.device, dtype=torch.float32)
    ws2 = torch.empty_like(s2)
    _p2t_grad_reduce_kernel[(b, n_chunks)](z, y, mk, wk, qexp, nv, m2, l2, s2, ws2, e, f1, f2, g1,
                                           ysum, delta, t, d, chunk_blocks,
                                           BLOCK_T=block_t, BLOCK_D=block_d, HKP=hkp,
                                           KEY_COLS=key_cols, DOT_MODE=mode, num_warps=warps,
                                           num_stages=NUM_STAGES, maxnreg=MAX_REGISTERS)
    # z_out = Z + alpha (S2^T Nv + b'o): closed-form gradients of Nv, Mk, alpha, b'o
    grad_nv = alpha[:, None, None] * e
    grad_mk = (alpha[:, None, None] * (f1 + (g1 - delta[..., None] * f2))).transpose(1, 2)
    grad_alpha = delta.sum(dim=1) + ysum @ w.p2t_o_b
    grads = {"p2t_o_b": (alpha[:, None] * ysum).sum(dim=0)}
    grad_g, grad_colsum, grad_p, grad_z0 = _p2t_small_backward(
        grad_p_tilde.float(), grad_mk, grad_nv, grad_alpha, alpha, saved, w, inv_tokens, hkp, grads)

    # Pass B: dZ, and the token-side reductions of the token->prompt backward.
    dz = torch.empty_like(z)
    grad_mq = torch.zeros(b, d, hkp, device=z.device, dtype=torch.float32)
    grad_cq = torch.zeros_like(cq)
    t_pad = s2.shape[1]
    dl1 = s2  # pass A's scratch is free again
    _grad_z_kernel[(b, triton.cdiv(t, block_t))](
        z, y, mq, cq, mk, wk, qexp, nv, m2, l2, alpha, delta, _f32(grad_g),
        _f32(grad_colsum), _f32(grad_z0), dz, dl1, grad_cq, t, d, k, num_heads, t_pad, BLOCK_T=block_t,
        BLOCK_D=block_d, HKP=hkp, KEY_COLS=key_cols, DOT_MODE=mode, num_warps=warps,
        num_stages=NUM_STAGES, maxnreg=MAX_REGISTERS)
    _t2p_grad_reduce_kernel[(b, n_chunks)](z, dl1, grad_mq, t, d, t_pad, chunk_blocks,
                                           BLOCK_T=block_t, BLOCK_D=block_d, HKP=hkp,
                                           DOT_MODE=mode, num_warps=warps, num_stages=NUM_STAGES,
                                           maxnreg=MAX_REGISTERS)
    grad_p = grad_p + _t2p_small_backward(grad_mq, grad_cq, pf, k1, w, grads)
    return [dz, grad_p.to(p.dtype)] + [grads[n].to(x.dtype).reshape(x.shape)
                                       for n, x in zip(PIMParams._fields, weights)]


# --------------------------------------------------------------------------------------------
# Custom ops + autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("avpt::pim_forward", mutates_args=())
def pim_forward_op(z: Tensor, p: Tensor, weights: List[Tensor], num_heads: int, mean_reduce: bool,
                   return_attn: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> z_out [B,T,D], p_tilde [B,K,D], attn [B,H,K,T] fp32 (or [0]), and what backward needs:
    G [B,HKP,D], colsum [B,HKP], softmax-over-T max and sum m2, l2 [B,HKP] (all fp32)."""
    return _forward(z, p, weights, num_heads, mean_reduce, return_attn)


@pim_forward_op.register_fake
def _(z, p, weights, num_heads, mean_reduce, return_attn):
    b, t, d = z.shape
    k = p.shape[1]
    hkp = num_columns(num_heads, k)
    f32 = dict(device=z.device, dtype=torch.float32)
    attn = z.new_empty((b, num_heads, k, t) if return_attn else (0,), dtype=torch.float32)
    return (torch.empty_like(z), torch.empty_like(p), attn, z.new_empty(b, hkp, d, **f32),
            z.new_empty(b, hkp, **f32), z.new_empty(b, hkp, **f32),
            z.new_empty(b, hkp, **f32))


@torch.library.custom_op("avpt::pim_backward", mutates_args=())
def pim_backward_op(grad_out: Tensor, grad_p_tilde: Tensor, z: Tensor, p: Tensor,
                    weights: List[Tensor], g: Tensor, colsum: Tensor, m2: Tensor, l2: Tensor,
                    num_heads: int, mean_reduce: bool) -> List[Tensor]:
    """-> [dz, dp, d(each weight)] of pim_forward_op."""
    return _backward(grad_out, grad_p_tilde, z, p, weights, g, colsum, m2, l2, num_heads, mean_reduce)


@pim_backward_op.register_fake
def _(grad_out, grad_p_tilde, z, p, weights, g, colsum, m2, l2, num_heads, mean_reduce):
    return [torch.empty_like(z), torch.empty_like(p)] + [torch.empty_like(w) for w in weights]


def _setup_context(ctx, inputs, output):
    z, p, weights, num_heads, mean_reduce, _ = inputs
    _, _, attn, g, colsum, m2, l2 = output
    ctx.save_for_backward(z, p, g, colsum, m2, l2, *weights)
    ctx.num_heads, ctx.mean_reduce = num_heads, mean_reduce
    ctx.mark_non_differentiable(attn, g, colsum, m2, l2)


def _backward_formula(ctx, grad_out, grad_p_tilde, *unused):
    z, p, g, colsum, m2, l2, *weights = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(z)
    if grad_p_tilde is None:
        grad_p_tilde = torch.zeros_like(p)
    grads = pim_backward_op(grad_out, grad_p_tilde, z, p, weights, g, colsum, m2, l2,
                            ctx.num_heads, ctx.mean_reduce)
    return grads[0], grads[1], grads[2:], None, None, None


pim_forward_op.register_autograd(_backward_formula, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def pim(z: Tensor, p: Tensor, params: PIMParams, num_heads: int, t2p_reduce: str = "sum",
        return_attn: bool = False, *, backend: Optional[str] = None):
    """PIM, Eqs. 5-10: token->prompt then prompt->token cross-attention and a gated residual.

    z [B,T,D] tokens (class token at index 0), p [B,K,D] prompts, params: ``PIMParams``
    (nn.Linear layout), ``num_heads`` heads of width A / num_heads, scale 1/sqrt(head width).
    ``t2p_reduce``: "sum" (Eq. 6 as written) or "mean" (divide the token sum by T).
    Returns ``(z_out [B,T,D], p_tilde [B,K,D])`` and, with ``return_attn``, the prompt->token
    attention ``[B,H,K,T]`` (for rollout, Eq. 18; fp32, and not differentiated on the Triton path).
    """
    check_args(z, p, params, num_heads, t2p_reduce)
    name = resolve("pim", z.device, backend, has_triton=HAS_TRITON)
    if name == "triton":
        reason = triton_unsupported_reason(z, p, params, num_heads)
        if reason is not None:
            if (backend if backend is not None else get_backend()) == "triton":
                raise ValueError(f"pim: backend='triton' does not support {reason}; "
                                 f"use backend='torch' or 'auto'")
            name = "torch"
    if name == "torch":
        return reference.pim(z, p, params, num_heads, t2p_reduce, return_attn)
    z_out, p_tilde, attn, *_ = pim_forward_op(z, p, list(params), num_heads, t2p_reduce == "mean",
                                              return_attn)
    return (z_out, p_tilde, attn) if return_attn else (z_out, p_tilde)


# --------------------------------------------------------------------------------------------
# Ahead-of-time configurations
# --------------------------------------------------------------------------------------------
def _key_widths(dtype: torch.dtype) -> dict:
    """HKP -> the KEY_COLS values (0 = 3-read path) the launchers can pair with it for dtype."""
    widths = {}
    for h in range(1, MAX_COLUMNS[dtype] + 1):
        for k in range(1, min(MAX_PROMPTS, MAX_COLUMNS[dtype] // h) + 1):
            hkp = num_columns(h, k)
            found = widths.setdefault(hkp, {0})
            found.update(key_columns(MAX_DIM, h * dh, dtype) for dh in range(HEAD_WIDTHS[0], HEAD_WIDTHS[1] + 1))
    return {hkp: sorted(found) for hkp, found in sorted(widths.items())}


def aot_configs():
    """Every kernel configuration the launchers can select: HKP in {16, ..., MAX_COLUMNS} x input
    dtype, each with the (BLOCK_T, BLOCK_D, num_warps) that launch_config picks for it, and for
    the kernels that build K2 = Z W'k^T, every KEY_COLS that HKP can come with (0: 3-read path)."""
    from .aot import KernelConfig

    configs = []
    for dtype, mode in _DOT_MODE.items():
        zp = "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        for hkp, key_widths in _key_widths(dtype).items():
            block_t, block_d, warps = launch_config(hkp, dtype)

            def add(fn, key_cols=None, FROM_KEYS=None, **sig):
                const = dict(BLOCK_T=block_t, BLOCK_D=block_d, HKP=hkp, DOT_MODE=mode)
                if key_cols is not None:
                    const["KEY_COLS"] = key_cols
                if FROM_KEYS is not None:
                    const["FROM_KEYS"] = FROM_KEYS
                types = {n: ("*fp32" if v == "f" else zp if v == "z" else v) for n, v in sig.items()}
                configs.append(KernelConfig(fn, {**types, **{c: "constexpr" for c in const}}, const,
                                            num_warps=warps, num_stages=NUM_STAGES,
                                            maxnreg=MAX_REGISTERS))

            for kc in key_widths:
                add(_t2p_reduce_kernel, kc, z_ptr="z", mq_ptr="f", cq_ptr="f", wk_ptr="z",
                    s1_ptr="f", g_ptr="f", colsum_ptr="f", k2_ptr="f", T="i32", D="i32", K="i32",
                    H="i32", chunk_blocks="i32")
                add(_p2t_grad_reduce_kernel, kc, z_ptr="z", y_ptr="z", mk_ptr="f", wk_ptr="z",
                    qexp_ptr="f", nv_ptr="f", m2_ptr="f", l2_ptr="f", s2_ptr="f", ws2_ptr="f",
                    e_ptr="f", f1_ptr="f", f2_ptr="f", g1_ptr="f", ysum_ptr="f", delta_ptr="f",
                    T="i32", D="i32", chunk_blocks="i32")
                add(_grad_z_kernel, kc, z_ptr="z", y_ptr="z", mq_ptr="f", cq_ptr="f", mk_ptr="f",
                    wk_ptr="z", qexp_ptr="f", nv_ptr="f", m2_ptr="f", l2_ptr="f", alpha_ptr="f",
                    delta_ptr="f", dg_ptr="f", dcolsum_ptr="f", dz0_ptr="f", dz_ptr="z", dl1_ptr="f",
                    dcq_ptr="f", T="i32", D="i32", K="i32", H="i32", t_pad="i32")
            for from_keys in sorted({kc > 0 for kc in key_widths}):
                # FROM_KEYS: logits2 from K2 (fp32) on the 2-read path, else from Z
                x_type = "f" if from_keys else "z"
                add(_p2t_stats_kernel, None, x_ptr=x_type, m_ptr="f", mpart_ptr="f",
                    lpart_ptr="f", T="i32", W="i32", FROM_KEYS=from_keys)
                add(_p2t_update_kernel, None, z_ptr="z", x_ptr=x_type, m_ptr="f", m2_ptr="f",
                    l2_ptr="f", nv_ptr="f", bo_ptr="f", alpha_ptr="f", out_ptr="z", attn_ptr="f",
                    T="i32", D="i32", W="i32", HK="i32", return_attn="i32", FROM_KEYS=from_keys)
            add(_t2p_grad_reduce_kernel, z_ptr="z", dl1_ptr="f", dmq_ptr="f", T="i32", D="i32",
                t_pad="i32", chunk_blocks="i32")
    return configs
