"""DICOM reading (pydicom): pixels as float with the photometric interpretation applied."""
from __future__ import annotations

import numpy as np

from .records import DataError


def read_header(path: str):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise DataError(f"cannot read DICOM {path}: {type(exc).__name__}: {exc}") from exc


def read_pixels(path: str) -> np.ndarray:
    """A 2-D DICOM image as float64, MONOCHROME1 inverted so that bright means dense/bright."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float64)
    except Exception as exc:
        raise DataError(f"cannot read DICOM {path}: {type(exc).__name__}: {exc}") from exc
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D DICOM image, got pixel array shape {arr.shape}")
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    arr = arr * slope + intercept
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = arr.max() - arr
    return arr


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
