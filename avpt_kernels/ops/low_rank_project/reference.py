"""CILMP's per-layer rank-r chain in literal PyTorch: the ground truth of ``low_rank_project``
(conventions: ``ops.common``)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..._autocast import no_autocast
from ..common import compute_dtype, stage_index


@no_autocast
def low_rank_project(x: Tensor, U: Tensor, V: Tensor, layer_stage: Sequence[int]) -> Tensor:
    """Every layer's rank-r projection, ``out[l] = x(l) U[s(l)] V[s(l)]`` (CILMP's x A_l^T B_l^T).

    x: [N, Din] (shared by every layer) or [L, N, Din] (x(l) = x[l]).
    U: [S, Din, r], V: [S, r, Dout]  stage factors; layer_stage: L ints, the stage of each layer.
    returns: [L, N, Dout] in the dtype of ``x``.
    """
    cdt = compute_dtype(x.dtype)
    stage = stage_index(layer_stage, x.device)
    u, v = U.to(cdt)[stage], V.to(cdt)[stage]  # [L, Din, r], [L, r, Dout]
    low = torch.einsum("nd,ldr->lnr" if x.dim() == 2 else "lnd,ldr->lnr", x.to(cdt), u)
    return (low @ v).to(x.dtype)
