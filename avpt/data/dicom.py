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
