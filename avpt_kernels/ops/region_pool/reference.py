"""Eq. 2 in literal PyTorch: the ground truth of ``region_pool`` (conventions: ``ops.common``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._autocast import no_autocast
from ..common import compute_dtype


def downsample_maps(maps: Tensor, grid: Tuple[int, int]) -> Tensor:
    """Area-average pixel-resolution maps onto the patch grid.

    maps: [B, R, Hm, Wm] with Hm = f*Hg, Wm = f*Wg  ->  [B, N=Hg*Wg, R] (row-major patch order).

    The paper says "bilinearly downsampled"; for an integer factor, bilinear interpolation with
    anti-aliasing tends to the box (area) average, which is exact, cheap and fusable, so that is
    the contract here.
    """
    b, r, hm, wm = maps.shape
    hg, wg = grid
    pooled = F.avg_pool2d(maps, kernel_size=(hm // hg, wm // wg))  # [B, R, Hg, Wg]
    return pooled.reshape(b, r, hg * wg).transpose(1, 2)


@no_autocast
def region_pool(features: Tensor, maps: Tensor, eps: float = 1e-6,
                grid: Optional[Tuple[int, int]] = None) -> Tensor:
    """Eq. 2: ``out[b,k] = sum_p A[b,p,k] F[b,p] / (sum_p A[b,p,k] + eps)``.

    features: [B, T, D] (class token first, excluded) or [B, N, D] (patch tokens only).
    maps:     [B, N, R] at token resolution, or [B, R, Hm, Wm] at pixel resolution together with
              ``grid=(Hg, Wg)``, Hg*Wg = N.
    returns:  [B, R, D] in the dtype of ``features``.
    """
    cdt = compute_dtype(features.dtype)
    a = maps.to(cdt)
    if a.dim() == 4:
        a = downsample_maps(a, grid)
    n = a.shape[1]
    f = features[:, features.shape[1] - n:].to(cdt)  # drop the class token if present
    num = torch.einsum("bpk,bpd->bkd", a, f)
    den = a.sum(dim=1).unsqueeze(-1) + eps
    return (num / den).to(features.dtype)
