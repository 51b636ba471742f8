"""The form of an op's description (``ops/<op>/spec.py`` defines its ``SPEC``), shared by the
tests, the benchmarks and ``avpt_kernels.compare``: its inputs at a shape and dtype, the torch
reference, the public op (and so the fused call), and its traffic floor.

``avpt_kernels.ops.OPS[name].SPEC`` is an ``OpSpec``; a ``Shape`` (frozen, hashable: a cache key
as it is) gives the sizes. ``spec.inputs(shape, dtype, device, seed, requires_grad)`` -> the
tensors; ``spec.reference(shape)(*inputs)`` runs the op's ``reference``;
``spec.op(shape)(*inputs, backend=...)`` runs the public op (``spec.fused(shape)`` on
``backend="triton"``); ``spec.min_bytes(shape, dtype, backward)`` is the op's own ``*_min_bytes``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Tuple

import torch
from torch import Tensor

from .common import contiguous_stages


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
    make: Callable[..., Tuple[Tensor, ...]]  # (shape, leaf, weight options) -> inputs
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

        # what an op with weights of its own (PIM) draws them with: the same generator, dtype
        # and device as the leaves
        options = dict(dtype=dtype, device=device, requires_grad=requires_grad, generator=g)
        return self.make(shape, leaf, options)

    def fused(self, shape: Shape) -> Callable[..., Any]:
        """The public op on the Triton kernels (raises where they cannot run)."""
        return functools.partial(self.op(shape), backend="triton")


def layer_stages(s: Shape):
    """The stage of each of ``s.layers`` layers: ``s.stages`` contiguous groups."""
    return contiguous_stages(s.layers, s.stages)
