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

Forward: 5 launches and no torch algebra. The per-image matrices come from two small kernels
(``pim_algebra``: Mq, cq before pass 1; p_tilde, Qexp or Mk, Nv and the gate alpha after it),
all reading the 20 weights from one flat fp32 vector (``pack_weights``; the module keeps its
weights that way). Z is read
twice from DRAM and z_out written once (the DESIGN floor) on the 2-read path, taken when the raw
prompt->token keys K2 = Z W'k^T [T, A] (fp32) are cheap: A padded to KEY_COLS (a power of two
>= 16) with 12 * KEY_COLS <= D * element size (``key_columns`` decides). The A-VPT model's layout
(A = 4 x 16 = 64, K = 6, so HKP = 32, with D = 768) takes the 2-read path in every dtype.
There logits2[t,(h,k)] = K2_t . Qexp[:,(h,k)], Qexp [KEY_COLS,HKP] block-diagonal
(scale * q2[k,h] in rows h*dh .. (h+1)*dh), which needs only q2, i.e. G, after pass 1:
  0. ``_t2p_small_kernel``    (per image) k1 = P W_k^T + b_k, Mq, cq; zeroes G and colsum.
  1. ``_t2p_reduce_kernel``   reads Z once from DRAM: G, colsum, and (2-read path) writes K2
     [B,T,KEY_COLS] in fp32 from the Z tiles already on chip. A program owns a chunk of
     row blocks of one image (``TARGET_PROGRAMS``); it parks the chunk's S1 in an L2-resident
     fp32 scratch, re-reads the chunk's Z tiles (L2 hits) D block by D block and adds its
     [HKP, D] partial of G once with fp32 atomics.
  1b. ``_p2t_small_kernel``  (per image) p_tilde, q2, v2, alpha, Qexp, Mk, Nv from G, colsum.
  2. ``_p2t_stats_kernel``    per-row-block max / sum-exp of logits2 (combined by pass 3), from
     (K2, Qexp) on the 2-read path (reads T x KEY_COLS, not Z), else from (Z, Mk) (reads Z).
  3. ``_p2t_update_kernel``   reads Z once, writes z_out once (and the attention if asked); its
     logits2 come from the same operands as pass 2's, so S2 is normalised exactly.
  => 2-read path: Z read twice, z_out written once, K2 written once and read twice (12 * KEY_COLS
     bytes a token in all, at most one Z read); fallback (larger A, or small D, where K2 would not
     pay): Z read 3 times. K2 is a forward temporary, never saved: the backward kernels rebuild
     logits2 = K2 Qexp from the Z tiles they load anyway (``_key_step``/``_key_logits``, the
     same operations and roundings as the forward), so that they agree with the saved statistics.

