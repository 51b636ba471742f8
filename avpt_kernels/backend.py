"""Backend choice for every op, in one place.

``"torch"``  the pure-PyTorch reference (``avpt_kernels.ops.<op>.reference``), autograd by PyTorch.
``"triton"`` the fused Triton kernels: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``
             was set before triton was imported (how the tests run kernels without a GPU).
``"auto"``   (default) ``"triton"`` where the op has a kernel and the tensors can run it,
             ``"torch"`` otherwise.

The process-wide default comes from the ``AVPT_BACKEND`` environment variable; ``set_backend``
changes it, ``use_backend`` changes it for a ``with`` block, and every op and module also takes
``backend=`` to override it for one call.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("auto", "torch", "triton")


def _checked(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


_default = _checked(os.environ.get("AVPT_BACKEND", "auto"), "AVPT_BACKEND")


def get_backend() -> str:
    """The process-wide backend name ("auto", "torch" or "triton")."""
    return _default


def set_backend(name: str) -> None:
    """Set the process-wide backend ("auto", "torch" or "triton")."""
    global _default
    _default = _checked(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("torch"): ...`` runs the block on that backend, then restores."""
    global _default
    previous, _default = _default, _checked(name, "backend")
    try:
        yield
    finally:
        _default = previous


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_can_run(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device``."""
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def resolve(op: str, device: torch.device, backend: Optional[str],
            unsupported: Callable[[], Optional[str]]) -> str:
    """The backend ("torch" or "triton") that runs ``op`` on ``device``: the one dispatch rule of
    every op.

    ``backend`` is the per-call choice (None: the process-wide one); ``unsupported()`` says why
    the op's Triton kernels cannot take these (already validated) arguments, or None (each op
    module's ``triton_unsupported_reason``). "auto" falls back to torch where Triton cannot run
    or the kernels do not take the arguments; "triton" raises ``ValueError`` with the reason
    instead: never a silent fallback.
    """
    name = _default if backend is None else _checked(backend, "backend")
    if name == "torch":
        return "torch"
    if not triton_can_run(device):
        if name == "triton":
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                f"set before triton is imported; got tensors on {device}")
        return "torch"
    reason = unsupported()
    if reason is None:
        return "triton"
    if name == "triton":
        raise ValueError(f"{op}: backend='triton' does not support {reason}; "
                         f"use backend='torch' or 'auto'")
    return "torch"
