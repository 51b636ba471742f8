"""Shared test helpers: one tolerance table for every backend comparison and a verbose
``assert_close`` that says where and by how much two tensors differ.

Tolerances: an element passes when ``|actual - expected| <= atol * max|expected| + rtol * |expected|``.
The absolute part is scaled by the largest magnitude of the expected tensor, so one table serves
outputs and gradients of any scale; low-precision rows cover rounding of the inputs, of the
intermediates a kernel keeps in that dtype, and of the output.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    """(atol, rtol) for results computed from inputs of ``dtype``."""
    return TOLERANCES[dtype]


def assert_close(actual: Tensor, expected: Tensor, dtype: Optional[torch.dtype] = None,
                 name: str = "tensor", scale: Optional[float] = None) -> None:
    """Compare ``actual`` with ``expected`` under the tolerance of ``dtype`` (default: the
    dtype of ``actual``); on failure report the worst element, its index and the mismatch count.
    The absolute tolerance is relative to max|expected|, or to ``scale`` where the caller knows
    the size of the terms that cancel into ``expected`` (say why at the call)."""
    atol, rtol = tolerance(dtype or actual.dtype)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if not torch.isfinite(a).all():
        first = tuple(int(i) for i in (~torch.isfinite(a)).nonzero()[0])
        raise AssertionError(f"{name}: {int((~torch.isfinite(a)).sum())}/{a.numel()} non-finite "
                             f"value(s), the first at {first}: {a[first].item()} (expected "
                             f"{e[first].item():.6g})")
    if scale is None:
        scale = float(e.abs().max()) if e.numel() else 0.0
    scale = float(scale)
    err = (a - e).abs()
    bound = atol * scale + rtol * e.abs()
    bad = err > bound
    if bad.any():
        worst = int(torch.argmax(err - bound))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape))
        nonzero = e != 0
        rel = float((err[nonzero] / e[nonzero].abs()).max()) if nonzero.any() else float("nan")
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{e.numel()} elements off (atol={atol} x max|expected|="
            f"{scale:.3g}, rtol={rtol}); worst at {idx}: actual {a[idx].item():.6g}, expected "
            f"{e[idx].item():.6g}, |diff| {err[idx].item():.3g}; max |diff| {float(err.max()):.3g}"
            f" ({float(err.max()) / scale if scale > 0 else float('inf'):.3g} x max|expected|); "
            f"max |diff|/|expected| {rel:.3g} (over expected != 0)")


# The key biases of both PIM attentions add the same q.b to every logit along the softmax axis,
# so their gradients are exactly zero; both sides only hold rounding noise there, which is
# checked against the scale of the matching key weight's gradient instead.
ZERO_GRAD_PARAMS = {"t2p_k_b": "t2p_k_w", "p2t_k_b": "p2t_k_w"}


def assert_grads_close(names, actual, expected, dtype: Optional[torch.dtype] = None,
                       prefix: str = "grad ") -> None:
    """``assert_close`` over named gradient lists; structurally zero PIM gradients
    (``ZERO_GRAD_PARAMS``) must be below ``atol`` x the scale of their weight's gradient."""
    lookup = dict(zip(names, expected))
    for name, a, e in zip(names, actual, expected):
        if name in ZERO_GRAD_PARAMS:
            atol, _ = tolerance(dtype or a.dtype)
            ref_scale = float(lookup[ZERO_GRAD_PARAMS[name]].abs().max())
            worst = float(a.detach().abs().max())
            if not worst <= atol * ref_scale:
                raise AssertionError(f"{prefix}{name}: should be zero (softmax shift invariance), "
                                     f"max |value| {worst:.3g} > {atol} x {ref_scale:.3g}")
        else:
            assert_close(a, e, dtype=dtype, name=prefix + name)


