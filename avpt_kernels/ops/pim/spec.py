"""PIM's description (``avpt_kernels.ops.OPS["pim"].SPEC``): its inputs at a ``Shape``, its
reference, the public op, and its traffic: the floor (``pim_min_bytes``) and the model of what
the kernels move (``pim_achieved_bytes``; ``benchmarks/kernel_model.py`` counts every launch)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..opspec import OpSpec, Shape
from . import reference
from .op import pim
from .weights import PIMParams, random_pim_params


def pim_min_bytes(B: int, T: int, D: int, K: int, A: int, dtype: torch.dtype,
                  backward: bool = False) -> int:
    """Traffic floor of one PIM layer: forward reads Z twice and writes z_out once; backward
    reads Z and dZ_out twice each and writes dZ once. The K- and A-sized operands (P, P~,
    weights) are added once. What the kernels here move: ``pim_achieved_bytes``."""
    e = torch.empty((), dtype=dtype).element_size()
    big = B * T * D * e
    small = (2 * B * K * D + 8 * A * D) * e
    return (5 if backward else 3) * big + small


def pim_achieved_bytes(B: int, T: int, D: int, K: int, A: int, dtype: torch.dtype,
                       backward: bool = False) -> int:
    """DRAM traffic model of these kernels: the Z-sized streams (Z, z_out, dY, dZ) plus the fp32
    token-row intermediates (X [B*T, 3A], o2, dX, dO2: ``row`` = B*T*A*4 bytes a column group
    of A) and the small operands (P, p_tilde, weights). Forward: Z read twice (projection,
    output), z_out written once; X written (3 rows) and read (Q1, V1: 2; K2: 1), o2 written
    and read (2): 3 big + 8 rows. Backward: dY read 3 times (dO2, dZ, dW'o), Z once (dWz), dZ
    written once; o2 read twice (dO2's dalpha, dW'o), dO2 written and read (2), K2 and Q1, V1
    read (3), dX written (3) and read twice (dZ, dWz: 6): 5 big + 16 rows. Not counted: the
    second pass of a head kernel over its own rows and the weight-gradient partials (L2)."""
    e = torch.empty((), dtype=dtype).element_size()
    big = B * T * D * e
    row = B * T * A * 4  # one fp32 [B*T, A] stream
    small = (2 * B * K * D + 8 * A * D) * e
    if backward:
        return 5 * big + (3 + 3 * 3 + 2 + 2) * row + small
    return 3 * big + (3 + 3 + 2) * row + small


def _make(s: Shape, leaf, options) -> Tuple[Tensor, ...]:
    z, p = leaf(s.B, s.T, s.D), leaf(s.B, s.K, s.D)
    return (z, p, *random_pim_params(s.D, s.heads * s.head_dim, s.gate, **options))


SPEC = OpSpec(
    "pim", _make,
    reference=lambda s: lambda z, p, *w: reference.pim(z, p, PIMParams(*w), s.heads),
    op=lambda s: lambda z, p, *w, backend=None: pim(z, p, PIMParams(*w), s.heads,
                                                     backend=backend),
    min_bytes=lambda s, dtype, backward: pim_min_bytes(
        s.B, s.T, s.D, s.K, s.heads * s.head_dim, dtype, backward))
