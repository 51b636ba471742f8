"""Preprocessing and augmentation: two input pipelines (``PIPELINES``), chosen by the run's
recipe (``avpt.recipes``).

``avpt-paper`` (the A-VPT paper's training protocol). Deterministic preprocessing, once per sample: resize to the backbone's image size (224 for
ViT-B/16) keeping the aspect ratio (zero padding), CLAHE (``skimage.exposure.equalize_adapthist``) on the image only, tissue priors when
the source has no tissue maps. Per-modality normalisation: (x - mean_m) / std_m with statistics of
the training images of modality m. Augmentation in training: random rotation in [-10, 10] degrees
and horizontal flip, the SAME geometric transform applied to the image, the tissue maps and the
mask (bilinear for image and maps, nearest-equivalent for the mask: bilinear then > 0.5).
The random draw comes from ``numpy.random.default_rng((seed, epoch, index))``: the same sample
of the same epoch gets the same augmentation in any process, which makes resume exact.

``clip`` (the CLIP-based methods' authors', CoOp family / Dassl): the same aspect-keeping resize
(no CLAHE), the grey image as RGB (three equal channels) normalised with CLIP's per-channel mean
and std (``CLIP_MEAN``, ``CLIP_STD``); in training a random resized crop (scale 0.08-1, aspect
ratio 3/4-4/3, as torchvision's ``RandomResizedCrop``) back to the full size and, where the
recipe flips, a horizontal flip; the same crop for the tissue maps and the mask. Evaluation sees
the whole resized image (CLIP's own evaluation crops the centre of a resize of the shorter side:
a departure, so that masks and metrics keep the full field of view).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

MAX_ROTATION_DEG = 10.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's RGB statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Pipeline:
    """An input pipeline: ``clahe`` (CLAHE at preprocessing where the run's ``clahe`` is on),
    ``normalise`` ("modality": per-modality z-score of the grey image; "clip": RGB with CLIP's
    mean/std), ``augment`` ("rotate": rotation + flip; "resized_crop": random resized crop +
    flip)."""
    name: str
    clahe: bool
    normalise: str
    augment: str


PIPELINES = {"avpt-paper": Pipeline("avpt-paper", clahe=True, normalise="modality", augment="rotate"),
             "clip": Pipeline("clip", clahe=False, normalise="clip", augment="resized_crop")}


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


def resized_crop_params(seed: int, epoch: int, index: int, size: int, flip: bool = True,
                        scale: Tuple[float, float] = (0.08, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[Tuple[int, int, int, int], bool]:
    """((top, left, height, width), horizontal flip) of sample ``index`` in ``epoch`` for a
    [size, size] image: torchvision's ``RandomResizedCrop.get_params`` (10 tries of an area in
    ``scale`` and a log-uniform aspect ratio in ``ratio``, else the whole image), drawn from
    ``numpy.random.default_rng((seed, epoch, index, 1))``."""
    rng = np.random.default_rng((seed, epoch, index, 1))
    area = size * size
    box = (0, 0, size, size)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= size and 0 < h <= size:
            box = (int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), h, w)
            break
    return box, bool(rng.integers(0, 2)) if flip else False


def apply_crop(image: np.ndarray, tissue: np.ndarray, mask: np.ndarray,
               box: Optional[Tuple[int, int, int, int]], flip: bool
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The crop ``box`` (None: none) resized back to the full size (bilinear) and the flip, the
    same for image [H, W], tissue [3, H, W] and mask [H, W] (the mask: bilinear, then > 0.5)."""
    stack = torch.from_numpy(np.concatenate([image[None], tissue, mask[None].astype(np.float32)])).float()
    if box is not None:
        top, left, h, w = box
        size = stack.shape[-2:]
        stack = F.interpolate(stack[None, :, top:top + h, left:left + w], size=tuple(size),
                              mode="bilinear", align_corners=False)[0]
    if flip:
        stack = stack.flip(-1)
    return stack[0], stack[1:-1].clamp(0, 1), (stack[-1] > 0.5).float()


def clip_normalise(image: torch.Tensor) -> torch.Tensor:
    """A grey image [H, W] in [0, 1] as CLIP's input: RGB [3, H, W], (x - mean_c) / std_c."""
    mean = torch.tensor(CLIP_MEAN, dtype=image.dtype)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=image.dtype)[:, None, None]
    return (image.unsqueeze(0).expand(3, -1, -1) - mean) / std


def modality_stats(images_by_modality: Dict[str, list]) -> Dict[str, Tuple[float, float]]:
    """Per-modality (mean, std) of preprocessed images (lists of [H, W] arrays)."""
    stats = {}
    for m, imgs in images_by_modality.items():
        if imgs:
            flat = np.concatenate([np.asarray(i, dtype=np.float64).ravel() for i in imgs])
            stats[m] = (float(flat.mean()), float(max(flat.std(), 1e-3)))
    return stats
