"""PIM launchers: the launch configuration of each pass (``Layout``: tiles, grids, buffers) and
``_forward`` / ``_backward`` (the launch sequences of the custom ops in ``op``). The sizes they
take: ``weights``; the traffic model: ``spec``."""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch
import triton
from torch import Tensor

from ..._autocast import no_autocast
from .backward import (_grad_o2_kernel, _grad_z_kernel, _p2t_attn_bwd_kernel, _prompt_bwd_kernel,
                       _prompt_wgrad_kernel, _reduce_kernel, _t2p_attn_bwd_kernel, _wgrad_kernel)
from .forward import (_output_kernel, _p2t_attn_kernel, _project_kernel, _prompt_kernel,
                      _t2p_attn_kernel)
from .weights import MAX_GATE_HIDDEN, field_offsets

# The gate's hidden units are padded to GP whatever G is (one compiled configuration fewer per
# kernel that reads them; the [rows, GP] tiles are small).
GP = MAX_GATE_HIDDEN
_DOT_MODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dot_mode(dtype: torch.dtype, device_type: str) -> int:
    if device_type == "cpu" and dtype != torch.float32:
        return {torch.bfloat16: 3, torch.float16: 4}[dtype]  # interpreter: see dots._mm
    return _DOT_MODE[dtype]


def _pow2(n: int) -> int:
    """n padded to a power of two >= 16 (a tensor-core tile side)."""
    return max(16, 1 << max(0, (int(n) - 1).bit_length()))


# --------------------------------------------------------------------------------------------
# Launch configuration: tile constexprs, num_warps and num_stages per kernel, chosen by the kernel
# model (``benchmarks/kernel_model.py``: fewest waves x serial iterations at the model shape, on
# the registers of the compile a launch there gets) among the tiles that compile without spills
# on sm_80 and sm_90a under Triton 3.6 and 3.8 in every dtype, generic and as launched (``make
# aot``). Every entry is compiled by ``configs.aot_configs``.
# --------------------------------------------------------------------------------------------
PROJ = dict(BM=32, BK=32, num_warps=4, num_stages=3)       # + BN = 64
OUTPUT = dict(BM=64, BN=64, BKA=32, num_warps=4, num_stages=2)  # BKA capped at AP
GRAD_Z = dict(BM=64, BN=32, BKA=32, num_warps=4, num_stages=3)
GRAD_O2 = dict(BM=16, BK=64, num_warps=4, num_stages=3)
WGRAD = dict(BNA=128, BNB=64, BR=64, num_warps=8, num_stages=2)
# fp32 inputs: the dW'o tiles' IEEE fp32 dots spill at 64-row blocks (Triton 3.6, sm_90a)
WGRAD_FP32 = dict(WGRAD, BR=32)
PROMPT = dict(BMP=16, BD=32, num_warps=8, num_stages=1)
PROMPT_WGRAD = dict(BD=32, BR=16, num_warps=4, num_stages=2)
# attention widths padded below 64: 4 warps spill a few bytes there (Triton 3.8, aligned compile)
PROMPT_WGRAD_NARROW = dict(PROMPT_WGRAD, num_warps=8)
# The per-(image, head) attention kernels: token blocks by padded head width, a [BT, DHP] fp32
# tile of 16K elements at most (T=197 in one block a pass at the model's head width 16); the
# prompt->token backward holds the most [KP, BT] tiles: smaller blocks, its loads pipelined (at
# head width 32 only 16-token blocks compile spill-free under both Tritons and both specs).
ATTN_BT = {16: 256, 32: 128, 64: 64}
ATTN_BWD_BT = {16: 128, 32: 16, 64: 32}
ATTN_WARPS = 8
REDUCE_BLOCK = 128
# Most row chunks of a weight gradient: the reduce kernel sums them as one [MAX_CHUNKS, BLOCK] tile
MAX_CHUNKS = 32
REDUCE_WARPS = 4
# sm_80 (A100) has no warpgroup MMA: its dots hold more registers, and several tiles above
# spill there. Ampere-class GPUs (compute capability < 9) take these instead (spill-free on
# sm_80 under Triton 3.6 and 3.8).
SM80 = dict(PROJ=dict(BM=32, BK=16, num_warps=8, num_stages=3),
            OUTPUT=dict(BM=32, BN=32, BKA=32, num_warps=8, num_stages=1),
            GRAD_Z=dict(BM=32, BN=32, BKA=32, num_warps=8, num_stages=1),
            GRAD_O2=dict(BM=16, BK=64, num_warps=8, num_stages=3),
            WGRAD=dict(BNA=64, BNB=64, BR=32, num_warps=8, num_stages=3),
            PROMPT_WGRAD=dict(BD=16, BR=16, num_warps=8, num_stages=1))
