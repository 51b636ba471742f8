"""Soft region pooling (Eq. 2): public entry point, argument checks and backend dispatch.

``region_pool(features[B,T|N,D], maps[B,N,R] | maps[B,R,Hm,Wm]) -> [B,R,D]``
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

from torch import Tensor

from . import _checks, reference
from .backend import resolve

# Set to True by the kernel issue that adds this op's Triton kernels.
HAS_TRITON = False

_LAYOUT_F = "[B, T, D] (class token first) or [B, N, D]"
_LAYOUT_M = "[B, N, R] (token resolution) or [B, R, H, W] (pixel resolution)"


def infer_grid(num_tokens: int, height: int, width: int) -> Tuple[int, int]:
    """Patch grid (Hg, Wg) of pixel maps [.., height, width] for features with ``num_tokens``.

    Tries N = num_tokens - 1 (class token present) first, then N = num_tokens; the grid must
    divide the map by one integer factor f in both directions (square patches).
    """
    for n in (num_tokens - 1, num_tokens):
        if n < 1:
            continue
        factor = math.isqrt(height * width // n) if height * width % n == 0 else 0
        if factor and factor * factor * n == height * width and height % factor == 0 \
                and width % factor == 0:
            return height // factor, width // factor
    raise ValueError(
        f"maps of size {height}x{width} do not fit features with {num_tokens} tokens: expected "
        f"H and W to be one integer multiple f of a patch grid (Hg, Wg) with Hg*Wg = "
        f"{num_tokens - 1} (with class token) or {num_tokens}")


def check_args(features: Tensor, maps: Tensor, eps: float) -> Optional[Tuple[int, int]]:
    """Validate; return the patch grid for pixel-resolution maps (None for token maps)."""
    _checks.tensor(features, "features", 3, _LAYOUT_F)
    _checks.tensor(maps, "maps", (3, 4), _LAYOUT_M)
    _checks.same_dtype_device("features", features, maps=maps)
    _checks.positive(eps, "eps")
    b, t, d = features.shape
    _checks.nonempty(b, "features", "image (B)")
    _checks.nonempty(d, "features", "channel (D)")
    if maps.shape[0] != b:
        raise ValueError(f"maps has batch {maps.shape[0]} but features has batch {b} "
                         f"(maps must be {_LAYOUT_M})")
    grid = None
    if maps.dim() == 3:
        n, r = maps.shape[1], maps.shape[2]
        if n not in (t, t - 1) or n < 1:
            raise ValueError(f"maps [B, N, R] has N={n} tokens but features has T={t}; "
                             f"expected N = T-1 (class token excluded) or N = T")
    else:
        r = maps.shape[1]
        grid = infer_grid(t, maps.shape[2], maps.shape[3])
    _checks.nonempty(r, "maps", "region (R)")
    _checks.unit_interval(maps, "maps")
    return grid


def region_pool(features: Tensor, maps: Tensor, eps: float = 1e-6, *,
                backend: Optional[str] = None) -> Tensor:
    """Soft region pooling, Eq. 2: ``out[b,k] = sum_p A[b,p,k] F[b,p] / (sum_p A[b,p,k] + eps)``.

    features: [B, T, D] with the class token at index 0 (it is excluded), or [B, N, D].
    maps:     region confidences in [0, 1], either [B, N, R] on the patch tokens or
              [B, R, H, W] in pixels, H and W one integer multiple of the patch grid; pixel maps
              are area-averaged onto the grid first. An all-zero map gives a zero row.
    returns:  [B, R, D], dtype of ``features``. Differentiable in features and maps.

    Accumulation is in fp32. Note that the gradient w.r.t. an all-zero map is F / eps, about
    1e6 x |F| for the default eps: beyond float16's range (it overflows to inf there), fine in
    bfloat16 and float32. Use bf16, or a larger eps, when maps can be empty and need gradients.
    """
    grid = check_args(features, maps, eps)
    resolve("region_pool", features.device, backend, has_triton=HAS_TRITON)
    return reference.region_pool(features, maps, eps, grid)