Backward: 5 launches and one zero-fill of the fp32 accumulators (pass A's sums, dMq, dcq and
the flat weight gradient), nothing of size T x A or T x K saved:
  A. ``_p2t_grad_reduce_kernel`` (chunked like 1) reads Z, dY once: E = S2^T dY, the
     chunk-centred F1 = (S2*(yn - delta_c))^T Z, F2 = S2^T Z, G1 = sum_chunks delta_c F2_chunk
     ([HKP,D]), sum_t dY and delta = sum_t S2*yn, with yn[t,c] = dY_t . Nv[c]; from them
     dNv = alpha E, dMk = alpha (F1 + G1 - delta F2) (no cancellation of two large sums: see the
     kernel), dalpha in closed form (delta is the softmax-backward row sum: no extra pass).
  B. ``_grad_z_kernel`` reads Z, dY once, writes dZ once (and dl1 [T,HKP] fp32 to scratch).
  C. ``_t2p_grad_reduce_kernel`` (chunked) reads Z once more: dMq = Z^T dl1.
  => Z read 3 times, dY twice, dZ written once (the floor: Z and dY twice each). On the 2-read
  path, A and B also recompute K2 = Z W'k^T (no extra traffic) for logits2 = K2 Qexp.
  Between A and B, ``_p2t_small_grad_kernel`` (per image) turns A's sums into dG, dcolsum,
  dz_0, dp_tilde and the p2t/gate weight gradients; after C, ``_t2p_small_grad_kernel`` gives
  dP and the t2p q/k weight gradients (fp32 atomic adds into one flat vector). Saved for
  backward: z, p, the flat weights and one fp32 state buffer (G, colsum, the softmax stats, the
  per-image matrices and the small kernels' intermediates): O(B*(K+HKP)*D).

Precision (the bounded-error rule, ``avpt_kernels.testing.assert_bounded_error``: in fp16 and
bf16 the error against the fp64 truth is at most 2x the torch backend's, which computes in fp32).
Products of two operands that are exact in the input dtype (Z, dY) are single 16-bit
tensor-core dots with fp32 accumulation: exact products; the weights are fp32 (master weights),
so Z W'k is a two-part split dot. Every product with an fp32
intermediate (softmax probabilities S1, S2, the per-image matrices Mq, Mk, Nv, the gradients
dG, dl1, dl2) is a split dot (``_mm_split``: the fp32 operand as 16-bit hi + lo parts, 2-3 dots,
~fp32 accuracy), because rounding those operands to 16 bits is amplified: a high-norm token
(x100) turns a 2^-9 relative error of Mq or Mk into logit errors of ~0.2 and softmax errors of
20%, and dMk is a difference of sums that cancel to many digits when the attention sits on one
token. K2 . Qexp (both fp32, KEY_COLS deep) is an IEEE fp32 dot. The per-image algebra kernels
use the same split dots (fp32 x fp32: 3 dots), IEEE fp32 for fp32 inputs.

Supported by the Triton path: fp32/fp16/bf16, D a multiple of 16 up to 1024, 1 <= K <= 16, head
width 8..64, A = H * head width <= 64, gate hidden width <= 64, H*K <= 32 head-prompt columns
(e.g. 4 heads x K <= 8, 12 heads x K <= 2; at 64 the per-image backward kernel spills in 16
bits: it holds [HKP, A] fp32 tiles and their split parts). Anything else: ``ValueError`` for
``backend="triton"``, the torch path for ``"auto"``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks, reference
from ._autocast import no_autocast
from .backend import get_backend, resolve
from .pim_algebra import (_p2t_small_grad_kernel, _p2t_small_kernel, _t2p_small_grad_kernel,
                          _t2p_small_kernel)
from .pim_dots import _mm, _mm_split
from .reference import PIMParams

HAS_TRITON = True

T2P_REDUCE = ("sum", "mean")

MAX_DIM = 1024
MAX_PROMPTS = 16
HEAD_WIDTHS = (8, 64)
# Attention width A = H * head width and gate hidden units G the per-image algebra kernels take
# (their [HKP, A] and [G, BLOCK_D] fp32 tiles; wider goes to the torch path).
MAX_WIDTH = 64
MAX_GATE_HIDDEN = 64
# Most (head, prompt) columns H*K: at 64 the per-image backward kernel (pim_algebra) spills in
# the 16-bit dtypes (AOT, Triton 3.8), so the Triton path takes H*K <= 32.
MAX_COLUMNS = {torch.float32: 32, torch.float16: 32, torch.bfloat16: 32}
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
    _checks.same_dtype_device("z", z, p=p)
    _checks.same_dtype_device("params.t2p_q_w", params.t2p_q_w,
                              **{f"params.{n}": getattr(params, n) for n in PIMParams._fields[1:]})
    if params.t2p_q_w.device != z.device:
        raise ValueError(f"params are on {params.t2p_q_w.device} but z is on {z.device}; "
                         f"move them to one device")
    if params.t2p_q_w.dtype not in (z.dtype, torch.float32):
        raise TypeError(f"params have dtype {params.t2p_q_w.dtype}; expected z's dtype "
                        f"({z.dtype}) or float32 master weights")


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
    (16, False): (32, 32, 8), (32, False): (32, 32, 8), (64, False): (16, 32, 8),
}
NUM_STAGES = 1
# The dZ kernel, the register-heaviest (S1, S2, their gradients and the fp32 key tile at once),
# takes row blocks of 16 in every dtype: at 32 (16-bit, HKP = 32, KEY_COLS = 64: the model's
# layout) it spills 16 bytes on sm_90a under Triton 3.6.
DZ_BLOCK_T = 16
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
    if a > MAX_WIDTH:
        return f"attention width A={a} (num_heads * head width; the kernels take at most {MAX_WIDTH})"
    if params.gate_w1.shape[0] > MAX_GATE_HIDDEN:
        return (f"gate hidden width {params.gate_w1.shape[0]} (the kernels take at most "
                f"{MAX_GATE_HIDDEN})")
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
def _key_step(zt, wk_ptr, A, D, dd, d_ok, KEY_COLS: tl.constexpr, DOT_MODE: tl.constexpr):
    """One D block of the raw prompt->token keys K2 = Z W'k^T: zt [BLOCK_T,BLOCK_D] times columns
    dd of W'k [A,D] (fp32, the flat weights' view; columns >= A of the key tile are zero): a
    split dot, the fp32 weight as two 16-bit parts. Pass 1 and the backward kernels share it, so
    that the backward rebuilds the forward's K2 operation for operation."""
    kc = tl.arange(0, KEY_COLS)
    wk = tl.load(wk_ptr + kc[None, :] * D + dd[:, None], mask=d_ok[:, None] & (kc < A)[None, :],
                 other=0.0)
    return _mm_split(zt, wk, 1, DOT_MODE)


@triton.jit
def _t2p_reduce_kernel(z_ptr, mq_ptr, cq_ptr, wk_ptr, s1_ptr, g_ptr, colsum_ptr, k2_ptr,
                       T, D, K, H, A, chunk_blocks,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
                       KEY_COLS: tl.constexpr, DOT_MODE: tl.constexpr):
    """Token->prompt pass. Grid (B, n_chunks); a program owns chunk_blocks row blocks of one image.
    z [B,T,D], mq [B,D,HKP] fp32, cq [B,HKP] fp32 -> g [B,HKP,D] += S1^T Z, colsum [B,HKP] += sum_t S1.
    s1 [B,n_chunks*chunk_blocks*BLOCK_T,HKP] fp32 is scratch: the chunk's S1 is parked there
    (L2-resident) so that G is accumulated in registers per D block and added once per chunk,
    instead of once per row block.
    KEY_COLS > 0 (the 2-read forward): also k2 [B,T,KEY_COLS] fp32 = Z W'k^T, the raw
    prompt->token keys, from the Z tiles already on chip; wk = W'k [A,D] fp32.
    KEY_COLS = 0: wk and k2 are not touched."""
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
                keys += _key_step(zt, wk_ptr, A, D, dd, d_ok, KEY_COLS, DOT_MODE)
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
def _combine_stats(mpart_ptr, lpart_ptr, b, NTB, HKP: tl.constexpr):
    """Softmax-over-T max and sum of one image from the stats pass's per-block partials
    [B,NTB,HKP]: every update program combines them in the same order, so all agree bit for bit."""
    cols = tl.arange(0, HKP)
    part = b * NTB * HKP + cols
    m = tl.full((HKP,), float("-inf"), dtype=tl.float32)
    for tb in range(0, NTB):
        m = tl.maximum(m, tl.load(mpart_ptr + part + tb * HKP))
    l = tl.zeros((HKP,), dtype=tl.float32)
    for tb in range(0, NTB):
        l += tl.load(lpart_ptr + part + tb * HKP) * tl.exp(tl.load(mpart_ptr + part + tb * HKP) - m)
    return m, l


@triton.jit
def _p2t_update_kernel(z_ptr, x_ptr, m_ptr, mpart_ptr, lpart_ptr, m2_ptr, l2_ptr, nv_ptr, bo_ptr,
                       alpha_ptr, out_ptr, attn_ptr, T, D, W, HK, return_attn,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
                       FROM_KEYS: tl.constexpr, DOT_MODE: tl.constexpr):
    """Prompt->token update and gated residual. Grid (B, cdiv(T, BLOCK_T)).
    z_out = Z + alpha * (S2^T Nv + b'o); nv [B,HKP,D] fp32, bo [D] (fp32, a view of the flat
    weights), alpha [B] fp32; attn [B,H,K,T] = [B,HK,T] fp32 written when return_attn != 0.
    The softmax statistics come from the stats pass's partials mpart, lpart [B,NTB,HKP]; the first
    row block's program also writes them, m2 and l2 [B,HKP], for the backward. logits2 = X M as
    in the stats pass (FROM_KEYS: X = K2, the 2-read forward, Z itself is then read only for the
    residual)."""
    b = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, HKP)
    z_img = z_ptr + b * T * D
    m2, l2 = _combine_stats(mpart_ptr, lpart_ptr, b, tl.num_programs(1), HKP)
    if tb == 0:
        tl.store(m2_ptr + b * HKP + cols, m2)
        tl.store(l2_ptr + b * HKP + cols, l2)
    logits = _p2t_logits(x_ptr + b * T * W, m_ptr + b * W * HKP, rows, row_ok, W, HKP, BLOCK_T,
                         BLOCK_D, FROM_KEYS, DOT_MODE)
    s2 = tl.where(row_ok[:, None], tl.exp(logits - m2[None, :]) * (1.0 / l2)[None, :], 0.0)
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
                            ws2_ptr, e_ptr, f1_ptr, f2_ptr, g1_ptr, ysum_ptr, delta_ptr, T, D, A,
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
    K2 Qexp from K2 = Z W'k^T recomputed here (wk = W'k [A,D], qexp [B,KEY_COLS,HKP]); mk unused."""
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
                keys += _key_step(zt, wk_ptr, A, D, dd, d_ok, KEY_COLS, DOT_MODE)
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
                   K, H, A, t_pad, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
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
    a [D, HKP] partial per row block here). logits2 as in _p2t_grad_reduce_kernel (KEY_COLS);
    mk [B,D,HKP] on both paths (dl2 Mk^T).
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
            keys += _key_step(zt, wk_ptr, A, D, dd, d_ok, KEY_COLS, DOT_MODE)
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
# Packed weights: one flat vector per layer, in PIMParams order
# --------------------------------------------------------------------------------------------
def weight_shapes(d: int, a: int, gate_hidden: int) -> List[Tuple[int, ...]]:
    """Shapes of the PIMParams fields in order: the flat layout of ``pack_weights``, which the
    kernels address through ``pim_algebra._w``."""
    side = [(a, d), (a,)] * 3 + [(d, a), (d,)]
    return side + side + [(gate_hidden, 2 * d), (gate_hidden,), (1, gate_hidden), (1,)]


def packed_size(d: int, a: int, gate_hidden: int) -> int:
    """Elements of the flat weight vector of a layer with width D, attention width A, gate G."""
    return sum(math.prod(s) for s in weight_shapes(d, a, gate_hidden))


def pack_weights(params: PIMParams) -> Tensor:
    """PIMParams -> one flat vector [N] (``weight_shapes`` layout); differentiable."""
    return torch.cat([w.reshape(-1) for w in params])


def unpack_weights(flat: Tensor, d: int, a: int, gate_hidden: int) -> PIMParams:
    """Views of a flat weight vector [N] as PIMParams (a ``split``: its backward is one cat)."""
    shapes = weight_shapes(d, a, gate_hidden)
    parts = flat.split([math.prod(s) for s in shapes])
    return PIMParams(*(x.view(s) for x, s in zip(parts, shapes)))


def _field(flat: Tensor, name: str, d: int, a: int, gate_hidden: int) -> Tensor:
    """The flat view of one field (a pointer the kernels index themselves)."""
    shapes = weight_shapes(d, a, gate_hidden)
    i = PIMParams._fields.index(name)
    offset = sum(math.prod(s) for s in shapes[:i])
    return flat.narrow(0, offset, math.prod(shapes[i]))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
# Programs to aim for in the reduction kernels: a few waves on a 132-SM GPU. Fewer programs mean
# fewer fp32 atomic adds of [HKP, D] partials (one per program and D block); more programs mean
# more parallelism for small batches.
TARGET_PROGRAMS = 512
# The per-image algebra kernels (pim_algebra): prompts padded to KP rows, the gate hidden layer
# to GP, A to AP = max(16, next power of two); D in blocks of SMALL_BLOCK_D.
KP = MAX_PROMPTS
GP = MAX_GATE_HIDDEN
SMALL_BLOCK_D = 16
SMALL_WARPS = 8


# The per-image algebra kernels pad A to AP = MAX_WIDTH whatever A is: one configuration per
# (HKP, dtype) to compile, at the cost of padded work in kernels that are small anyway.
AP = MAX_WIDTH


def _state_fields(b: int, d: int, hkp: int, ap: int, key_cols: int) -> dict:
    """name -> shape of what the forward keeps for the backward (fp32, one buffer): pass 1's G
    and colsum, the softmax-over-T statistics m2, l2, and the per-image algebra's results."""
    # every size but the last is a multiple of 16 elements: each field starts 64-byte aligned
    return dict(g=(b, hkp, d), colsum=(b, hkp), m2=(b, hkp), l2=(b, hkp), mq=(b, d, hkp),
                cq=(b, hkp), k1=(b, KP, ap), mk=(b, d, hkp), qexp=(b, key_cols, hkp),
                nv=(b, hkp, d), pt32=(b, KP, d), msg=(b, KP, ap), q2=(b, KP, ap),
                v2=(b, KP, ap), pre=(b, GP), alpha=(b,))