SM80["WGRAD_FP32"] = SM80["WGRAD"]
SM80["PROMPT_WGRAD_NARROW"] = SM80["PROMPT_WGRAD"]
# Programs the split-over-rows weight gradients aim for: two per SM of a 132-SM GPU.
TARGET_PROGRAMS = 264
SM_COUNT = 132


def _tiles(arch: int) -> dict:
    """The tile dicts for a GPU of compute capability ``arch`` (major * 10; read when a layout
    is built, so that ``benchmarks/pim_sweep`` can set the module's dicts)."""
    if arch < 90:
        return SM80
    return dict(PROJ=PROJ, OUTPUT=OUTPUT, GRAD_Z=GRAD_Z, GRAD_O2=GRAD_O2, WGRAD=WGRAD,
                WGRAD_FP32=WGRAD_FP32, PROMPT_WGRAD=PROMPT_WGRAD,
                PROMPT_WGRAD_NARROW=PROMPT_WGRAD_NARROW)


@functools.lru_cache(maxsize=16)
def _device_arch(index: Optional[int]) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _arch(device: torch.device) -> int:
    """Compute capability (major * 10 + minor) whose tiles a launch on ``device`` takes: the GPU's
    own; 90 elsewhere (the interpreter on CPU, fake tensors), the configuration ``make aot``
    checks as sm_90a."""
    if device.type != "cuda":
        return 90
    try:
        return _device_arch(device.index)
    except (RuntimeError, AssertionError, AttributeError):  # fake CUDA tensors without a GPU
        return 90


def _chunks(rows: int, tiles: int, block: int) -> Tuple[int, int]:
    """(n_chunks, chunk_rows) splitting ``rows`` for a weight gradient of ``tiles`` output tiles."""
    n = max(1, min(triton.cdiv(rows, block), triton.cdiv(TARGET_PROGRAMS, tiles), MAX_CHUNKS))
    chunk_rows = triton.cdiv(triton.cdiv(rows, n), block) * block
    return triton.cdiv(rows, chunk_rows), chunk_rows


def _Layout(z: Tensor, p: Tensor, num_heads: int, head_dim: int, gate_hidden: int) -> "Layout":
    """The ``Layout`` of a call on z [B,T,D], p [B,K,D] (memoised by sizes, dtype and device
    type: the same few layouts recur every layer and step, and building one costs host time)."""
    b, t, d = z.shape
    k = p.shape[1]
    if not all(type(n) is int for n in (b, t, d, k)):  # symbolic sizes (tracing): not hashable
        return Layout(b, t, d, k, num_heads, head_dim, gate_hidden, z.dtype, z.device.type,
                      _arch(z.device))
    # TARGET_PROGRAMS is part of the key: changing it (tests force chunk counts that way) is
    # never answered from the cache
    return _layout(b, t, d, k, num_heads, head_dim, gate_hidden, z.dtype, z.device.type,
                   _arch(z.device), TARGET_PROGRAMS)


@functools.lru_cache(maxsize=256)
def _layout(b, t, d, k, num_heads, head_dim, gate_hidden, dtype, device_type, arch,
            _target_programs) -> "Layout":
    return Layout(b, t, d, k, num_heads, head_dim, gate_hidden, dtype, device_type, arch)