def emulate_gpu_bf16_rounding() -> bool:
    """Make the Triton interpreter round fp32 -> bf16 to nearest-even, as compiled GPU code does.

    The interpreter (Triton 3.6-3.8) converts fp32 -> bf16 by truncating the mantissa. That error
    is biased (always towards zero), so it accumulates coherently in every reduction over tokens
    and roughly doubles any bf16 error measured under the interpreter; it can hide or fake a
    precision bug. This patches the interpreter's cast to torch's round-to-nearest-even
    conversion. Returns False when the interpreter's internals are not the expected ones (then
    bf16 results under the interpreter carry truncation error). Test harness only."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or getattr(original, "_avpt_rne", False):
        return original is not None

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.ascontiguousarray(src.data, dtype=np.float32)
            rounded = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy()
            return interpreter.TensorHandle(rounded.view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._avpt_rne = True
    builder.cast_impl = cast_impl
    return True


# ---- The bounded-error rule (flash-attention's): on the same 16-bit inputs, the fused backend's
# ---- error against the fp64 truth is at most BOUND_FACTOR x the torch backend's error in that
# ---- dtype, per tensor, for outputs and every gradient.
BOUND_FACTOR = 2.0
# Unit roundoff of each dtype (half an ulp at 1.0): the error of merely storing a result in that
# dtype. It floors the torch backend's error in the rule, for tensors the torch backend happens
# to get (nearly) exact.
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}
# The floor of an fp32 result of a 16-bit run (the fp32 master weights' gradients under 16-bit
# tokens) on well-conditioned inputs: 2^-20, 16 fp32 ulps. A 16-bit operand where a split one is
# needed errs by ~2^-9 (bf16) or 2^-11 (fp16), 2^9..2^11 times above it. On ill-conditioned
# inputs (softmax logits in the hundreds or thousands, images 1e4 apart) two correct fp32
# algorithms, torch's summation order and a fused kernel's reassociated one, differ by 2-10x at
# the 1e-6..1e-4 level by rounding luck (measured on the PIM, also with every dot IEEE fp32):
# there the caller passes ``fp32_floor=None`` and fp32 results are judged like the 16-bit ones.
FP32_RESULT_FLOOR = 2.0 ** -20


def relative_error(actual: Tensor, truth: Tensor, scale: Optional[float] = None) -> float:
    """max |actual - truth| / scale (default max |truth|); inf when ``actual`` has an inf/NaN
    where ``truth`` is finite."""
    a = actual.detach().to(torch.float64).cpu()
    t = truth.detach().to(torch.float64).cpu()
    if a.shape != t.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(t.shape)}")
    if not torch.isfinite(a[torch.isfinite(t)]).all():
        return float("inf")
    if scale is None:
        scale = float(t.abs().max()) if t.numel() else 0.0
    diff = float((a - t).abs().max()) if a.numel() else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def assert_bounded_error(fused: Dict[str, Tensor], torch_backend: Dict[str, Tensor],
                         truth: Dict[str, Tensor], dtype: torch.dtype,
                         zero_scale: Optional[Dict[str, str]] = None, label: str = "",
                         fp32_floor: Optional[float] = FP32_RESULT_FLOOR) -> None:
    """The bounded-error rule for named tensors (outputs and gradients) of one op on the same
    ``dtype`` inputs: ``err(fused) <= BOUND_FACTOR * max(err(torch), UNIT_ROUNDOFF[dtype])`` with
    ``err(x) = max|x - truth| / max|truth|``, and never inf/NaN where the truth is finite; an
    fp32 tensor of a 16-bit run (fp32 master weights' gradients) is floored at ``fp32_floor``
    instead (``FP32_RESULT_FLOOR`` by default: fp32 level; None: the dtype's unit roundoff).
    ``zero_scale`` maps a tensor whose truth is exactly zero (a structurally zero gradient) to the
    tensor whose scale judges it. Reports every tensor that breaks the rule, not just the first."""
    zero_scale = zero_scale or {}
    bad = []
    for name, t in truth.items():
        floor = UNIT_ROUNDOFF[dtype]
        scale = float(truth[zero_scale[name]].detach().abs().max()) if name in zero_scale else None
        if fused[name].dtype == torch.float32 and dtype != torch.float32 and fp32_floor:
            floor = fp32_floor  # an fp32 result (master-weight gradient): see above
        e_fused = relative_error(fused[name], t, scale)
        e_torch = relative_error(torch_backend[name], t, scale)
        bound = BOUND_FACTOR * max(e_torch, floor)
        if not e_fused <= bound:
            bad.append(f"{name}: fused {e_fused:.3g} > {BOUND_FACTOR:g} x max(torch {e_torch:.3g}, "
                       f"u {floor:.3g})")
    if bad:
        raise AssertionError(f"{label}{' ' if label else ''}bounded-error rule ({dtype}) broken: "
                             + "; ".join(bad))
