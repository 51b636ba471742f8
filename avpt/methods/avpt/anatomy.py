"""Anatomical region encoder (ARE): where region maps come from, and the Anatomy MLP (Eq. 3).

Three sources of region confidence maps ``A in [0,1]^{B x R x H x W}`` (R = 3 by default:
glandular, fatty, ductal):

* ``"given"``   maps from the dataset (segmentations or tissue probability maps);
* ``"prior"``   classical tissue priors computed from the image on CPU with scikit-image
                (``avpt.data.tissue_priors.tissue_prior_maps``), outside autograd;
* ``"learned"`` a small convolutional extractor trained end to end (``LearnedRegionExtractor``).

The maps are pooled over the frozen patch features with ``avpt_kernels.region_pool`` (Eq. 2) and
the pooled region features go through ``AnatomyMLP`` (Eq. 3).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data import MODALITIES

REGION_NAMES = ("glandular", "fatty", "ductal")
REGION_SOURCES = ("given", "prior", "learned")

# Which tissues touch (glandular-fatty, glandular-ductal; ducts run inside glandular tissue):
# the default region graph of the Laplacian smoothing (Eq. 16) when no maps define one.
DEFAULT_ADJACENCY = ((0.0, 1.0, 1.0),
                     (1.0, 0.0, 0.0),
                     (1.0, 0.0, 0.0))


# ----------------------------------------------------------------------------------------------
# Learned extractor and the Anatomy MLP
# ----------------------------------------------------------------------------------------------
class LearnedRegionExtractor(nn.Module):
    """A small conv net: images [B, 3, H, W] -> region maps [B, R, Hg, Wg] in (0, 1) on the patch
    grid (two stride-2 3x3 convs, area pooling to the grid, 1x1 conv, sigmoid)."""

    def __init__(self, num_regions: int, in_channels: int = 3, hidden: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride=2, padding=1)
        self.head = nn.Conv2d(hidden, num_regions, 1)

    def forward(self, images: Tensor, grid: Tuple[int, int]) -> Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(images))))
        x = F.adaptive_avg_pool2d(x, grid)
        return torch.sigmoid(self.head(x))


class AnatomyMLP(nn.Module):
    """g_theta of Eq. 3: LayerNorm, Linear(D, h), GELU, Linear(h, D). [B, R, D] -> [B, R, D]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(pooled))))


# ----------------------------------------------------------------------------------------------
# Map checks and region adjacency
# ----------------------------------------------------------------------------------------------
def check_maps(maps, batch: int, num_regions: int, image_size: Tuple[int, int],
               grid: Tuple[int, int]) -> None:
    """Maps must be [B, R, H, W] with H, W the image size or an integer multiple of the patch grid
    (same factor in both directions)."""
    h, w = image_size
    expected = (f"[{batch}, {num_regions}, {h}, {w}] (image size) or [{batch}, {num_regions}, "
                f"f*{grid[0]}, f*{grid[1]}] (a multiple f of the patch grid), values in [0, 1]")
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a torch.Tensor {expected}, got {type(maps).__name__}")
    if maps.dim() != 4:
        raise ValueError(f"maps must be {expected}, got shape {tuple(maps.shape)}")
    if maps.shape[0] != batch or maps.shape[1] != num_regions:
        raise ValueError(f"maps must be {expected}, got shape {tuple(maps.shape)} "
                         f"(batch {batch}, {num_regions} regions expected)")
    mh, mw = maps.shape[2:]
    factor_ok = mh % grid[0] == 0 and mw % grid[1] == 0 and mh // grid[0] == mw // grid[1] \
        and mh >= grid[0]
    if not factor_ok:
        raise ValueError(f"maps must be {expected}; got size {mh}x{mw}, which does not match the "
                         f"image")


def region_adjacency(maps: Tensor, eps: float = 1e-6) -> Tensor:
    """Soft region adjacency [B, R, R] in [0, 1] from maps [B, R, H, W]: the overlap of region i,
    dilated by one pixel, with region j, over the smaller region's mass; symmetric, zero
    diagonal. No gradient (a graph for Eq. 16, not a training signal)."""
    with torch.no_grad():
        a = maps.float()
        dil = F.max_pool2d(a, 3, stride=1, padding=1)
        overlap = torch.einsum("bihw,bjhw->bij", dil, a)
        mass = a.sum(dim=(2, 3))
        denom = torch.minimum(mass[:, :, None], mass[:, None, :]) + eps
        adj = (overlap / denom).clamp(0.0, 1.0)
        adj = torch.maximum(adj, adj.transpose(1, 2))
        eye = torch.eye(adj.shape[1], dtype=torch.bool, device=adj.device)
        return adj.masked_fill(eye, 0.0)


def per_image_modalities(modality, batch: int, default: str) -> List[str]:
    """Modality per image as names: None (default), a name, names, or indices into MODALITIES."""
    if modality is None:
        return [default] * batch
    if isinstance(modality, str):
        names = [modality] * batch
    elif isinstance(modality, Tensor):
        names = [MODALITIES[int(i)] for i in modality.reshape(-1)]
    else:
        names = [m if isinstance(m, str) else MODALITIES[int(m)] for m in modality]
    if len(names) != batch or any(n not in MODALITIES for n in names):
        raise ValueError(f"modality must be one of {MODALITIES} or one per image ({batch}), "
                         f"got {modality!r}")
    return names


def modality_indices(modality, batch: int, device=None) -> Tensor:
    """Modality per image as a long tensor [B] of indices into MODALITIES."""
    names = per_image_modalities(modality, batch, MODALITIES[0])
    return torch.tensor([MODALITIES.index(n) for n in names], dtype=torch.long, device=device)
