"""Autocast handling shared by the ops and the modules.

The ops own their precision: the reference computes in fp32 (fp64 stays fp64) and the Triton
kernels accumulate in fp32, so an enclosing ``torch.autocast`` region must not recast the torch
algebra inside them (``F.linear``, ``@``, ``einsum`` would otherwise run in the autocast dtype).
``no_autocast`` switches autocast off for the device type of the op's first tensor argument.
The modules, on the other hand, follow ``nn.Linear``: they cast their inputs and weights to the
autocast dtype (``autocast_dtype``) before calling the op.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor


# Device types with an autocast, read once at import: ``torch.amp.is_autocast_available`` is a C
# call that Dynamo cannot trace in torch 2.11 (a graph break, fatal under fullgraph=True), while a
# set lookup traces as a constant.
_AUTOCAST_DEVICE_TYPES = frozenset(
    t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", "maia",
                torch._C._get_privateuse1_backend_name())
    if torch.amp.is_autocast_available(t))


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device``'s type, or None when autocast is off there."""
    if device.type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def autocast_disabled(device_type: str):
    """A context that switches autocast off for ``device_type`` (a no-op where autocast does not
    exist, e.g. meta tensors)."""
    if device_type in _AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def no_autocast(fn):
    """Decorator: run ``fn`` with autocast off for the device of its first tensor argument."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if first is None:
            return fn(*args, **kwargs)
        with autocast_disabled(first.device.type):
            return fn(*args, **kwargs)
    return wrapper
