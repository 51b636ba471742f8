"""Triton version compatibility: ``for_triton`` (per-version launch choices) and a patch for
Triton's interpreter (``TRITON_INTERPRET=1``) with numpy >= 2.4.

``for_triton({(3, 0): a, (3, 8): b})`` picks a launch constant by the installed Triton version
(``avpt_kernels.aot`` re-exports it and documents how ``aot_configs()`` must follow it).

Triton's interpreter holds every scalar as a one-element 1-d numpy array and, before 3.8, turns
it into a Python int with ``int(array)`` (``tensor.__index__``, used by every ``range`` over a
tensor bound and by integer indexing in a kernel). numpy 2.4 removed that conversion for arrays
of ndim > 0 (deprecated since 1.25), so every such kernel fails with "TypeError: only
0-dimensional arrays can be converted to Python scalars". Triton 3.8 squeezes the array first;
``apply()`` backports that one line to older interpreters: it wraps
``triton.runtime.interpreter._patch_lang_tensor`` so that, after it has patched ``tl.tensor``,
``__index__`` is ``int(data.squeeze())``. Nothing else changes, the patch is installed and
undone with the interpreter's own patch scope, and it is applied only where it is needed (the
interpreter on, numpy >= 2.4, Triton < 3.8). The alternative is ``numpy<2.4``.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Tuple, TypeVar

_T = TypeVar("_T")


def _version(text: str) -> Tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def triton_version(version: Optional[str] = None) -> Tuple[int, int]:
    """(major, minor) of ``version``, by default of the installed Triton."""
    if version is None:
        import triton

        version = triton.__version__
    if not re.match(r"\d+\.\d+", version):
        raise ValueError(f"unrecognised Triton version {version!r}")
    return _version(version)


def for_triton(choices: Mapping[Tuple[int, int], _T], version: Optional[str] = None) -> _T:
    """The per-Triton-version entry of ``choices``, which maps the oldest (major, minor) an entry
    applies to onto the entry: the entry of the newest key <= the running version (the oldest
    entry for anything older). ``for_triton({(3, 0): 4, (3, 7): 8})`` is 4 under Triton 3.6 and
    8 under 3.8. Call it at import time, for constants that the launchers and ``aot_configs()``
    both read."""
    if not choices:
        raise ValueError("for_triton: no choices")
    running = triton_version(version)
    keys = sorted(choices)
    eligible = [k for k in keys if k <= running]
    return choices[eligible[-1] if eligible else keys[0]]


def _index(self):
    return int(self.handle.data.squeeze())


def apply() -> bool:
    """Install the patch if needed; True if it is (now) installed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import numpy
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return False
    if _version(numpy.__version__) < (2, 4) or _version(triton.__version__) >= (3, 8):
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_avpt_numpy24", False):
        return original is not None

    def _patch_lang_tensor(tensor, *args, **kwargs):
        result = original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if scope is not None and hasattr(scope, "set_attr"):  # Triton 3.6: restorable patches
            scope.set_attr(tensor, "__index__", _index)
        else:
            tensor.__index__ = _index
        return result

    _patch_lang_tensor._avpt_numpy24 = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True


apply()
