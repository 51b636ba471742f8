"""Region pooling's description (``avpt_kernels.ops.OPS["region_pool"].SPEC``): its inputs at a
``Shape``, its reference, the public op, and its traffic floor (``region_pool_min_bytes``)."""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from ..opspec import OpSpec, Shape
from . import reference
from .op import infer_grid, region_pool


def region_pool_min_bytes(features_shape, maps_shape, dtype=torch.float32,
                          backward: bool = False) -> int:
    """Compulsory DRAM traffic of Eq. 2 in bytes: the floor the kernels are judged against.

    Forward: read the N patch rows of features and the maps once, write out [B,R,D].
    Backward (both gradients): read features, maps, out and dout, write dfeatures and dmaps
    (den, B*R fp32, is negligible and left out).
    """
    size = torch.empty((), dtype=dtype).element_size()
    b, t, d = features_shape
    pixel = len(maps_shape) == 4
    r = maps_shape[1] if pixel else maps_shape[2]
    n = math.prod(infer_grid(t, maps_shape[2], maps_shape[3])) if pixel else maps_shape[1]
    patch_elems, maps_elems, out_elems = b * n * d, math.prod(maps_shape), b * r * d
    if not backward:
        return size * (patch_elems + maps_elems + out_elems)
    return size * (2 * patch_elems + 2 * maps_elems + 2 * out_elems)


def _make(s: Shape, leaf, _) -> Tuple[Tensor, ...]:
    return leaf(s.B, s.T, s.D), leaf(*s.maps_shape, unit=True)


SPEC = OpSpec(
    "region_pool", _make,
    reference=lambda s: lambda f, a: reference.region_pool(f, a, 1e-6,
                                                           s.grid if s.map_side else None),
    op=lambda s: lambda f, a, backend=None: region_pool(f, a, backend=backend),
    min_bytes=lambda s, dtype, backward: region_pool_min_bytes(
        (s.B, s.T, s.D), s.maps_shape, dtype, backward))
