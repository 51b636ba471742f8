"""Mammogram preprocessing that keeps what a radiologist looks at.

One image and its lesion mask go through the same steps:

1. grey levels: the file's own display window (VOI LUT / Window Center-Width, by pydicom) when it
   has one, else background level .. maximum, never a clip at the top: microcalcifications are
   the brightest few pixels of a mammogram, and a 99.5-percentile clip flattens them into the
   dense tissue around them (``dicom.display_unit``);
2. orientation: every breast with its chest wall on the left edge. Laterality from the DICOM
   header (ImageLaterality, else Laterality), else the file name (``_L_`` / ``_R_``); right
   breasts are mirrored (the display convention puts a right breast's chest wall on the right
   edge). Without any laterality, the image half holding more tissue is taken as the chest wall;
3. crop to the breast: the bounding box of the largest bright component (Otsu threshold on a
   reduced copy), widened so that it always holds the whole lesion mask;
4. pad to a square (zeros = background, on the side away from the chest wall and evenly above and
   below), so that the resize to the model's input keeps the aspect ratio.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Optional, Tuple

import numpy as np

from .dicom import display_unit

log = logging.getLogger(__name__)

REDUCE = 8          # the breast outline is found on an image reduced this many times
MARGIN = 0.02       # crop margin, as a fraction of the image side


def laterality(ds, path: str = "") -> Optional[str]:
    """'L', 'R' or None: the DICOM header first (ImageLaterality, Laterality), then the file
    name's ``_L_`` / ``_R_`` field (INbreast: ``<FileName>_<hash>_MG_<Lat>_<View>_ANON.dcm``)."""
    from_name = None
    m = re.search(r"_([LR])_", os.path.basename(path))
    if m:
        from_name = m.group(1)
    for tag in ("ImageLaterality", "Laterality"):
        v = str(getattr(ds, tag, "") or "").strip().upper()
        if v in ("L", "R"):
            if from_name and from_name != v:
                log.warning("%s: %s is %s but the file name says %s; using the header",
                            path, tag, v, from_name)
            return v
    return from_name


def chest_wall_left(image: np.ndarray, side: Optional[str]) -> bool:
    """Whether ``image`` must be mirrored to put the chest wall on the left."""
    if side == "R":
        return True
    if side == "L":
        return False
    half = image.shape[1] // 2
    return float(image[:, half:].sum()) > float(image[:, :half].sum())


def breast_box(image: np.ndarray) -> Tuple[int, int, int, int]:
    """(r0, r1, c0, c1), end-exclusive: the largest bright component of ``image`` in [0, 1]."""
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    small = image[::REDUCE, ::REDUCE]
    if small.max() - small.min() < 1e-6:
        return 0, image.shape[0], 0, image.shape[1]
    regions = regionprops(label(small > threshold_otsu(small)))
    if not regions:
        return 0, image.shape[0], 0, image.shape[1]
    r0, c0, r1, c1 = max(regions, key=lambda r: r.area).bbox
    pad = int(round(MARGIN * max(image.shape)))
    return (max(0, r0 * REDUCE - pad), min(image.shape[0], r1 * REDUCE + pad),
            max(0, c0 * REDUCE - pad), min(image.shape[1], c1 * REDUCE + pad))


def pad_square(image: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Zero-pad to a square: columns on the right (away from the chest wall), rows evenly."""
    h, w = image.shape
    side = max(h, w)
    top = (side - h) // 2
    widths = ((top, side - h - top), (0, side - w))
    return np.pad(image, widths), np.pad(mask, widths)


def preprocess(pixels: np.ndarray, ds, mask: np.ndarray, path: str = "",
               use_window: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Pixels after the modality LUT [H, W] and mask [H, W] -> square image float32 in [0, 1]
    (chest wall left, cropped to the breast) and the mask moved with it."""
    image = display_unit(pixels, ds, use_window)
    if chest_wall_left(image, laterality(ds, path)):
        image, mask = image[:, ::-1], mask[:, ::-1]
    r0, r1, c0, c1 = breast_box(image)
    if mask.any():  # never crop a lesion away
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        r0, r1 = min(r0, int(rows[0])), max(r1, int(rows[-1]) + 1)
        c0, c1 = min(c0, int(cols[0])), max(c1, int(cols[-1]) + 1)
    image, mask = pad_square(image[r0:r1, c0:c1], mask[r0:r1, c0:c1])
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(mask, dtype=bool)