def _carve_size(fields: dict) -> int:
    return sum(math.prod(s) for s in fields.values())


def _carve(buf: Tensor, fields: dict) -> dict:
    """Contiguous views of one flat buffer, one per field, in order (no gaps: every element of
    the buffer is written, so that the state is a deterministic output of the op)."""
    out, offset = {}, 0
    for name, shape in fields.items():
        n = math.prod(shape)
        out[name] = buf.narrow(0, offset, n).view(shape)
        offset += n
    return out


class _Layout:
    """Sizes and launch choices of one call, shared by forward, backward and the fake impls."""

    def __init__(self, z: Tensor, p: Tensor, num_heads: int, head_dim: int, gate_hidden: int):
        self.b, self.t, self.d = z.shape
        self.k, self.h, self.dh, self.gh = p.shape[1], num_heads, head_dim, gate_hidden
        self.a = num_heads * head_dim
        self.hkp = num_columns(num_heads, self.k)
        self.ap = AP
        self.block_t, self.block_d, self.warps = launch_config(self.hkp, z.dtype)
        self.ntb = triton.cdiv(self.t, self.block_t)
        self.n_chunks, self.chunk_blocks = _chunks(self.b, self.t, self.block_t)
        self.t_pad = self.n_chunks * self.chunk_blocks * self.block_t
        self.key_cols = key_columns(self.d, self.a, z.dtype)
        self.mode = _dot_mode(z.dtype, z.device)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.state_fields = _state_fields(self.b, self.d, self.hkp, self.ap, self.key_cols)
        self.state_size = _carve_size(self.state_fields)

    def big(self, block_t: Optional[int] = None, **const):
        """Launch options of the token kernels."""
        return dict(BLOCK_T=block_t or self.block_t, BLOCK_D=self.block_d, HKP=self.hkp,
                    DOT_MODE=self.mode, num_warps=self.warps, num_stages=NUM_STAGES,
                    maxnreg=MAX_REGISTERS, **const)

    def small(self, **const):
        """Launch options of the per-image algebra kernels."""
        return dict(BLOCK_D=SMALL_BLOCK_D, HKP=self.hkp, KP=KP, AP=self.ap, DOT_MODE=self.mode,
                    num_warps=SMALL_WARPS, num_stages=NUM_STAGES, maxnreg=MAX_REGISTERS, **const)

    def dims(self):
        """(K, H, dh, G): the runtime sizes of the per-image algebra kernels."""
        return self.k, self.h, self.dh, self.gh


