"""PIM's ahead-of-time list: every kernel configuration the launchers can select (checked for
compile errors and spills by ``avpt_kernels.aot``). Signatures come from the kernels' own
parameter lists (``kernel_config.signature``); the constexprs and launch options from
``Layout.meta``, the launchers' own source, over every padded size the limits allow."""
from __future__ import annotations

import torch

from . import backward, forward
from ..kernel_config import KernelConfig, signature, tl_type, with_aligned
from .launch import _DOT_MODE, KERNELS, MAX_CHUNKS, REDUCE_BLOCK, REDUCE_WARPS, Layout, _pow2
from .weights import HEAD_WIDTHS, MAX_WIDTH

# Pointer parameters in the input dtype (all others are fp32 state, scratch or weights)
_INPUT_POINTERS = ("z_ptr", "y_ptr", "p_ptr", "out_ptr", "dz_ptr", "dp_ptr", "gpt_ptr", "p_tilde_ptr")
_FLOATS = ("scale", "inv_tokens")
# The wgrad kernel's two uses: dWz = dx^T z (z exact: EXACT=2, b_ptr in the input dtype) and
# dW'o = y^T (alpha o2) (y exact: EXACT=1, a_ptr in the input dtype)
_WGRAD_USES = ((dict(HAS_SCALE=False, EXACT=2), "b_ptr"), (dict(HAS_SCALE=True, EXACT=1), "a_ptr"))


def _kernel(name: str):
    return getattr(forward, f"_{name}_kernel", None) or getattr(backward, f"_{name}_kernel")


def _layouts():
    """One Layout per distinct padded (head width, attention width) pair the limits allow, at a
    nominal size (the constexprs depend on the paddings only)."""
    seen = {}
    for dh in range(HEAD_WIDTHS[0], HEAD_WIDTHS[1] + 1):
        for h in range(1, MAX_WIDTH // dh + 1):
            seen.setdefault((_pow2(dh), _pow2(h * dh)), (h, dh))
    return list(seen.values())


# The GPU targets ``make aot`` compiles for, by the compute capability whose tiles they take
_ARCH_TARGETS = {80: "sm_80", 90: "sm_90a"}


def aot_configs():
    """Every (kernel, dtype, constexprs, warps, stages) the launchers can select, each for the
    targets whose tiles select it (``launch._tiles``: sm_80 has its own)."""
    found = {}  # key -> [fn, meta, pointers, warps, stages, targets], in first-seen order

    def add(fn, meta, pointers, target=None):
        meta = dict(meta)
        warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
        key = (fn, tuple(sorted(meta.items())), tuple(sorted(pointers.items())), warps, stages)
        entry = found.setdefault(key, [fn, meta, pointers, warps, stages, []])
        if target is not None and target not in entry[5]:
            entry[5].append(target)

    for arch, target in _ARCH_TARGETS.items():
        for dtype in _DOT_MODE:
            ptr = "*" + tl_type(dtype)
            inputs = {n: ptr for n in _INPUT_POINTERS}
            for h, dh in _layouts():
                L = Layout(2, 17, 64, 6, h, dh, 16, dtype, "cuda", arch)
                for name in KERNELS:
                    if name == "wgrad":
                        for const, exact_ptr in _WGRAD_USES:
                            add(_kernel(name), dict(L.meta(name), **const), {exact_ptr: ptr}, target)
                    else:
                        add(_kernel(name), L.meta(name), inputs, target)
    add(backward._reduce_kernel, dict(BLOCK=REDUCE_BLOCK, CHUNKS=MAX_CHUNKS, num_warps=REDUCE_WARPS,
                                     num_stages=1), {})
    return with_aligned([
        KernelConfig(fn, signature(fn, pointers, _FLOATS), meta, num_warps=warps,
                     num_stages=stages, targets=tuple(targets)
                     if 0 < len(targets) < len(_ARCH_TARGETS) else None)
        for fn, meta, pointers, warps, stages, targets in found.values()],
        MODEL_SHAPE_ODD, MODEL_SHAPE_ONES)


# Int parameters that are not multiples of 16 at the model's shape (ViT-B/16 at B=32: T=197,
# K=6, H=4, 24 prompt D tiles, the reduce's chunk and block counts), and those equal to 1 there
# (p_tilde has a gradient): ``kernel_config.aligned``.
MODEL_SHAPE_ODD = ("T", "K", "H", "n_dtiles", "wz_chunks", "wz_blocks", "wo_chunks")
MODEL_SHAPE_ONES = ("has_gpt",)
