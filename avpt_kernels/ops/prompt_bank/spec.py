"""The prompt bank's description (``avpt_kernels.ops.OPS["prompt_bank"].SPEC``): its inputs at a
``Shape``, its reference, the public op, and its traffic floor (``prompt_bank_min_bytes``)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..opspec import OpSpec, Shape, layer_stages
from . import reference
from .op import prompt_bank


def prompt_bank_min_bytes(batch: int, regions: int, tokens: int, dim: int, rank: int,
                          layers: int, stages: int, dtype=torch.float32,
                          backward: bool = False) -> int:
    """Compulsory DRAM traffic of Eq. 4 in bytes: read the inputs and parameters once and write
    the prompts [L,B,K,D] (forward); read dprompts and write every gradient (backward; the
    fp32 per-row statistics are negligible and left out)."""
    size = torch.empty((), dtype=dtype).element_size()
    inputs = batch * regions * dim + tokens * dim + 2 * stages * dim * rank + 3 * layers * dim
    prompts = layers * batch * tokens * dim
    return size * (inputs + prompts) if not backward else size * (2 * inputs + prompts)


def _make(s: Shape, leaf, _) -> Tuple[Tensor, ...]:
    return (leaf(s.B, s.R, s.D), leaf(s.K, s.D), leaf(s.stages, s.D, s.rank),
            leaf(s.stages, s.rank, s.D), leaf(s.layers, s.D), leaf(s.layers, s.D),
            leaf(s.layers, s.D))


SPEC = OpSpec(
    "prompt_bank", _make,
    reference=lambda s: lambda *xs: reference.prompt_bank(*xs, layer_stages(s), 1e-5),
    op=lambda s: lambda *xs, backend=None: prompt_bank(*xs, layer_stages(s), backend=backend),
    min_bytes=lambda s, dtype, backward: prompt_bank_min_bytes(
        s.B, s.R, s.K, s.D, s.rank, s.layers, s.stages, dtype, backward))
