"""Preprocessing and augmentation (the paper's training protocol).

Deterministic preprocessing, once per sample: resize to the backbone's image size (224 for
ViT-B/16) keeping the aspect ratio (zero padding), CLAHE (``skimage.exposure.equalize_adapthist``) on the image only, tissue priors when
the source has no tissue maps. Per-modality normalisation: (x - mean_m) / std_m with statistics of
the training images of modality m. Augmentation in training: random rotation in [-10, 10] degrees
and horizontal flip, the SAME geometric transform applied to the image, the tissue maps and the
mask (bilinear for image and maps, nearest-equivalent for the mask: bilinear then > 0.5).
The random draw comes from ``numpy.random.default_rng((seed, epoch, index))``: the same sample
of the same epoch gets the same augmentation in any process, which makes resume exact.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

MAX_ROTATION_DEG = 10.0


def resize(arr: np.ndarray, size: int, order: int = 1) -> np.ndarray:
    """[H, W] or [C, H, W] -> [.., size, size], keeping the aspect ratio: the longer side is
    scaled to ``size`` (anti-aliased bilinear; order 0 for masks) and the shorter one is padded
    with zeros evenly on both sides (the background of every modality is dark). An image, its
    maps and its mask of the same shape get the same geometry. Loaders that know better where
    to pad (mammograms: away from the chest wall) hand over square images."""
    from skimage.transform import resize as sk_resize

    if arr.ndim == 3:
        return np.stack([resize(a, size, order) for a in arr])
    if arr.shape == (size, size):
        return arr.astype(np.float32)
    h, w = arr.shape
    (top, left), (nh, nw) = fit_geometry(h, w, size)
    out = sk_resize(arr.astype(np.float32), (nh, nw), order=order,
                    anti_aliasing=order > 0 and nh * nw < h * w, preserve_range=True)
    return np.pad(out, ((top, size - nh - top), (left, size - nw - left))).astype(np.float32)


def fit_geometry(h: int, w: int, size: int):
    """((top, left), (nh, nw)): where ``resize`` puts an [h, w] image inside [size, size]
    (the longer side scaled to ``size``, the shorter padded evenly); its inverse crops there."""
    scale = size / max(h, w)
    nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    return ((size - nh) // 2, (size - nw) // 2), (nh, nw)


def clahe(image: np.ndarray, clip_limit: float = 0.01) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of an image in [0, 1]."""
    from skimage.exposure import equalize_adapthist

    if image.max() - image.min() < 1e-8:
        return image.astype(np.float32)
    kernel = max(8, image.shape[0] // 8)
    return equalize_adapthist(np.clip(image, 0, 1), kernel_size=kernel,
                              clip_limit=clip_limit).astype(np.float32)


def augment_params(seed: int, epoch: int, index: int, rotation: float = MAX_ROTATION_DEG,
                   flip: bool = True) -> Tuple[float, bool]:
    """(angle in degrees, horizontal flip) for sample ``index`` in ``epoch``."""
    rng = np.random.default_rng((seed, epoch, index))
    angle = float(rng.uniform(-rotation, rotation)) if rotation else 0.0
    do_flip = bool(rng.integers(0, 2)) if flip else False
    return angle, do_flip


def geometric(stack: torch.Tensor, angle: float, flip: bool) -> torch.Tensor:
    """Rotate by ``angle`` degrees about the centre and optionally flip: [C, H, W] -> [C, H, W].
    Zero padding outside the rotated field (the background of every modality is dark)."""
    if flip:
        stack = stack.flip(-1)
    if angle == 0.0:
        return stack
    rad = np.deg2rad(angle)
    cos, sin = float(np.cos(rad)), float(np.sin(rad))
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=stack.dtype).unsqueeze(0)
    grid = F.affine_grid(theta, (1,) + tuple(stack.shape), align_corners=False)
    return F.grid_sample(stack.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[0]


def apply(image: np.ndarray, tissue: np.ndarray, mask: np.ndarray, angle: float,
          flip: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One geometric transform for image [H, W], tissue [3, H, W] and mask [H, W] together."""
    stack = torch.from_numpy(np.concatenate([image[None], tissue, mask[None].astype(np.float32)]))
    out = geometric(stack.float(), angle, flip)
    return out[0], out[1:-1].clamp(0, 1), (out[-1] > 0.5).float()


def modality_stats(images_by_modality: Dict[str, list]) -> Dict[str, Tuple[float, float]]:
    """Per-modality (mean, std) of preprocessed images (lists of [H, W] arrays)."""
    stats = {}
    for m, imgs in images_by_modality.items():
        if imgs:
            flat = np.concatenate([np.asarray(i, dtype=np.float64).ravel() for i in imgs])
            stats[m] = (float(flat.mean()), float(max(flat.std(), 1e-3)))
    return stats
