"""The low-rank projection's description (``avpt_kernels.ops.OPS["low_rank_project"].SPEC``): its
inputs at a ``Shape``, its reference, the public op, and its traffic floor
(``low_rank_project_min_bytes``)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..opspec import OpSpec, Shape, layer_stages
from . import reference
from .op import low_rank_project


def low_rank_project_min_bytes(rows: int, din: int, dout: int, rank: int, layers: int,
                               stages: int, shared: bool = True, dtype=torch.float32,
                               backward: bool = False) -> int:
    """Compulsory DRAM traffic in bytes: read x ([N,Din] shared, or [L,N,Din]), U and V once and
    write out [L,N,Dout] (forward); read dout, x, U, V and write dx, dU, dV (backward; the fp32
    low / dlow [L,N,r] are negligible and left out)."""
    size = torch.empty((), dtype=dtype).element_size()
    x = rows * din * (1 if shared else layers)
    factors = stages * rank * (din + dout)
    out = layers * rows * dout
    return size * (x + factors + out) if not backward else size * (2 * x + 2 * factors + out)


def _make(s: Shape, leaf, _) -> Tuple[Tensor, ...]:
    # Rows N = B*K (e.g. classes x knowledge tokens), shared by every layer; Din = Dout = D (the
    # Shape has one width: the op's Din != Dout and per-layer x are its own tests' cases).
    return (leaf(s.B * s.K, s.D), leaf(s.stages, s.D, s.rank), leaf(s.stages, s.rank, s.D))


SPEC = OpSpec(
    "low_rank_project", _make,
    reference=lambda s: lambda *xs: reference.low_rank_project(*xs, layer_stages(s)),
    op=lambda s: lambda *xs, backend=None: low_rank_project(*xs, layer_stages(s), backend=backend),
    min_bytes=lambda s, dtype, backward: low_rank_project_min_bytes(
        s.B * s.K, s.D, s.D, s.rank, s.layers, s.stages, True, dtype, backward))
