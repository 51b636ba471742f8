"""Backend choice for every op, in one place.

``"torch"``  the pure-PyTorch reference (``avpt_kernels.reference``), autograd by PyTorch.
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
from typing import Iterator, Optional

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


def resolve(op: str, device: torch.device, backend: Optional[str], has_triton: bool) -> str:
    """The backend ("torch" or "triton") that runs ``op`` on ``device``.

    ``backend`` is the per-call choice (None: the process-wide one); ``has_triton`` says
    whether ``op`` has a Triton implementation. Asking for "triton" where it cannot run is an
    error, never a silent fallback.
    """
    name = _default if backend is None else _checked(backend, "backend")
    if name == "torch":
        return "torch"
    runnable = triton_can_run(device)
    if name == "triton":
        if not has_triton:
            raise NotImplementedError(f"{op}: no Triton kernel is available yet; use backend='torch'")
        if not runnable:
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                f"set before triton is imported; got tensors on {device}")
        return "triton"
    return "triton" if (has_triton and runnable) else "torch"