class Layout:
    """Sizes, paddings, grids and buffer layouts of one call, shared by forward, backward and
    the fake impls (read-only: instances are shared through ``_layout``'s cache)."""

    def __init__(self, b: int, t: int, d: int, k: int, num_heads: int, head_dim: int,
                 gate_hidden: int, dtype: torch.dtype, device_type: str, arch: int = 90):
        self.b, self.t, self.d, self.k = b, t, d, k
        self.arch = arch
        self.tiles = tiles = _tiles(arch)
        self.h, self.dh, self.gh = num_heads, head_dim, gate_hidden
        self.a = a = num_heads * head_dim
        self.mz, self.mp = b * t, b * k
        self.kp, self.dhp, self.ap = _pow2(k), _pow2(head_dim), _pow2(a)
        self.gp = GP
        self.mode = _dot_mode(dtype, device_type)
        self.scale = 1.0 / math.sqrt(head_dim)
        self.off = field_offsets(d, a, gate_hidden)
        self.n_dtiles = triton.cdiv(d, PROMPT["BD"])
        # one 64-column tile width at every A (narrower A masked): the 32-column variants spill
        # (Triton 3.6), and A <= 32 is far below the model's projection cost anyway
        self.proj_bn = 64
        cdiv = triton.cdiv
        self.grid_proj = ((cdiv(self.mz, tiles["PROJ"]["BM"]) + cdiv(self.mp, tiles["PROJ"]["BM"]))
                          * cdiv(a, self.proj_bn),)
        self.grid_heads = (b, num_heads)
        self.grid_prompt = (cdiv(self.mp, PROMPT["BMP"]), self.n_dtiles)
        self.grid_output = (cdiv(self.mz, tiles["OUTPUT"]["BM"]), cdiv(d, tiles["OUTPUT"]["BN"]))
        self.grid_grad_z = (cdiv(self.mz, tiles["GRAD_Z"]["BM"]), cdiv(d, tiles["GRAD_Z"]["BN"]))
        self.grid_grad_o2 = (cdiv(self.mz, tiles["GRAD_O2"]["BM"]),)
        self.grid_prompt_wgrad = (cdiv(d, tiles["PROMPT_WGRAD"]["BD"]), 6)
        # weight gradients over the token rows: dWz = dx^T z [3A, D], dW'o = y^T (alpha o2) [D, A]
        self.wgrad = wg = tiles["WGRAD_FP32" if dtype == torch.float32 else "WGRAD"]
        self.wz_tiles = (cdiv(3 * a, wg["BNA"]), cdiv(d, wg["BNB"]))
        self.wo_tiles = (cdiv(d, wg["BNA"]), cdiv(a, wg["BNB"]))
        self.wz_chunks = _chunks(self.mz, math.prod(self.wz_tiles), wg["BR"])
        self.wo_chunks = _chunks(self.mz, math.prod(self.wo_tiles), wg["BR"])
        self.state_fields = dict(
            x=(self.mz, 3 * a), o2=(self.mz, a), k1=(self.mp, a), msg=(self.mp, a),
            pt32=(self.mp, d), qv2=(self.mp, 2 * a), pre=(b, self.gp), alpha=(b,))
        self.state_size = _carve_size(self.state_fields)
        self.part_fields = dict(part=(self.n_dtiles, self.mp, 2 * self.ap + 2 * self.gp))
        nz, no = self.wz_chunks[0], self.wo_chunks[0]
        self.grad_fields = dict(
            dx=(self.mz, 3 * a), do2=(self.mz, a), dalpha=(self.mz,), dqv2=(self.mp, 2 * a),
            dpt=(self.mp, d), dk1=(self.mp, a), dmsg_part=(self.n_dtiles, self.mp, self.ap),
            dz0=(b, d), dpre=(b, self.gp), dlogit=(b,),
            wz_part=(nz * (3 * a * d + 3 * a),), wo_part=(no * (d * a + d),))
        self.grad_size = _carve_size(self.grad_fields)

    def meta(self, kernel: str) -> dict:
        """Constexprs and launch options of ``kernel`` (a name in ``KERNELS``)."""
        heads = dict(BT=ATTN_BT[self.dhp], KP=self.kp, DHP=self.dhp, num_warps=ATTN_WARPS,
                     num_stages=1)
        # The token-row GEMMs run on tensor cores with split dots; the head and prompt-row
        # kernels (< 1% of the FLOPs) use IEEE fp32 dots: exact fp32, whatever the input dtype
        mode = self.mode if kernel in GEMM_KERNELS else 0
        return dict(DOT_MODE=mode, **{
            "project": dict(self.tiles["PROJ"], BN=self.proj_bn),
            "t2p_attn": heads,
            "prompt": dict(PROMPT, AP=self.ap, GP=self.gp),
            "p2t_attn": dict(heads, GP=self.gp),
            "output": dict(self.tiles["OUTPUT"], BKA=min(self.tiles["OUTPUT"]["BKA"], self.ap)),
            "grad_o2": dict(self.tiles["GRAD_O2"], AP=self.ap),
            "p2t_attn_bwd": dict(heads, BT=ATTN_BWD_BT[self.dhp], GP=self.gp, num_stages=2),
            "prompt_bwd": dict(PROMPT, AP=self.ap, GP=self.gp),
            "t2p_attn_bwd": heads,
            "grad_z": dict(self.tiles["GRAD_Z"], BKA=min(self.tiles["GRAD_Z"]["BKA"], self.ap)),
            "wgrad": dict(self.wgrad),
            "prompt_wgrad": dict(self.tiles["PROMPT_WGRAD_NARROW" if self.ap < 64 else
                                            "PROMPT_WGRAD"], AP=self.ap, GP=self.gp),
        }[kernel])

    def o(self, *names: str) -> List[int]:
        """Offsets of weight fields in the flat vector, in the order asked."""
        return [self.off[n] for n in names]


