"""Classical tissue priors: soft glandular / fatty / ductal maps computed from the image with
scikit-image on CPU numpy, outside autograd. The dataset computes them for images without
tissue maps (``tissue_prior_single``); A-VPT's ``region_source="prior"`` computes them per batch
(``tissue_prior_maps``)."""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .modalities import MODALITIES


# ----------------------------------------------------------------------------------------------
def _normalize01(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, (1.0, 99.0))
    if hi - lo < 1e-8:
        return np.zeros_like(img, dtype=np.float64)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def tissue_prior_single(gray: np.ndarray, modality: str) -> np.ndarray:
    """Soft glandular / fatty / ductal maps [3, H, W] in [0, 1] for one grayscale image [H, W].

    Intensity: a soft Otsu split of the smoothed image. Which side is fat depends on the physics:
    fat is radiolucent (dark) in mammography, hypoechoic (darker) in ultrasound and bright on
    non-fat-suppressed T1 MRI. Texture: local entropy (fibroglandular tissue is heterogeneous,
    fat homogeneous). Ducts: the Sato tubeness filter (bright ridges in MG/MRI, anechoic dark
    ridges in US).
    """
    from skimage import filters, morphology, util
    from skimage.filters import rank

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    img = _normalize01(np.asarray(gray, dtype=np.float64))
    smooth = filters.gaussian(img, sigma=1.0)
    if smooth.max() - smooth.min() < 1e-6:  # flat image: no evidence for any tissue
        return np.zeros((3,) + img.shape, dtype=np.float32)
    split = filters.threshold_otsu(smooth)
    bright = _sigmoid((smooth - split) / 0.05)
    entropy = rank.entropy(util.img_as_ubyte(img), morphology.disk(3)).astype(np.float64)
    texture = entropy / max(entropy.max(), 1e-8)
    body = _sigmoid((smooth - 0.05) / 0.02)  # excludes the black background outside the breast
    if modality == "MRI":
        fatty = bright
        glandular = (1.0 - bright) * body * (0.5 + 0.5 * texture)
    else:
        glandular = bright * (0.5 + 0.5 * texture)
        fatty = (1.0 - bright) * body * (1.0 - 0.5 * texture)
    tube = filters.sato(img, sigmas=(1, 2, 3), black_ridges=(modality == "US"))
    ductal = tube / max(tube.max(), 1e-8)
    maps = np.stack([glandular, fatty, ductal]).astype(np.float32)
    return np.clip(maps, 0.0, 1.0)


def tissue_prior_maps(images: Union[Tensor, np.ndarray],
                      modality: Union[str, Sequence[str]] = "MG") -> Tensor:
    """Classical tissue-prior maps for a batch: images [B, C, H, W] (any normalisation; channels
    are averaged to grayscale) -> maps [B, 3, H, W] float32 in [0, 1] (glandular, fatty, ductal),
    on the images' device. ``modality``: one of ``MODALITIES`` or one per image."""
    arr = images.detach().float().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {arr.shape}")
    mods = [modality] * arr.shape[0] if isinstance(modality, str) else list(modality)
    if len(mods) != arr.shape[0]:
        raise ValueError(f"modality must be one name or {arr.shape[0]} names (one per image), "
                         f"got {len(mods)}")
    out = np.stack([tissue_prior_single(a.mean(axis=0), m) for a, m in zip(arr, mods)])
    maps = torch.from_numpy(out)
    return maps.to(images.device) if isinstance(images, Tensor) else maps


__all__ = ["tissue_prior_maps", "tissue_prior_single"]
