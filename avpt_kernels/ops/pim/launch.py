"""PIM launchers: the limits of the Triton path, launch configuration, the traffic model, the
packed weight layout, and ``_forward`` / ``_backward`` (the launch sequences described in
``avpt_kernels.ops.pim``)."""
from __future__ import annotations

import functools
import math
import warnings
from typing import List, Optional, Tuple

import torch
import triton
from torch import Tensor

from ..._autocast import no_autocast
from ...reference import PIMParams
from .algebra import _p2t_small_grad_kernel, _p2t_small_kernel, _t2p_small_grad_kernel, _t2p_small_kernel
from .kernels import (_grad_z_kernel, _p2t_grad_reduce_kernel, _p2t_stats_kernel, _p2t_update_kernel,
                      _t2p_grad_reduce_kernel, _t2p_reduce_kernel)

MAX_DIM = 1024
MAX_PROMPTS = 16
HEAD_WIDTHS = (8, 64)
# Attention width A = H * head width and gate hidden units G the per-image algebra kernels take
# (their [HKP, A] and [G, BLOCK_D] fp32 tiles; wider goes to the torch path).
MAX_WIDTH = 64
MAX_GATE_HIDDEN = 64
# Most (head, prompt) columns H*K: at 64 the per-image backward kernel (algebra) spills in
# the 16-bit dtypes (AOT, Triton 3.8), so the Triton path takes H*K <= 32.
MAX_COLUMNS = {torch.float32: 32, torch.float16: 32, torch.bfloat16: 32}
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DOT_MODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dot_mode(dtype: torch.dtype, device_type: str) -> int:
    if device_type == "cpu" and dtype != torch.float32:
        return {torch.bfloat16: 3, torch.float16: 4}[dtype]  # interpreter: see _mm
    return _DOT_MODE[dtype]


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
    if d % 16 or d > MAX_DIM:
        return f"D={d} (the kernels need D a multiple of 16, at most {MAX_DIM})"
    if k > MAX_PROMPTS:
        return f"K={k} prompts (the kernels take 1 to {MAX_PROMPTS})"
    if not HEAD_WIDTHS[0] <= head_dim <= HEAD_WIDTHS[1]:
        return f"head width {head_dim} (the kernels take {HEAD_WIDTHS[0]} to {HEAD_WIDTHS[1]})"
    if num_heads * k > MAX_COLUMNS[dtype]:
        return (f"num_heads={num_heads} with K={k} ({num_heads * k} head-prompt columns, the "
                f"{dtype} kernels take at most {MAX_COLUMNS[dtype]})")
    if a > MAX_WIDTH:
        return f"attention width A={a} (num_heads * head width; the kernels take at most {MAX_WIDTH})"
    if gate_hidden > MAX_GATE_HIDDEN:
        return (f"gate hidden width {gate_hidden} (the kernels take at most "
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
# Packed weights: one flat vector per layer, in PIMParams order
# --------------------------------------------------------------------------------------------
def weight_shapes(d: int, a: int, gate_hidden: int) -> List[Tuple[int, ...]]:
    """Shapes of the PIMParams fields in order: the flat layout of ``pack_weights``, which the
    kernels address through ``algebra._w``."""
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
    return flat.narrow(0, *_field_span(name, d, a, gate_hidden))


@functools.lru_cache(maxsize=None)
def _field_span(name: str, d: int, a: int, gate_hidden: int) -> Tuple[int, int]:
    """(offset, numel) of one field in the flat layout."""
    shapes = weight_shapes(d, a, gate_hidden)
    i = PIMParams._fields.index(name)
    return sum(math.prod(s) for s in shapes[:i]), math.prod(shapes[i])

# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
# Programs to aim for in the reduction kernels: a few waves on a 132-SM GPU. Fewer programs mean
# fewer fp32 atomic adds of [HKP, D] partials (one per program and D block); more programs mean
# more parallelism for small batches.
TARGET_PROGRAMS = 512
# The per-image algebra kernels (algebra): prompts padded to KP rows, the gate hidden layer
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
    base = buf.storage_offset()  # one as_strided per field: a third of narrow + view's host time
    return {name: buf.as_strided(shape, stride, base + offset)
            for name, offset, shape, stride in _carve_plan(tuple(fields.items()))}


@functools.lru_cache(maxsize=256)
def _carve_plan(fields: Tuple[Tuple[str, Tuple[int, ...]], ...]) -> List[Tuple[str, int, tuple, tuple]]:
    """(name, offset, shape, contiguous strides) of each field, in order."""
    plan, offset = [], 0
    for name, shape in fields:
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        plan.append((name, offset, shape, stride))
        offset += math.prod(shape)
    return plan


def _Layout(z: Tensor, p: Tensor, num_heads: int, head_dim: int, gate_hidden: int) -> "Layout":
    """The ``Layout`` of a call on z [B,T,D], p [B,K,D] (memoised by sizes, dtype and device
    type: the same few layouts recur every layer and step, and building one costs host time)."""
    b, t, d = z.shape
    k = p.shape[1]
    if not all(type(n) is int for n in (b, t, d, k)):  # symbolic sizes (tracing): not hashable
        return Layout(b, t, d, k, num_heads, head_dim, gate_hidden, z.dtype, z.device.type)
    # the module-level choices a layout reads are part of the key, so that changing them (tests
    # force paths and chunk counts that way) is never answered from the cache
    return _layout(b, t, d, k, num_heads, head_dim, gate_hidden, z.dtype, z.device.type,
                   TARGET_PROGRAMS, key_columns)


@functools.lru_cache(maxsize=256)
def _layout(b, t, d, k, num_heads, head_dim, gate_hidden, dtype, device_type, _target_programs,
            _key_columns) -> "Layout":
    return Layout(b, t, d, k, num_heads, head_dim, gate_hidden, dtype, device_type)


class Layout:
    """Sizes and launch choices of one call, shared by forward, backward and the fake impls
    (read-only: instances are shared through ``_layout``'s cache)."""

    def __init__(self, b: int, t: int, d: int, k: int, num_heads: int, head_dim: int,
                 gate_hidden: int, dtype: torch.dtype, device_type: str):
        self.b, self.t, self.d = b, t, d
        self.k, self.h, self.dh, self.gh = k, num_heads, head_dim, gate_hidden
        self.a = num_heads * head_dim
        self.hkp = num_columns(num_heads, self.k)
        self.ap = AP
        self.block_t, self.block_d, self.warps = launch_config(self.hkp, dtype)
        self.ntb = triton.cdiv(self.t, self.block_t)
        self.n_chunks, self.chunk_blocks = _chunks(self.b, self.t, self.block_t)
        self.t_pad = self.n_chunks * self.chunk_blocks * self.block_t
        self.key_cols = key_columns(self.d, self.a, dtype)
        self.mode = _dot_mode(dtype, device_type)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.state_fields = _state_fields(self.b, self.d, self.hkp, self.ap, self.key_cols)
        self.state_size = _carve_size(self.state_fields)
        self._big = dict(BLOCK_D=self.block_d, HKP=self.hkp, DOT_MODE=self.mode,
                         num_warps=self.warps, num_stages=NUM_STAGES, maxnreg=MAX_REGISTERS)
        self._small = dict(BLOCK_D=SMALL_BLOCK_D, HKP=self.hkp, KP=KP, AP=self.ap,
                           DOT_MODE=self.mode, num_warps=SMALL_WARPS, num_stages=NUM_STAGES,
                           maxnreg=MAX_REGISTERS)

    def big(self, block_t: Optional[int] = None, **const):
        """Launch options of the token kernels."""
        return dict(self._big, BLOCK_T=block_t or self.block_t, **const)

    def small(self, **const):
        """Launch options of the per-image algebra kernels."""
        return dict(self._small, **const)

    def dims(self):
        """(K, H, dh, G): the runtime sizes of the per-image algebra kernels."""
        return self.k, self.h, self.dh, self.gh


def _chunks(b: int, t: int, block_t: int) -> Tuple[int, int]:
    """(n_chunks, chunk_blocks): each image's row blocks split into n_chunks programs."""
    blocks = triton.cdiv(t, block_t)
    n_chunks = max(1, min(blocks, TARGET_PROGRAMS // b))
    chunk_blocks = triton.cdiv(blocks, n_chunks)
    return triton.cdiv(blocks, chunk_blocks), chunk_blocks


def alert_not_deterministic(op: str, device: torch.device) -> None:
    """The GPU kernels sum fp32 partials with atomic adds (in an order that varies run to run),
    so on CUDA they are not bit-reproducible. Under ``torch.use_deterministic_algorithms(True)``
    this warns (``warn_only=True``, the trainer's setting) or raises, as torch's own such ops do.
    The interpreter (CPU) runs programs in order: deterministic there."""
    if device.type != "cuda" or not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"avpt::{op} adds fp32 partial sums with atomic adds on the GPU, so its results "
               f"can differ run to run at fp32 rounding level, while "
               f"torch.use_deterministic_algorithms(True) is set; use backend='torch' for "
               f"bit-reproducible runs")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


def _f32(b: int, *shape: int, like: Tensor) -> Tensor:
    return torch.empty((b,) + shape, device=like.device, dtype=torch.float32)


@no_autocast
def _forward(z: Tensor, p: Tensor, w: Tensor, num_heads: int, head_dim: int, gate_hidden: int,
             mean_reduce: bool, return_attn: bool):
    """5 launches: per-image t2p algebra, pass 1, per-image p2t algebra, stats, update."""
    z, p = z.contiguous(), p.contiguous()
    L = _Layout(z, p, num_heads, head_dim, gate_hidden)
    if L.n_chunks > 1:  # several programs add partials of one image's G, colsum
        alert_not_deterministic("pim_forward", z.device)
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


def _accumulator_fields(L: Layout, n_weights: int) -> dict:
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
    alert_not_deterministic("pim_backward", z.device)  # the weight gradient: B programs add
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

