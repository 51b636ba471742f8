"""Argument checks shared by the public ops: run before any compute, name the argument and
what was expected, raise ``TypeError`` for wrong types/dtypes and ``ValueError`` for wrong
shapes/values."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(x, name: str, ndim: int | Sequence[int], layout: str) -> Tensor:
    """``x`` is a floating tensor with ``ndim`` dims (``layout`` describes the expected shape)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64 {layout}, got {x.dtype}")
    dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want} {layout}, got shape {tuple(x.shape)}")
    return x


def shape(x: Tensor, name: str, expected: Sequence[int], layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} {layout}, got {tuple(x.shape)}")


def nonempty(size: int, name: str, what: str) -> None:
    if size < 1:
        raise ValueError(f"{name} must have at least one {what}, got {size}")


def same_dtype_device(ref_name: str, ref: Tensor, **others: Tensor) -> None:
    """Every tensor in ``others`` shares ``ref``'s dtype and device."""
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                            f"cast them to one dtype")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                             f"move them to one device")


def unit_interval(x: Tensor, name: str) -> None:
    """All values finite and in [0, 1]. One reduction and one host sync; skipped while
    torch.compile traces (a data-dependent check would break the graph) and on meta tensors."""
    if x.device.type == "meta" or torch.compiler.is_compiling():
        return
    if not bool(((x >= 0) & (x <= 1)).all()):  # NaN fails both comparisons
        bad = x[~((x >= 0) & (x <= 1))]
        raise ValueError(f"{name} must be finite and in [0, 1]; found {bad.numel()} value(s) "
                         f"outside, e.g. {bad.flatten()[0].item()}")


def positive(value, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
