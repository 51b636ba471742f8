"""PIM's packed weight layout: the 20 ``PIMParams`` fields in one flat vector per layer (what
``PromptTokenInteraction`` stores and the kernels read), and the offset of each field in it."""
from __future__ import annotations

import functools
import math
from typing import Dict, List, Tuple

from torch import Tensor

from ...reference import PIMParams


def weight_shapes(d: int, a: int, gate_hidden: int) -> List[Tuple[int, ...]]:
    """Shapes of the PIMParams fields in order: per side (t2p, p2t) q, k, v (W [A,D], b [A]) and
    o (W [D,A], b [D]); then the gate W1 [G,2D], b1 [G], w2 [1,G], b2 [1]."""
    side = [(a, d), (a,)] * 3 + [(d, a), (d,)]
    return side + side + [(gate_hidden, 2 * d), (gate_hidden,), (1, gate_hidden), (1,)]


def packed_size(d: int, a: int, gate_hidden: int) -> int:
    """Elements of the flat weight vector of a layer with width D, attention width A, gate G."""
    return sum(math.prod(s) for s in weight_shapes(d, a, gate_hidden))


def pack_weights(params: PIMParams) -> Tensor:
    """PIMParams -> one flat vector [N] (``weight_shapes`` layout); differentiable."""
    import torch

    return torch.cat([w.reshape(-1) for w in params])


def unpack_weights(flat: Tensor, d: int, a: int, gate_hidden: int) -> PIMParams:
    """Views of a flat weight vector [N] as PIMParams (a ``split``: its backward is one cat)."""
    shapes = weight_shapes(d, a, gate_hidden)
    parts = flat.split([math.prod(s) for s in shapes])
    return PIMParams(*(x.view(s) for x, s in zip(parts, shapes)))


def field_offsets(d: int, a: int, gate_hidden: int) -> Dict[str, int]:
    """Field name -> element offset in the flat layout (the kernels index the vector with these;
    memoised, except for symbolic sizes while tracing)."""
    if all(type(n) is int for n in (d, a, gate_hidden)):
        return _field_offsets(d, a, gate_hidden)
    return _field_offsets.__wrapped__(d, a, gate_hidden)


@functools.lru_cache(maxsize=64)
def _field_offsets(d: int, a: int, gate_hidden: int) -> Dict[str, int]:
    offsets, at = {}, 0
    for name, shape in zip(PIMParams._fields, weight_shapes(d, a, gate_hidden)):
        offsets[name] = at
        at += math.prod(shape)
    return offsets
