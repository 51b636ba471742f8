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
                 name: str = "tensor") -> None:
    """Compare ``actual`` with ``expected`` under the tolerance of ``dtype`` (default: the
    dtype of ``actual``); on failure report the worst element, its index and the mismatch count."""
    atol, rtol = tolerance(dtype or actual.dtype)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: {int((~torch.isfinite(a)).sum())} non-finite value(s)")
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = (a - e).abs()
    bound = atol * scale + rtol * e.abs()
    bad = err > bound
    if bad.any():
        worst = int(torch.argmax(err - bound))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{e.numel()} elements off (atol={atol} x max|expected|="
            f"{scale:.3g}, rtol={rtol}); worst at {idx}: actual {a[idx].item():.6g}, expected "
            f"{e[idx].item():.6g}, |diff| {err[idx].item():.3g}; max |diff| {float(err.max()):.3g}")


def random_pim_params(dim: int, width: int, gate_hidden: int, dtype=torch.float32,
                      device="cpu", requires_grad: bool = True,
                      generator: Optional[torch.Generator] = None):
    """PIMParams with weights ~ N(0, 1/fan_in) and biases ~ N(0, 0.1^2): attention logits of
    order one, so softmaxes are neither uniform nor one-hot and every gradient is exercised."""
    from .reference import PIMParams

    shapes = {}
    for side in ("t2p", "p2t"):
        for proj in "qkv":
            shapes[f"{side}_{proj}_w"], shapes[f"{side}_{proj}_b"] = (width, dim), (width,)
        shapes[f"{side}_o_w"], shapes[f"{side}_o_b"] = (dim, width), (dim,)
    shapes.update(gate_w1=(gate_hidden, 2 * dim), gate_b1=(gate_hidden,),
                  gate_w2=(1, gate_hidden), gate_b2=(1,))
    tensors = []
    for name in PIMParams._fields:
        shape = shapes[name]
        std = shape[1] ** -0.5 if len(shape) == 2 else 0.1
        t = torch.randn(shape, generator=generator, dtype=torch.float64) * std
        tensors.append(t.to(dtype=dtype, device=device).requires_grad_(requires_grad))
    return PIMParams(*tensors)


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
