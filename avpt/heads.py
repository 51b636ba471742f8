"""Task heads shared by every method: classification on the final class token (Eq. 14) and a
light segmentation decoder on the token grid (Eq. 15)."""
from __future__ import annotations

from typing import Tuple

import torch.nn.functional as F
from torch import Tensor, nn


class ClassificationHead(nn.Module):
    """Eq. 14: logits = W_cls z_cls^(L) on the class token after ln_post. [B, D] -> [B, C]."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fc(pooled)


class SegDecoder(nn.Module):
    """Light decoder on the patch-token grid: 1x1 conv D->h, GELU, 3x3 conv h->h, GELU, 1x1 conv
    h->1, then bilinear up-sampling to the image size. tokens [B, N, D] -> mask logits [B, 1, H, W]."""

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden, 1)
        self.mix = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, tokens: Tensor, grid: Tuple[int, int], image_size: Tuple[int, int]) -> Tensor:
        b, n, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1])
        x = self.out(F.gelu(self.mix(F.gelu(self.reduce(x)))))
        return F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
