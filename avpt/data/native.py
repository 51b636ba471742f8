"""What native-resolution evaluation needs of each sample, kept small: the original image size,
the pixel spacing (from the DICOM header; None where the format has none, e.g. BUSI's PNGs) and
the ground-truth lesion mask, stored as its bounding-box crop (a full-field mammogram is 4084 x
3328 pixels; its lesion a few hundred), and the way back from the model's input size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .transforms import fit_geometry


@dataclass(frozen=True)
class NativeMask:
    """The ground truth of one image at its original size. ``shape`` (H, W); ``spacing`` (row,
    column) millimetres per pixel or None (unknown: distances in pixels); ``offset`` (r0, c0) and
    ``crop`` [h, w] bool: the mask's bounding box (``crop`` None for an empty mask)."""
    shape: Tuple[int, int]
    spacing: Optional[Tuple[float, float]]
    offset: Tuple[int, int] = (0, 0)
    crop: Optional[np.ndarray] = None

    @classmethod
    def of(cls, mask: np.ndarray, spacing=None) -> "NativeMask":
        """From a full [H, W] bool mask and its spacing (row, column) mm or None."""
        mask = np.asarray(mask, bool)
        sp = None if spacing is None else (float(spacing[0]), float(spacing[1]))
        if not mask.any():
            return cls(tuple(mask.shape), sp)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        return cls(tuple(mask.shape), sp, (int(r0), int(c0)), mask[r0:r1, c0:c1].copy())

    @property
    def empty(self) -> bool:
        return self.crop is None

    def full(self) -> np.ndarray:
        """The mask [H, W] bool."""
        out = np.zeros(self.shape, bool)
        if self.crop is not None:
            r0, c0 = self.offset
            out[r0:r0 + self.crop.shape[0], c0:c0 + self.crop.shape[1]] = self.crop
        return out


def to_native(logits, shape: Tuple[int, int]) -> np.ndarray:
    """A predicted mask at the original size: the segmentation logits [S, S] (the model's input
    size) resized bilinearly to ``shape`` (H, W), then > 0. Resizing the logits, not the
    thresholded mask, keeps the boundary between input pixels (as nnU-Net resamples its
    probabilities). Half-pixel grid (``align_corners=False``), as ``skimage.transform.resize``
    that made the input: the inverse mapping of the dataset's resize."""
    t = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    if tuple(t.shape) == tuple(shape):
        return (t > 0).numpy()
    # the dataset's resize keeps the aspect ratio and pads the shorter side: crop that back first
    (top, left), (nh, nw) = fit_geometry(int(shape[0]), int(shape[1]), t.shape[-1])
    t = t[top:top + nh, left:left + nw]
    up = F.interpolate(t[None, None], size=tuple(int(s) for s in shape), mode="bilinear",
                       align_corners=False)
    return (up[0, 0] > 0).numpy()