def _chunks(b: int, t: int, block_t: int) -> Tuple[int, int]:
    """(n_chunks, chunk_blocks): each image's row blocks split into n_chunks programs."""
    blocks = triton.cdiv(t, block_t)
    n_chunks = max(1, min(blocks, TARGET_PROGRAMS // b))
    chunk_blocks = triton.cdiv(blocks, n_chunks)
    return triton.cdiv(blocks, chunk_blocks), chunk_blocks


def _f32(b: int, *shape: int, like: Tensor) -> Tensor:
    return torch.empty((b,) + shape, device=like.device, dtype=torch.float32)


@no_autocast
def _forward(z: Tensor, p: Tensor, w: Tensor, num_heads: int, head_dim: int, gate_hidden: int,
             mean_reduce: bool, return_attn: bool):
    """5 launches: per-image t2p algebra, pass 1, per-image p2t algebra, stats, update."""
    z, p = z.contiguous(), p.contiguous()
    L = _Layout(z, p, num_heads, head_dim, gate_hidden)
    b, t, d = L.b, L.t, L.d
    state = torch.empty(L.state_size, device=z.device, dtype=torch.float32)
    st = _carve(state, L.state_fields)
    inv_tokens = 1.0 / t if mean_reduce else 1.0
    _t2p_small_kernel[(b,)](p, w, st["mq"], st["cq"], st["k1"], st["g"], st["colsum"], d, *L.dims(),
                            L.scale, **L.small())
    s1 = _f32(b, L.t_pad, L.hkp, like=z)
    wk = _field(w, "p2t_k_w", d, L.a, gate_hidden)
    # 2-read forward: pass 1 also writes K2 = Z W'k^T in fp32 (else a placeholder the kernel ignores)
    k2 = _f32(b, t, L.key_cols, like=z) if L.key_cols else z
    _t2p_reduce_kernel[(b, L.n_chunks)](z, st["mq"], st["cq"], wk, s1, st["g"], st["colsum"], k2, t,
                                        d, L.k, L.h, L.a, L.chunk_blocks,
                                        **L.big(KEY_COLS=L.key_cols))
    p_tilde = torch.empty_like(p)
    _p2t_small_kernel[(b,)](p, z, w, st["g"], st["colsum"], p_tilde, st["pt32"], st["msg"], st["q2"],
                            st["v2"], st["pre"], st["alpha"], st["qexp"], st["mk"], st["nv"], t, d, *L.dims(),
                            L.key_cols, L.scale, inv_tokens, **L.small(GP=GP))
    # logits2 = K2 Qexp (2-read path: stats and update read K2 [T, KEY_COLS], not Z) or Z Mk
    logits_in, width = ((k2, st["qexp"]), L.key_cols) if L.key_cols else ((z, st["mk"]), d)
    mpart, lpart = _f32(2, b, L.ntb, L.hkp, like=z).unbind(0)
    _p2t_stats_kernel[(b, L.ntb)](*logits_in, mpart, lpart, t, width,
                                  **L.big(FROM_KEYS=bool(L.key_cols)))
    out = torch.empty_like(z)
    attn = torch.empty((b, L.h, L.k, t) if return_attn else (0,), device=z.device,
                       dtype=torch.float32)
    _p2t_update_kernel[(b, L.ntb)](z, *logits_in, mpart, lpart, st["m2"], st["l2"], st["nv"],
                                   _field(w, "p2t_o_b", d, L.a, gate_hidden), st["alpha"], out, attn,
                                   t, d, width, L.h * L.k, int(return_attn),
                                   **L.big(FROM_KEYS=bool(L.key_cols)))
    return out, p_tilde, attn, state


def _accumulator_fields(L: _Layout, n_weights: int) -> dict:
    """The backward's atomic accumulators, zeroed together in one buffer: pass A's E, F1, F2, G1,
    sum_t dY, delta; pass C's dMq and B's dcq; the flat weight gradient."""
    b, d, hkp = L.b, L.d, L.hkp
    # dw first (an output: storage offset 0), padded so that the rest starts 64-byte aligned
    return dict(dw=(n_weights,), pad=(-n_weights % 16,), e=(b, hkp, d), f1=(b, hkp, d),
                f2=(b, hkp, d), g1=(b, hkp, d), ysum=(b, d), delta=(b, hkp), dmq=(b, d, hkp),
                dcq=(b, hkp))


@no_autocast
def _backward(grad_out: Tensor, grad_p_tilde: Optional[Tensor], z: Tensor, p: Tensor, w: Tensor,
              state: Tensor, num_heads: int, head_dim: int, gate_hidden: int, mean_reduce: bool):
    """6 launches: zero the accumulators, pass A, p2t algebra backward, pass B (dZ), pass C,
    t2p algebra backward. -> dz [B,T,D], dp [B,K,D], dw [N] (fp32, the flat layout)."""
    z, y, p = z.contiguous(), grad_out.contiguous(), p.contiguous()
    L = _Layout(z, p, num_heads, head_dim, gate_hidden)
    b, t, d = L.b, L.t, L.d
    st = _carve(state, L.state_fields)
    fields = _accumulator_fields(L, w.numel())
    acc = _carve(torch.zeros(_carve_size(fields), device=z.device, dtype=torch.float32), fields)
    inv_tokens = 1.0 / t if mean_reduce else 1.0
    wk = _field(w, "p2t_k_w", d, L.a, gate_hidden)
    # Pass A: prompt->token reductions over (Z, dZ_out)
    s2 = _f32(b, L.t_pad, L.hkp, like=z)
    ws2 = torch.empty_like(s2)
    _p2t_grad_reduce_kernel[(b, L.n_chunks)](
        z, y, st["mk"], wk, st["qexp"], st["nv"], st["m2"], st["l2"], s2, ws2, acc["e"], acc["f1"],
        acc["f2"], acc["g1"], acc["ysum"], acc["delta"], t, d, L.a, L.chunk_blocks,
        **L.big(KEY_COLS=L.key_cols))
    dg, dpt = _f32(b, L.hkp, d, like=z), _f32(b, KP, d, like=z)
    dcolsum, dz0 = _f32(b, L.hkp, like=z), _f32(b, d, like=z)
    has_gpt = grad_p_tilde is not None
    gpt = grad_p_tilde.contiguous() if has_gpt else p  # placeholder when p_tilde got no gradient
    _p2t_small_grad_kernel[(b,)](
        z, w, gpt, int(has_gpt), acc["e"], acc["f1"], acc["f2"], acc["g1"], acc["delta"],
        acc["ysum"], st["g"], st["colsum"], st["pt32"], st["msg"], st["q2"], st["v2"], st["pre"],
        st["alpha"], dg, dcolsum, dz0, dpt, acc["dw"], t, d, *L.dims(), L.scale, inv_tokens,
        **L.small(GP=GP))
    # Pass B: dZ, and the token-side reductions of the token->prompt backward
    dz = torch.empty_like(z)
    dl1 = s2  # pass A's scratch is free again
    _grad_z_kernel[(b, triton.cdiv(t, DZ_BLOCK_T))](
        z, y, st["mq"], st["cq"], st["mk"], wk, st["qexp"], st["nv"], st["m2"], st["l2"],
        st["alpha"], acc["delta"], dg, dcolsum, dz0, dz, dl1, acc["dcq"], t, d, L.k, L.h, L.a,
        L.t_pad, **L.big(DZ_BLOCK_T, KEY_COLS=L.key_cols))
    _t2p_grad_reduce_kernel[(b, L.n_chunks)](z, dl1, acc["dmq"], t, d, L.t_pad, L.chunk_blocks,
                                             **L.big())
    dp = torch.empty_like(p)
    _t2p_small_grad_kernel[(b,)](p, w, acc["dmq"], acc["dcq"], st["k1"], dpt, dp, acc["dw"], d,
                                 *L.dims(), L.scale, **L.small())
    return dz, dp, acc["dw"]


# --------------------------------------------------------------------------------------------
# Custom ops + autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("avpt::pim_forward", mutates_args=())
def pim_forward_op(z: Tensor, p: Tensor, w: Tensor, num_heads: int, head_dim: int,
                   gate_hidden: int, mean_reduce: bool,
                   return_attn: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """z [B,T,D], p [B,K,D], w [N] fp32 (``pack_weights`` layout) -> z_out [B,T,D],
    p_tilde [B,K,D], attn [B,H,K,T] fp32 (or [0]), and the fp32 state [S] the backward reads."""
    return _forward(z, p, w, num_heads, head_dim, gate_hidden, mean_reduce, return_attn)


@pim_forward_op.register_fake
def _(z, p, w, num_heads, head_dim, gate_hidden, mean_reduce, return_attn):
    L = _Layout(z, p, num_heads, head_dim, gate_hidden)
    attn = z.new_empty((L.b, num_heads, L.k, L.t) if return_attn else (0,), dtype=torch.float32)
    return (torch.empty_like(z), torch.empty_like(p), attn,
            z.new_empty(L.state_size, dtype=torch.float32))


@torch.library.custom_op("avpt::pim_backward", mutates_args=())
def pim_backward_op(grad_out: Tensor, grad_p_tilde: Optional[Tensor], z: Tensor, p: Tensor,
                    w: Tensor, state: Tensor, num_heads: int, head_dim: int, gate_hidden: int,
                    mean_reduce: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """-> dz, dp, dw (fp32 [N]) of pim_forward_op."""
    return _backward(grad_out, grad_p_tilde, z, p, w, state, num_heads, head_dim, gate_hidden,
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
def _pick_backend(z: Tensor, p: Tensor, params: PIMParams, num_heads: int,
                  backend: Optional[str]) -> str:
    name = resolve("pim", z.device, backend, has_triton=HAS_TRITON)
    if name == "triton":
        reason = triton_unsupported_reason(z, p, params, num_heads)
        if reason is not None:
            if (backend if backend is not None else get_backend()) == "triton":
                raise ValueError(f"pim: backend='triton' does not support {reason}; "
                                 f"use backend='torch' or 'auto'")
            name = "torch"
    return name


def _fused(z: Tensor, p: Tensor, flat: Tensor, params: PIMParams, num_heads: int,
           t2p_reduce: str, return_attn: bool):
    a, gate_hidden = params.t2p_q_w.shape[0], params.gate_w1.shape[0]
    w = flat.float()  # the kernels read fp32 weights: a no-op for fp32 (master) weights
    z_out, p_tilde, attn, _ = pim_forward_op(z, p, w, num_heads, a // num_heads, gate_hidden,
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
    if _pick_backend(z, p, params, num_heads, backend) == "torch":
        return reference.pim(z, p, params, num_heads, t2p_reduce, return_attn)
    return _fused(z, p, pack_weights(params), params, num_heads, t2p_reduce, return_attn)


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
    params = unpack_weights(weights, d, num_heads * head_dim, gate_hidden)
    check_args(z, p, params, num_heads, t2p_reduce)
    if _pick_backend(z, p, params, num_heads, backend) == "torch":
        return reference.pim(z, p, params, num_heads, t2p_reduce, return_attn)
    return _fused(z, p, weights, params, num_heads, t2p_reduce, return_attn)


# --------------------------------------------------------------------------------------------
# Ahead-of-time configurations
# --------------------------------------------------------------------------------------------
def _layouts(dtype: torch.dtype) -> dict:
    """HKP -> the (AP, KEY_COLS) pairs (KEY_COLS 0: 3-read path) the launchers can pair with it
    for dtype, over every supported head count, prompt count, head width and D."""
    found = {}
    for h in range(1, MAX_COLUMNS[dtype] + 1):
        for k in range(1, min(MAX_PROMPTS, MAX_COLUMNS[dtype] // h) + 1):
            pairs = found.setdefault(num_columns(h, k), set())
            for dh in range(HEAD_WIDTHS[0], min(HEAD_WIDTHS[1], MAX_WIDTH // h) + 1):
                pairs.update({(AP, 0), (AP, key_columns(MAX_DIM, h * dh, dtype))})
    return {hkp: sorted(pairs) for hkp, pairs in sorted(found.items()) if pairs}


def aot_configs():
    """Every kernel configuration the launchers can select: HKP in {16, ..., MAX_COLUMNS} x input
    dtype, each with the (BLOCK_T, BLOCK_D, num_warps) that launch_config picks for it; for the
    kernels that build K2 = Z W'k^T every KEY_COLS that HKP can come with (0: 3-read path), and
    for the per-image algebra kernels every AP (and KEY_COLS) it can come with."""
    from .aot import KernelConfig

    configs = []
    for dtype, mode in _DOT_MODE.items():
        zp = "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        for hkp, pairs in _layouts(dtype).items():
            block_t, block_d, warps = launch_config(hkp, dtype)

            def add(fn, small=False, const=None, **sig):
                const = dict(const or {})
                if small:
                    const.update(BLOCK_D=SMALL_BLOCK_D, KP=KP)
                else:
                    const.update(BLOCK_T=DZ_BLOCK_T if fn is _grad_z_kernel else block_t,
                                 BLOCK_D=block_d)
                const.update(HKP=hkp, DOT_MODE=mode)
                types = {n: ("*fp32" if v == "f" else zp if v == "z" else v) for n, v in sig.items()}
                configs.append(KernelConfig(fn, {**types, **{c: "constexpr" for c in const}}, const,
                                            num_warps=SMALL_WARPS if small else warps,
                                            num_stages=NUM_STAGES, maxnreg=MAX_REGISTERS))

            for kc in sorted({kc for _, kc in pairs}):
                add(_t2p_reduce_kernel, z_ptr="z", mq_ptr="f", cq_ptr="f", wk_ptr="f",
                    s1_ptr="f", g_ptr="f", colsum_ptr="f", k2_ptr="f", T="i32", D="i32", K="i32",
                    H="i32", A="i32", chunk_blocks="i32", const=dict(KEY_COLS=kc))
                add(_p2t_grad_reduce_kernel, z_ptr="z", y_ptr="z", mk_ptr="f", wk_ptr="f",
                    qexp_ptr="f", nv_ptr="f", m2_ptr="f", l2_ptr="f", s2_ptr="f", ws2_ptr="f",
                    e_ptr="f", f1_ptr="f", f2_ptr="f", g1_ptr="f", ysum_ptr="f", delta_ptr="f",
                    T="i32", D="i32", A="i32", chunk_blocks="i32", const=dict(KEY_COLS=kc))
                add(_grad_z_kernel, z_ptr="z", y_ptr="z", mq_ptr="f", cq_ptr="f", mk_ptr="f",
                    wk_ptr="f", qexp_ptr="f", nv_ptr="f", m2_ptr="f", l2_ptr="f", alpha_ptr="f",
                    delta_ptr="f", dg_ptr="f", dcolsum_ptr="f", dz0_ptr="f", dz_ptr="z", dl1_ptr="f",
                    dcq_ptr="f", T="i32", D="i32", K="i32", H="i32", A="i32", t_pad="i32",
                    const=dict(KEY_COLS=kc))
            for from_keys in sorted({kc > 0 for _, kc in pairs}):
                # FROM_KEYS: logits2 from K2 (fp32) on the 2-read path, else from Z
                x_type = "f" if from_keys else "z"
                add(_p2t_stats_kernel, x_ptr=x_type, m_ptr="f", mpart_ptr="f",
                    lpart_ptr="f", T="i32", W="i32", const=dict(FROM_KEYS=from_keys))
                add(_p2t_update_kernel, z_ptr="z", x_ptr=x_type, m_ptr="f", mpart_ptr="f",
                    lpart_ptr="f", m2_ptr="f", l2_ptr="f", nv_ptr="f", bo_ptr="f", alpha_ptr="f",
                    out_ptr="z", attn_ptr="f", T="i32", D="i32", W="i32", HK="i32",
                    return_attn="i32", const=dict(FROM_KEYS=from_keys))
            add(_t2p_grad_reduce_kernel, z_ptr="z", dl1_ptr="f", dmq_ptr="f", T="i32", D="i32",
                t_pad="i32", chunk_blocks="i32")
            dims = dict(K="i32", H="i32", dh="i32", GH="i32", scale="fp32")
            for ap in (AP,):
                add(_t2p_small_kernel, True, p_ptr="z", w_ptr="f", mq_ptr="f", cq_ptr="f",
                    k1_ptr="f", g_ptr="f", colsum_ptr="f", D="i32", **dims, const=dict(AP=ap))
                add(_p2t_small_grad_kernel, True, z_ptr="z", w_ptr="f", gpt_ptr="z", has_gpt="i32",
                    e_ptr="f", f1_ptr="f", f2_ptr="f", g1_ptr="f", delta_ptr="f", ysum_ptr="f",
                    g_ptr="f", colsum_ptr="f", pt32_ptr="f", msg_ptr="f", q2_ptr="f", v2_ptr="f",
                    pre_ptr="f", alpha_ptr="f", dg_ptr="f", dcolsum_ptr="f", dz0_ptr="f",
                    dpt_ptr="f", dw_ptr="f", T="i32", D="i32", **dims, inv_tokens="fp32",
                    const=dict(AP=ap, GP=GP))
                add(_t2p_small_grad_kernel, True, p_ptr="z", w_ptr="f", dmq_ptr="f", dcq_ptr="f",
                    k1_ptr="f", dpt_ptr="f", dp_ptr="z", dw_ptr="f", D="i32", **dims, const=dict(AP=ap))
                add(_p2t_small_kernel, True, p_ptr="z", z_ptr="z", w_ptr="f", g_ptr="f",
                    colsum_ptr="f", p_tilde_ptr="z", pt32_ptr="f", msg_ptr="f", q2_ptr="f",
                    v2_ptr="f", pre_ptr="f", alpha_ptr="f", qexp_ptr="f", mk_ptr="f", nv_ptr="f", T="i32",
                    D="i32", K="i32", H="i32", dh="i32", GH="i32", key_cols="i32", scale="fp32",
                    inv_tokens="fp32", const=dict(AP=ap, GP=GP))
    return configs
