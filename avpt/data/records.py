"""What every loader produces: a list of ``Record``s, each able to load one 2-D sample.

``Record.load()`` returns a ``RawSample``: the image [H, W] float in [0, 1], the lesion mask
[H, W] bool, and tissue maps [3, H, W] when the source has them (the phantom), else None (the
dataset then computes classical tissue priors, ``avpt.data.tissue_priors``).
A file that cannot be read raises ``DataError`` naming the file. Lesion masks are read with
``read_mask``, decoded by their image mode (palette, alpha, 16-bit, grey, binary).
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


def check_unique_ids(records) -> None:
    """Every record has its own ``sample_id`` (folds and metrics are kept by id); else a
    ``DataError`` naming the two files that share one."""
    seen = {}
    for rec in records:
        other = seen.setdefault(rec.sample_id, rec)
        if other is not rec:
            raise DataError(f"{other.source or other.sample_id} and {rec.source or rec.sample_id} "
                            f"have the same sample id {rec.sample_id!r}: rename one of them (ids "
                            f"key the folds and the metrics)")


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


# Pillow modes a mask may come in, and how each is decoded (``read_mask``).
MASK_MODES = ("1", "L", "P", "LA", "RGB", "RGBA", "I", "I;16", "I;16L", "I;16B", "F", "PA")


def _binary(values: np.ndarray) -> np.ndarray:
    """A single-channel mask [H, W] (any numeric dtype) -> bool: with at most two levels the
    higher one is the lesion (0/1, 0/255, 0/65535 alike); with more (anti-aliased edges) the
    pixels above half the largest value."""
    values = values.astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if top <= 0:
        return np.zeros(values.shape, dtype=bool)
    levels = np.unique(values)
    if len(levels) <= 2:
        return values == top
    return values > top / 2


def decode_mask(im, where: str) -> np.ndarray:
    """A loaded PIL image of a lesion mask -> [H, W] bool, decoded by its mode:

    * ``1``, ``L``, ``I``, ``I;16*``, ``F``: grey levels (``_binary``; 16-bit masks of 0/1 or
      0/65535 alike);
    * ``P`` / ``PA`` (palette, e.g. VOC: index 1 = (128, 0, 0)): every pixel whose palette colour
      is not black (and, for ``PA``, not transparent) -- never the grey value of the colour,
      which is below half for dark palette colours;
    * ``LA`` / ``RGBA``: the alpha channel when it varies (alpha-coded masks), else the colour;
    * ``RGB``: the brightest channel (a red (128, 0, 0) lesion counts).

    Any other mode (CMYK, YCbCr, ...) is a ``DataError`` naming ``where``."""
    mode = im.mode
    if mode not in MASK_MODES:
        raise DataError(f"{where}: a lesion mask in image mode {mode!r} cannot be decoded "
                        f"(expected a binary, grey, 16-bit, palette, RGB or alpha mask); "
                        f"save it as an 8-bit grey PNG (0 background, 255 lesion)")
    if mode in ("P", "PA"):
        idx = np.asarray(im.getchannel(0) if mode == "PA" else im)
        palette = np.asarray(im.getpalette() or [0, 0, 0], dtype=np.int64).reshape(-1, 3)
        if len(palette) < 256:  # a short palette: indices past it are black
            palette = np.concatenate([palette, np.zeros((256 - len(palette), 3), np.int64)])
        lesion = palette.max(axis=1)[idx.astype(np.int64)] > 0
        if mode == "PA":
            lesion &= np.asarray(im.getchannel(1)) > 127
        return lesion
    if mode in ("LA", "RGBA"):
        arr = np.asarray(im)
        alpha = arr[..., -1]
        if alpha.min() != alpha.max():
            return _binary(alpha)
        return _binary(arr[..., :-1].max(axis=-1))
    arr = np.asarray(im)
    if arr.ndim == 3:  # RGB
        arr = arr.max(axis=-1)
    return _binary(arr)


def read_mask(path: str) -> np.ndarray:
    """A lesion mask file as [H, W] bool (``decode_mask``); a missing, unreadable or undecodable
    file is a ``DataError`` naming it."""
    from PIL import Image

    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return decode_mask(im, path)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read mask {path}: {type(exc).__name__}: {exc}") from exc


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
