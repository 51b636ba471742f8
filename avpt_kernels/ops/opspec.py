"""One description of each op, shared by the tests, the benchmarks and ``avpt_kernels.compare``:
its inputs at a shape and dtype, the torch reference, the public op (and so the fused call), and
its traffic floor.

``SPECS[name]`` is an ``OpSpec``; a ``Shape`` (frozen, hashable: a cache key as it is) gives the
sizes. ``spec.inputs(shape, dtype, device, seed, requires_grad)`` -> the tensors;
``spec.reference(shape)(*inputs)`` runs ``avpt_kernels.reference``;
``spec.op(shape)(*inputs, backend=...)`` runs the public op (``spec.fused(shape)`` on
``backend="triton"``); ``spec.min_bytes(shape, dtype, backward)`` is the op's own ``*_min_bytes``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Tuple

import torch
from torch import Tensor

from .. import reference
from ..testing import random_pim_params
from .low_rank_project import low_rank_project, low_rank_project_min_bytes
from .pim import pim, pim_min_bytes
from .prompt_bank import prompt_bank, prompt_bank_min_bytes
from .region_pool import region_pool, region_pool_min_bytes


@dataclasses.dataclass(frozen=True)
class Shape:
    """Sizes of one op call: B images of T tokens (class token + T-1 patches) of width D, K prompt
    tokens, R regions; PIM's heads x head_dim attention and gate width; the prompt bank's layers,
    stages and rank; region maps as pixels [B,R,map_side,map_side] (0: on the tokens, [B,T-1,R])."""
    B: int
    T: int
    D: int
    K: int = 6
    R: int = 3
    heads: int = 4
    head_dim: int = 16
    gate: int = 32
    layers: int = 12
    stages: int = 3
    rank: int = 8
    map_side: int = 0

    @property
    def grid(self) -> Tuple[int, int]:
        side = int(round((self.T - 1) ** 0.5))
        return side, side

    @property
    def maps_shape(self) -> Tuple[int, ...]:
        if self.map_side:
            return (self.B, self.R, self.map_side, self.map_side)
        return (self.B, self.T - 1, self.R)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    make: Callable[..., Tuple[Tensor, ...]]  # (shape, leaf, pim_params) -> inputs
    reference: Callable[[Shape], Callable[..., Any]]
    op: Callable[[Shape], Callable[..., Any]]
    min_bytes: Callable[[Shape, torch.dtype, bool], int]

    def inputs(self, shape: Shape, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
               requires_grad: bool = False) -> Tuple[Tensor, ...]:
        """The op's input tensors (seeded: the same values on every device)."""
        g = torch.Generator().manual_seed(seed)

        def leaf(*size: int, unit: bool = False) -> Tensor:
            x = torch.rand(*size, generator=g) if unit else torch.randn(*size, generator=g)
            return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)

        params = functools.partial(random_pim_params, dtype=dtype, device=device,
                                   requires_grad=requires_grad, generator=g)
        return self.make(shape, leaf, params)

    def fused(self, shape: Shape) -> Callable[..., Any]:
        """The public op on the Triton kernels (raises where they cannot run)."""
        return functools.partial(self.op(shape), backend="triton")


def _region_pool_make(s: Shape, leaf, _) -> Tuple[Tensor, ...]:
    return leaf(s.B, s.T, s.D), leaf(*s.maps_shape, unit=True)


def _prompt_bank_make(s: Shape, leaf, _) -> Tuple[Tensor, ...]:
    return (leaf(s.B, s.R, s.D), leaf(s.K, s.D), leaf(s.stages, s.D, s.rank),
            leaf(s.stages, s.rank, s.D), leaf(s.layers, s.D), leaf(s.layers, s.D),
            leaf(s.layers, s.D))


def _low_rank_project_make(s: Shape, leaf, _) -> Tuple[Tensor, ...]:
    # Rows N = B*K (e.g. classes x knowledge tokens), shared by every layer; Din = Dout = D (the
    # Shape has one width: the op's Din != Dout and per-layer x are its own tests' cases).
    return (leaf(s.B * s.K, s.D), leaf(s.stages, s.D, s.rank), leaf(s.stages, s.rank, s.D))


def _pim_make(s: Shape, leaf, pim_params) -> Tuple[Tensor, ...]:
    z, p = leaf(s.B, s.T, s.D), leaf(s.B, s.K, s.D)
    return (z, p, *pim_params(s.D, s.heads * s.head_dim, s.gate))


def _stages(s: Shape):
    from ..modules import contiguous_stages

    return contiguous_stages(s.layers, s.stages)


SPECS: Dict[str, OpSpec] = {
    "region_pool": OpSpec(
        "region_pool", _region_pool_make,
        reference=lambda s: lambda f, a: reference.region_pool(f, a, 1e-6,
                                                               s.grid if s.map_side else None),
        op=lambda s: lambda f, a, backend=None: region_pool(f, a, backend=backend),
        min_bytes=lambda s, dtype, backward: region_pool_min_bytes(
            (s.B, s.T, s.D), s.maps_shape, dtype, backward)),
    "prompt_bank": OpSpec(
        "prompt_bank", _prompt_bank_make,
        reference=lambda s: lambda *xs: reference.prompt_bank(*xs, _stages(s), 1e-5),
        op=lambda s: lambda *xs, backend=None: prompt_bank(*xs, _stages(s), backend=backend),
        min_bytes=lambda s, dtype, backward: prompt_bank_min_bytes(
            s.B, s.R, s.K, s.D, s.rank, s.layers, s.stages, dtype, backward)),
    "low_rank_project": OpSpec(
        "low_rank_project", _low_rank_project_make,
        reference=lambda s: lambda *xs: reference.low_rank_project(*xs, _stages(s)),
        op=lambda s: lambda *xs, backend=None: low_rank_project(*xs, _stages(s),
                                                                backend=backend),
        min_bytes=lambda s, dtype, backward: low_rank_project_min_bytes(
            s.B * s.K, s.D, s.D, s.rank, s.layers, s.stages, True, dtype, backward)),
    "pim": OpSpec(
        "pim", _pim_make,
        reference=lambda s: lambda z, p, *w: reference.pim(z, p, reference.PIMParams(*w), s.heads),
        op=lambda s: lambda z, p, *w, backend=None: pim(z, p, reference.PIMParams(*w), s.heads,
                                                         backend=backend),
        min_bytes=lambda s, dtype, backward: pim_min_bytes(
            s.B, s.T, s.D, s.K, s.heads * s.head_dim, dtype, backward)),
}