GEMM_KERNELS = ("project", "output", "grad_o2", "grad_z", "wgrad")
KERNELS = ("project", "t2p_attn", "prompt", "p2t_attn", "output", "grad_o2", "p2t_attn_bwd",
           "prompt_bwd", "t2p_attn_bwd", "grad_z", "wgrad", "prompt_wgrad")


def _carve_size(fields: dict) -> int:
    return sum(math.prod(s) for s in fields.values())


def _carve(buf: Tensor, fields: dict) -> dict:
    """Contiguous views of one flat buffer, one per field, in order (no gaps)."""
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


def _f32(n: int, like: Tensor) -> Tensor:
    return torch.empty(n, device=like.device, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Launch sequences
# --------------------------------------------------------------------------------------------
@no_autocast
def _forward(z: Tensor, p: Tensor, w: Tensor, num_heads: int, head_dim: int, gate_hidden: int,
             mean_reduce: bool, return_attn: bool):
    """5 launches: projection, token->prompt heads, prompt rows, prompt->token heads, output."""
    z, p = z.contiguous(), p.contiguous()
    L = _Layout(z, p, num_heads, head_dim, gate_hidden)
    b, t, d, a = L.b, L.t, L.d, L.a
    state = _f32(L.state_size, z)
    st = _carve(state, L.state_fields)
    part = _f32(_carve_size(L.part_fields), z)
    inv_tokens = 1.0 / t if mean_reduce else 1.0
    _project_kernel[L.grid_proj](
        z, p, w, st["x"], st["k1"], L.mz, L.mp, d, a,
        *L.o("t2p_q_w", "t2p_q_b", "t2p_v_w", "t2p_v_b", "p2t_k_w", "t2p_k_w", "t2p_k_b"),
        **L.meta("project"))
    _t2p_attn_kernel[L.grid_heads](st["x"], st["k1"], st["msg"], t, L.k, a, head_dim, L.scale,
                                   inv_tokens, **L.meta("t2p_attn"))
    p_tilde = torch.empty_like(p)
    _prompt_kernel[L.grid_prompt](
        p, z, w, st["msg"], p_tilde, st["pt32"], part, L.mp, t, L.k, d, a, gate_hidden,
        *L.o("t2p_o_w", "t2p_o_b", "p2t_q_w", "p2t_v_w", "gate_w1"), **L.meta("prompt"))
    attn = torch.empty((b, num_heads, L.k, t) if return_attn else (0,), device=z.device,
                       dtype=torch.float32)
    _p2t_attn_kernel[L.grid_heads](
        st["x"], part, w, st["qv2"], st["o2"], attn, st["pre"], st["alpha"], t, L.k,
        a, head_dim, gate_hidden, num_heads, L.mp, L.n_dtiles, L.ap,
        *L.o("p2t_q_b", "p2t_v_b", "gate_b1", "gate_w2", "gate_b2"), L.scale, int(return_attn),
        **L.meta("p2t_attn"))
    out = torch.empty_like(z)
    _output_kernel[L.grid_output](z, st["o2"], w, st["alpha"], out, L.mz, t, d, a,
                                  *L.o("p2t_o_w", "p2t_o_b"), **L.meta("output"))
    return out, p_tilde, attn, state


@no_autocast
def _backward(grad_out: Tensor, grad_p_tilde: Optional[Tensor], z: Tensor, p: Tensor, w: Tensor,
              state: Tensor, num_heads: int, head_dim: int, gate_hidden: int, mean_reduce: bool):
    """9 launches, no atomics, no zero-fill: dO2, prompt->token heads, prompt rows, token->prompt
    heads, dZ, dWz (chunks), dW'o (chunks), both chunk sums (one reduce), the prompt-row weight
    gradients and dP. -> dz [B,T,D], dp [B,K,D], dw [N] (fp32, the flat layout)."""
    z, y, p = z.contiguous(), grad_out.contiguous(), p.contiguous()
    L = _Layout(z, p, num_heads, head_dim, gate_hidden)
    b, t, d, a = L.b, L.t, L.d, L.a
    st = _carve(state, L.state_fields)
    g = _carve(_f32(L.grad_size, z), L.grad_fields)
    dw = _f32(w.numel(), z)
    inv_tokens = 1.0 / t if mean_reduce else 1.0
    _grad_o2_kernel[L.grid_grad_o2](y, st["o2"], w, st["alpha"], g["do2"], g["dalpha"], L.mz, t, d,
                                    a, *L.o("p2t_o_w", "p2t_o_b"), **L.meta("grad_o2"))
    _p2t_attn_bwd_kernel[L.grid_heads](
        st["x"], st["qv2"], g["do2"], g["dalpha"], st["alpha"], st["pre"], w, g["dx"], g["dqv2"],
        g["dpre"], g["dlogit"], t, L.k, a, head_dim, gate_hidden, L.off["gate_w2"], L.scale,
        **L.meta("p2t_attn_bwd"))
    has_gpt = grad_p_tilde is not None
    gpt = grad_p_tilde.contiguous() if has_gpt else p  # placeholder when p_tilde got no gradient
    _prompt_bwd_kernel[L.grid_prompt](
        gpt, int(has_gpt), g["dqv2"], g["dpre"], w, g["dpt"], g["dz0"], g["dmsg_part"], L.mp, L.k,
        d, a, gate_hidden, *L.o("p2t_q_w", "p2t_v_w", "gate_w1", "t2p_o_w"),
        **L.meta("prompt_bwd"))
    _t2p_attn_bwd_kernel[L.grid_heads](
        st["x"], st["k1"], g["dmsg_part"], g["dx"], g["dk1"], t, L.k, a, head_dim, L.mp,
        L.n_dtiles, L.ap, L.scale, inv_tokens, **L.meta("t2p_attn_bwd"))
    dz = torch.empty_like(z)
    _grad_z_kernel[L.grid_grad_z](y, g["dx"], w, g["dz0"], dz, L.mz, t, d, a,
                                  *L.o("t2p_q_w", "t2p_v_w", "p2t_k_w"), **L.meta("grad_z"))
    # dWz = dx^T z [3A, D] -> t2p q, t2p v, p2t k (its bias gradient is zero: b'k drops out)
    nz, rows_z = L.wz_chunks
    _wgrad_kernel[L.wz_tiles + (nz,)](
        g["dx"], z, st["alpha"], g["wz_part"], L.mz, 3 * a, d, 3 * a, d, t, rows_z,
        HAS_SCALE=False, EXACT=2, **L.meta("wgrad"))
    # dW'o = y^T (alpha o2) [D, A], db'o = y^T alpha
    no, rows_o = L.wo_chunks
    _wgrad_kernel[L.wo_tiles + (no,)](
        y, st["o2"], st["alpha"], g["wo_part"], L.mz, d, a, d, a, t, rows_o,
        HAS_SCALE=True, EXACT=1, **L.meta("wgrad"))
    # both summed over their chunks, in order, into the flat gradient
    wz_blocks = triton.cdiv(3 * a * d + 3 * a, REDUCE_BLOCK)
    _reduce_kernel[(wz_blocks + triton.cdiv(d * a + d, REDUCE_BLOCK),)](
        dw, g["wz_part"], nz, 3 * a, d, a, *L.o("t2p_q_w", "t2p_v_w", "p2t_k_w"),
        *L.o("t2p_q_b", "t2p_v_b", "p2t_k_b"), wz_blocks, g["wo_part"], no,
        *L.o("p2t_o_w", "p2t_o_b"), BLOCK=REDUCE_BLOCK, CHUNKS=MAX_CHUNKS, num_warps=REDUCE_WARPS,
        num_stages=1)
    dp = torch.empty_like(p)
    _prompt_wgrad_kernel[L.grid_prompt_wgrad](
        p, z, w, st["msg"], st["pt32"], g["dpt"], g["dqv2"], g["dk1"], g["dpre"], g["dlogit"],
        st["pre"], dw, dp, b, L.mp, t, L.k, d, a, gate_hidden,
        *L.o("t2p_k_w", "t2p_k_b", "t2p_o_w", "t2p_o_b", "p2t_q_w", "p2t_q_b", "p2t_v_w",
             "p2t_v_b", "gate_w1", "gate_b1", "gate_w2", "gate_b2"),
        **L.meta("prompt_wgrad"))
    return dz, dp, dw

