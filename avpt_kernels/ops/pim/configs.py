"""PIM's ahead-of-time list: every kernel configuration the launchers can select (checked for
compile errors and spills by ``avpt_kernels.aot``). Signatures come from the kernels' own
parameter lists (``aot.signature``); only the pointer dtypes and constexpr values are chosen here."""
from __future__ import annotations

import torch

from .algebra import _p2t_small_grad_kernel, _p2t_small_kernel, _t2p_small_grad_kernel, _t2p_small_kernel
from .kernels import (_grad_z_kernel, _p2t_grad_reduce_kernel, _p2t_stats_kernel, _p2t_update_kernel,
                      _t2p_grad_reduce_kernel, _t2p_reduce_kernel)
from .launch import (_DOT_MODE, AP, DZ_BLOCK_T, GP, HEAD_WIDTHS, KP, MAX_COLUMNS, MAX_DIM,
                     MAX_PROMPTS, MAX_REGISTERS, MAX_WIDTH, NUM_STAGES, SMALL_BLOCK_D, SMALL_WARPS,
                     key_columns, launch_config, num_columns)

# Pointer parameters in the input dtype (all others are fp32 scratch, state or weights)
_INPUT_POINTERS = ("z_ptr", "y_ptr", "p_ptr", "out_ptr", "dz_ptr", "dp_ptr", "gpt_ptr", "p_tilde_ptr")
_FLOATS = ("scale", "inv_tokens")


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
    from ...aot import KernelConfig, signature, tl_type

    configs = []
    for dtype, mode in _DOT_MODE.items():
        ptr = "*" + tl_type(dtype)
        for hkp, pairs in _layouts(dtype).items():
            block_t, block_d, warps = launch_config(hkp, dtype)

            def add(fn, small=False, inputs=_INPUT_POINTERS, **const):
                if small:
                    const.update(BLOCK_D=SMALL_BLOCK_D, KP=KP, AP=AP)
                else:
                    const.update(BLOCK_T=DZ_BLOCK_T if fn is _grad_z_kernel else block_t,
                                 BLOCK_D=block_d)
                const.update(HKP=hkp, DOT_MODE=mode)
                sig = signature(fn, {n: ptr for n in inputs}, _FLOATS)
                if "GP" in sig:
                    const.update(GP=GP)
                configs.append(KernelConfig(fn, sig, const,
                                            num_warps=SMALL_WARPS if small else warps,
                                            num_stages=NUM_STAGES, maxnreg=MAX_REGISTERS))

            for kc in sorted({kc for _, kc in pairs}):
                for fn in (_t2p_reduce_kernel, _p2t_grad_reduce_kernel, _grad_z_kernel):
                    add(fn, KEY_COLS=kc)
            for from_keys in sorted({kc > 0 for _, kc in pairs}):
                # FROM_KEYS: logits2 from K2 (fp32) on the 2-read path, else from Z (x_ptr)
                inputs = _INPUT_POINTERS + (() if from_keys else ("x_ptr",))
                for fn in (_p2t_stats_kernel, _p2t_update_kernel):
                    add(fn, inputs=inputs, FROM_KEYS=from_keys)
            add(_t2p_grad_reduce_kernel)
            for fn in (_t2p_small_kernel, _p2t_small_grad_kernel, _t2p_small_grad_kernel,
                       _p2t_small_kernel):
                add(fn, small=True)
    return configs
