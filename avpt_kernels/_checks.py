"""Argument checks shared by the public ops: run before any compute, name the argument and
what was expected, raise ``TypeError`` for wrong types/dtypes and ``ValueError`` for wrong
shapes/values."""
from __future__ import annotations

import os
from typing import Optional, Sequence

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


# Value checks (maps in [0, 1], finite) need the values on the host: on an accelerator that is a
# device-to-host copy, i.e. a host sync on every call. The data loaders validate maps where they
# are loaded (avpt.data), so by default the ops check values only where that costs no sync: CPU
# tensors. ``AVPT_CHECK_VALUES=1`` (or ``set_value_checks(True)`` / ``check_values=True`` on the
# op) turns the check on for every device (debugging); ``set_value_checks(False)`` turns it off.
_VALUE_CHECKS: Optional[bool] = {"1": True, "0": False}.get(os.environ.get("AVPT_CHECK_VALUES", ""))


def set_value_checks(enabled: Optional[bool]) -> None:
    """Process-wide value checks: True (every device, one host sync per call on an accelerator),
    False (never), None (the default: CPU tensors only, where no sync is involved)."""
    global _VALUE_CHECKS
    _VALUE_CHECKS = enabled


def value_checks_enabled(x: Tensor, override: Optional[bool] = None) -> bool:
    """Whether a value check runs on ``x``: ``override`` if given, else the process-wide setting,
    else only for CPU tensors. Never on meta/fake tensors or while torch.compile traces (the
    values are unknown there, and a data-dependent check would break the graph)."""
    if x.device.type == "meta" or torch.compiler.is_compiling() or _is_fake(x):
        return False
    enabled = override if override is not None else _VALUE_CHECKS
    return x.device.type == "cpu" if enabled is None else bool(enabled)


def _is_fake(x: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor, is_fake

    return isinstance(x, FakeTensor) or is_fake(x)


def unit_interval(x: Tensor, name: str, check: Optional[bool] = None) -> None:
    """All values finite and in [0, 1]. One reduction and, on an accelerator, one host sync: so
    it runs per ``value_checks_enabled`` (by default on CPU tensors only; see above)."""
    if not value_checks_enabled(x, check):
        return
    if not bool(((x >= 0) & (x <= 1)).all()):  # NaN fails both comparisons
        bad = x[~((x >= 0) & (x <= 1))]
        raise ValueError(f"{name} must be finite and in [0, 1]; found {bad.numel()} value(s) "
                         f"outside, e.g. {bad.flatten()[0].item()}")


def positive(value, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
