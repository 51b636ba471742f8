"""DICOM reading (pydicom): headers, pixels with the modality LUT applied, and the display window.

``read_pixels`` keeps what earlier loaders expect (a float array, MONOCHROME1 inverted so that
bright means dense). ``read_image`` returns the dataset too, for the loaders that use its tags
(laterality, window), and ``display_unit`` maps pixels to [0, 1] by the file's own VOI window
(Window Center/Width or a VOI LUT, applied by pydicom) where the file has one, else by the full
range: background level (0.5th percentile) to the maximum, with no clip at the top, so that
the brightest structures (microcalcifications in a mammogram) keep their contrast.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from .records import DataError


def read_header(path: str, tags: Optional[Sequence[str]] = None):
    """The header of ``path`` without pixels; ``tags`` (keywords) reads only those elements."""
    import pydicom

    try:
        if tags:
            return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(tags))
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise DataError(f"cannot read DICOM {path}: {type(exc).__name__}: {exc}") from exc


def read_image(path: str) -> Tuple[np.ndarray, object]:
    """(pixels [H, W] float64 after the modality LUT (Rescale Slope/Intercept), dataset).
    The photometric interpretation is NOT applied here (see ``display_unit``)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception as exc:
        raise DataError(f"cannot read DICOM {path}: {type(exc).__name__}: {exc}") from exc
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D DICOM image, got pixel array shape {arr.shape}")
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64), ds


def read_pixels(path: str) -> np.ndarray:
    """A 2-D DICOM image as float64, MONOCHROME1 inverted so that bright means dense/bright."""
    arr, ds = read_image(path)
    if _monochrome1(ds):
        arr = arr.max() - arr
    return arr


def _monochrome1(ds) -> bool:
    return str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1"


def has_window(ds) -> bool:
    """Whether the file carries its own display window (VOI LUT module)."""
    return ("WindowCenter" in ds and "WindowWidth" in ds) or bool(ds.get("VOILUTSequence"))


def display_unit(arr: np.ndarray, ds, use_window: bool = True) -> np.ndarray:
    """Pixels after the modality LUT (``read_image``) -> float32 [H, W] in [0, 1], bright = dense.

    With ``use_window`` and a VOI window in the file, pydicom applies it (the grey levels a reader
    of the image sees); its output range is found by passing the extremes through the same
    transform, so every VOI function (LINEAR, LINEAR_EXACT, SIGMOID, LUT) normalises right.
    Without a window: background level (0.5th percentile) .. maximum, no clip at the top."""
    if use_window and has_window(ds):
        from pydicom.pixels import apply_voi_lut

        if ds.get("VOILUTSequence"):  # a table, indexed by integer values over its domain
            n_entries, first = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
            inp, ends = np.rint(arr).astype(np.int64), np.arange(first, first + (n_entries or 65536))
        else:                         # a window function: any value, the extremes saturate
            inp, ends = arr, np.array([-2.0 ** 40, 2.0 ** 40])
        out = np.asarray(apply_voi_lut(inp, ds, prefer_lut=True), dtype=np.float64)
        ends = np.asarray(apply_voi_lut(ends, ds, prefer_lut=True), dtype=np.float64)
        lo, hi = float(ends.min()), float(ends.max())
        invert = _monochrome1(ds)
    else:  # MONOCHROME1 flipped first, so that the unclipped top is the densest structure
        out = -arr if _monochrome1(ds) else arr
        lo, hi = float(np.percentile(out, 0.5)), float(out.max())
        invert = False
    if hi - lo < 1e-8:
        return np.zeros(arr.shape, dtype=np.float32)
    unit = np.clip((out - lo) / (hi - lo), 0.0, 1.0)
    return (1.0 - unit if invert else unit).astype(np.float32)


def read_spacing(path: str):
    """(row, column) millimetres per pixel of a DICOM image, or None when the header has none:
    PixelSpacing (0028,0030; in the patient plane, as MR and calibrated images give it) else
    ImagerPixelSpacing (0018,1164; at the detector, as digital mammograms such as INbreast's give
    it, magnification not corrected). Both are [row spacing, column spacing]. A present but
    malformed value is a DataError naming the file."""
    header = read_header(path)
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(header, tag, None)
        if value is None or value == "":
            continue
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            raise DataError(f"{path}: {tag} {value!r} is not two numbers (row, column mm)") from None
        if not (np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0):
            raise DataError(f"{path}: {tag} {value!r} is not two positive numbers (row, column mm)")
        return row, col
    return None
