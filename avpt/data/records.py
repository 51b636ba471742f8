"""What every loader produces: a list of ``Record``s, each able to load one 2-D sample.

``Record.load()`` returns a ``RawSample``: the image [H, W] float in [0, 1], the lesion mask
[H, W] bool, and tissue maps [3, H, W] when the source has them (the phantom), else None (the
dataset then computes classical tissue priors, ``avpt.anatomy.tissue_prior_single``).
A file that cannot be read raises ``DataError`` naming the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import numpy as np


class DataError(ValueError):
    """A data file is missing, corrupt or inconsistent; the message names the file."""


@dataclass
class RawSample:
    image: np.ndarray                  # [H, W] float32 in [0, 1]
    mask: np.ndarray                   # [H, W] bool
    tissue: Optional[np.ndarray] = None  # [3, H, W] float32 in [0, 1] (glandular, fatty, ductal)
    report: str = ""                   # one-line report, when the source makes one (phantom)
    spacing: Optional[Tuple[float, float]] = None  # (row, column) mm per pixel, when known (DICOM)


@dataclass
class Record:
    """One sample: ``sample_id`` unique in its data set; ``patient_id`` groups the folds; ``label``
    0 benign / 1 malignant; ``modality`` one of MG, US, MRI; ``source`` the main file (for error
    messages); ``report`` a one-line text, when known; ``laterality`` L/R, when known."""
    sample_id: str
    patient_id: str
    label: int
    modality: str
    loader: Callable[[], RawSample] = field(repr=False)
    source: str = ""
    report: str = ""
    laterality: str = ""               # L or R when known (mammography): per-breast scores

    def load(self) -> RawSample:
        try:
            raw = self.loader()
        except DataError:
            raise
        except Exception as exc:  # any decoder failure becomes an error naming the file
            raise DataError(f"cannot read {self.source or self.sample_id}: "
                            f"{type(exc).__name__}: {exc}") from exc
        _check_raw(raw, self.source or self.sample_id)
        return raw


def _check_raw(raw: RawSample, where: str) -> None:
    img = raw.image
    if img.ndim != 2 or min(img.shape) < 2:
        raise DataError(f"{where}: expected a 2-D image, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise DataError(f"{where}: the image has non-finite pixels")
    if raw.mask.shape != img.shape:
        raise DataError(f"{where}: mask shape {raw.mask.shape} != image shape {img.shape}")


def to_unit(img: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Any grayscale array -> float32 in [0, 1] by robust percentile scaling."""
    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 3:  # RGB(A) png: average the colour channels
        img = img[..., :3].mean(axis=-1)
    lo, hi = np.percentile(img, (low, high))
    if hi - lo < 1e-8:
        return np.zeros(img.shape, dtype=np.float32)
    return np.clip((img - lo) / (hi - lo), 0, 1).astype(np.float32)


def read_png_gray(path: str) -> np.ndarray:
    """An image file as a 2-D float array (PIL; verifies the file fully)."""
    from PIL import Image

    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16", "F") else im)
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    return arr.astype(np.float64)
