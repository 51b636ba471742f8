"""INbreast (Moreira et al. 2012), full-field digital mammograms.

Layout: ``ROOT/AllDICOMs/*.dcm`` named ``<FileName>_<PatientHash>_MG_<Lat>_<View>_ANON.dcm``,
``ROOT/AllXML/<FileName>.xml`` (OsiriX plist: ``Images[0].ROIs[*].Point_px``, a list of
``"(x, y)"`` strings, x = column, y = row, 0-based pixels; every ROI with 3 or more points is a
lesion polygon whatever its name (the release's AllXML holds lesion annotations only: Mass,
Calcification, Cluster, Asymmetry, Distortion, Spiculated Region, with the release's spellings
``Assymetry``, ``Espiculated Region``, ``Calcifications``; ``roi_type`` names them), the masks of
an image are merged; point ROIs (1-2 points: single calcifications) are not areas and are left
out), and the ``;``-separated table ``ROOT/*.csv`` with the columns ``File Name`` and ``Bi-Rads``.
BI-RADS -> label: malignant when BI-RADS >= ``birads_threshold`` (default ``4a``; order
1 < 2 < 3 < 4a < 4b < 4c < 5 < 6, a bare ``4`` counts as ``4a``). Patients are grouped by the
hash in the file name (the table's Patient ID column is anonymised away in the release).
An image without an XML file has no annotated lesion (empty mask).
Pixels: ``mammo.preprocess`` (the file's display window, ``window=False``: full range with no
clip at the top; chest wall on the left by laterality; cropped to the breast; padded square).
"""
from __future__ import annotations

import csv
import glob
import logging
import os
import plistlib
import re
from typing import Dict, List

import numpy as np

from .dicom import read_image, read_spacing
from .mammo import preprocess
from .records import DataError, RawSample, Record

log = logging.getLogger(__name__)
_UNKNOWN_NAMES: set = set()   # names already warned about (once per process)

BIRADS_ORDER = ("1", "2", "3", "4a", "4b", "4c", "5", "6")
ROI_TYPES = {"mass": "mass", "calcification": "calcification", "calcifications": "calcification",
             "cluster": "cluster", "asymmetry": "asymmetry", "assymetry": "asymmetry",
             "distortion": "distortion", "spiculated region": "spiculated region",
             "espiculated region": "spiculated region"}


def roi_type(name) -> str:
    """The lesion type of an INbreast ROI name (release spellings included); 'other' if unknown."""
    return ROI_TYPES.get(re.sub(r"\s+", " ", str(name or "")).strip().lower(), "other")


def birads_rank(value: str, where: str = "") -> int:
    v = str(value).strip().lower().replace(" ", "")
    if v == "4":
        v = "4a"
    if v not in BIRADS_ORDER:
        raise DataError(f"{where}: unknown BI-RADS value {value!r}; expected one of {BIRADS_ORDER}")
    return BIRADS_ORDER.index(v)


def read_table(path: str) -> Dict[str, str]:
    """File Name -> BI-RADS from the ;-separated INbreast table."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, delimiter=";"))
    except Exception as exc:
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if not rows or "File Name" not in rows[0] or "Bi-Rads" not in rows[0]:
        raise DataError(f"{path}: expected a ;-separated table with 'File Name' and 'Bi-Rads' columns")
    out = {}
    for r in rows:
        name = (r.get("File Name") or "").strip()
        if name:
            out[name] = (r.get("Bi-Rads") or "").strip()
    return out


def read_rois(path: str, shape) -> np.ndarray:
    """Lesion mask [H, W] from an OsiriX plist XML: polygons of Point_px, merged by OR."""
    from skimage.draw import polygon

    try:
        with open(path, "rb") as f:
            data = plistlib.load(f)
        images = data["Images"]
    except Exception as exc:
        raise DataError(f"cannot read ROI file {path}: {type(exc).__name__}: {exc}") from exc
    mask = np.zeros(shape, dtype=bool)
    for image in images:
        for roi in image.get("ROIs", []):
            name = roi.get("Name", "")
            if roi_type(name) == "other" and name not in _UNKNOWN_NAMES:
                _UNKNOWN_NAMES.add(name)
                log.warning("%s: ROI name %r is not one of INbreast's lesion types; its polygon "
                            "still counts as a lesion", path, name)
            pts = []
            for p in roi.get("Point_px", []):
                m = re.match(r"\s*\(\s*([-\d.eE+]+)\s*,\s*([-\d.eE+]+)\s*\)", str(p))
                if not m:
                    raise DataError(f"{path}: malformed Point_px entry {p!r}")
                pts.append((float(m.group(1)), float(m.group(2))))
            if len(pts) < 3:
                continue
            xy = np.array(pts)
            rr, cc = polygon(xy[:, 1], xy[:, 0], shape)
            mask[rr, cc] = True
    return mask


def load_inbreast(root: str, birads_threshold: str = "4a", window: bool = True) -> List[Record]:
    threshold = birads_rank(birads_threshold, "birads_threshold")
    dicom_dir, xml_dir = os.path.join(root, "AllDICOMs"), os.path.join(root, "AllXML")
    if not os.path.isdir(dicom_dir):
        raise DataError(f"{root}: not an INbreast folder (no AllDICOMs/)")
    tables = sorted(glob.glob(os.path.join(root, "*.csv")))
    if not tables:
        raise DataError(f"{root}: no ;-separated INbreast table (*.csv) with BI-RADS")
    birads = read_table(tables[0])
    records: List[Record] = []
    for path in sorted(glob.glob(os.path.join(dicom_dir, "*.dcm"))):
        parts = os.path.basename(path)[:-4].split("_")
        if len(parts) < 2:
            raise DataError(f"{path}: file name does not follow <FileName>_<PatientHash>_...")
        file_name, patient = parts[0], parts[1]
        if file_name not in birads:
            raise DataError(f"{path}: file name {file_name} is not in {tables[0]}")
        label = int(birads_rank(birads[file_name], f"{tables[0]} ({file_name})") >= threshold)
        xml = os.path.join(xml_dir, f"{file_name}.xml")

        def load(path=path, xml=xml) -> RawSample:
            pixels, ds = read_image(path)
            mask = read_rois(xml, pixels.shape) if os.path.isfile(xml) else np.zeros(pixels.shape, bool)
            image, mask = preprocess(pixels, ds, mask, path, use_window=window)
            return RawSample(image=image, mask=mask, spacing=read_spacing(path))

        view = "_".join(parts[3:5]) if len(parts) >= 5 else ""
        records.append(Record(sample_id=f"inbreast-{file_name}", patient_id=f"inbreast-{patient}",
                              label=label, modality="MG", loader=load, source=path,
                              laterality=parts[3] if len(parts) >= 5 else "",
                              report=f"MG {file_name} {view}: BI-RADS {birads[file_name]}."))
    if not records:
        raise DataError(f"{dicom_dir}: no .dcm file")
    return records
