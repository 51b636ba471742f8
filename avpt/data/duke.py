"""Duke-Breast-Cancer-MRI (Saha et al. 2018, TCIA): dynamic contrast-enhanced breast MRI.

Layout: ``ROOT/<patient>/**/*.dcm`` (TCIA's ``Duke-Breast-Cancer-MRI/Breast_MRI_001/<study>/
<series>/1-001.dcm``; ``ROOT`` may be the folder holding ``Duke-Breast-Cancer-MRI``), and the
table ``Annotation_Boxes.xlsx`` (or ``.csv``) with ``Patient ID, Start Row, End Row, Start Column,
End Column, Start Slice, End Slice`` (1-based, inclusive: ``index_base=1``).
Series are told apart by SeriesInstanceUID; the phase is chosen by SeriesDescription: ``pre``
(contains "pre") or ``post`` (the first post-contrast series: "1st", else the first dynamic
series that is not "pre"). Slices are ordered by InstanceNumber. 2-D samples: the
``slices_per_lesion`` central slices of the box (label 1, the box as mask) and
``negatives_per_patient`` slices away from the box (label 0, empty mask), evenly spaced.
"""
from __future__ import annotations

import csv
import glob
import os
from typing import Dict, List, Optional

import numpy as np

from .dicom import read_header, read_pixels, read_spacing
from .records import DataError, RawSample, Record, to_unit

BOX_COLUMNS = ("Patient ID", "Start Row", "End Row", "Start Column", "End Column", "Start Slice",
               "End Slice")


def read_boxes(path: str) -> Dict[str, Dict[str, int]]:
    """Patient ID -> box (the first row of a patient)."""
    try:
        if path.lower().endswith((".xlsx", ".xlsm")):
            import openpyxl

            wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
            rows = list(wb.worksheets[0].iter_rows(values_only=True))
            header = [str(h).strip() if h is not None else "" for h in rows[0]]
            table = [dict(zip(header, r)) for r in rows[1:]]
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:
                table = list(csv.DictReader(f))
            header = list(table[0]) if table else []
    except Exception as exc:
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    missing = [c for c in BOX_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    boxes: Dict[str, Dict[str, int]] = {}
    for i, r in enumerate(table, start=2):
        pid = str(r["Patient ID"] or "").strip()
        if not pid:
            continue
        try:
            box = {c: int(float(r[c])) for c in BOX_COLUMNS[1:]}
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: row {i}: non-numeric box value ({exc})") from exc
        boxes.setdefault(pid, box)
    return boxes


def _find_table(root: str, annotations: Optional[str]) -> str:
    if annotations:
        return annotations
    for name in ("Annotation_Boxes.xlsx", "Annotation_Boxes.csv"):
        for cand in (os.path.join(root, name), os.path.join(os.path.dirname(root.rstrip("/")), name)):
            if os.path.isfile(cand):
                return cand
    raise DataError(f"{root}: no Annotation_Boxes.xlsx/.csv (give data.annotations=PATH)")


def _series(patient_dir: str, phase: str):
    """Sorted slice paths of the series of ``phase`` in a patient folder."""
    series: Dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(patient_dir, "**", "*.dcm"), recursive=True)):
        h = read_header(path)
        uid = str(getattr(h, "SeriesInstanceUID", os.path.dirname(path)))
        s = series.setdefault(uid, {"desc": str(getattr(h, "SeriesDescription", "")).lower(),
                                    "number": int(getattr(h, "SeriesNumber", 0) or 0), "slices": []})
        s["slices"].append((int(getattr(h, "InstanceNumber", 0) or 0), path))
    if not series:
        raise DataError(f"{patient_dir}: no DICOM series")
    ordered = sorted(series.values(), key=lambda s: s["number"])
    if phase == "pre":
        chosen = [s for s in ordered if "pre" in s["desc"]]
    else:
        chosen = [s for s in ordered if "1st" in s["desc"]] or \
                 [s for s in ordered if "pre" not in s["desc"]]
    if not chosen:
        raise DataError(f"{patient_dir}: no {phase}-contrast series among "
                        f"{[s['desc'] for s in ordered]}")
    return [p for _, p in sorted(chosen[0]["slices"])]


def load_duke(root: str, phase: str = "post", negatives_per_patient: int = 1,
              slices_per_lesion: int = 3, annotations: Optional[str] = None,
              index_base: int = 1) -> List[Record]:
    if phase not in ("pre", "post"):
        raise ValueError(f"phase must be 'pre' or 'post', got {phase!r}")
    inner = os.path.join(root, "Duke-Breast-Cancer-MRI")
    data_dir = inner if os.path.isdir(inner) else root
    boxes = read_boxes(_find_table(root, annotations))
    records: List[Record] = []
    patients = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    if not patients:
        raise DataError(f"{data_dir}: no patient folder")
    for pid in patients:
        if pid not in boxes:
            raise DataError(f"{os.path.join(data_dir, pid)}: patient {pid} has no row in the "
                            f"annotation table")
        box = boxes[pid]
        slices = _series(os.path.join(data_dir, pid), phase)
        s0, s1 = box["Start Slice"] - index_base, box["End Slice"] - index_base
        if not (0 <= s0 <= s1 < len(slices)):
            raise DataError(f"{pid}: box slices {box['Start Slice']}..{box['End Slice']} outside the "
                            f"{len(slices)} slices of the {phase} series")
        centre = (s0 + s1) / 2
        lesion = sorted(range(s0, s1 + 1), key=lambda k: (abs(k - centre), k))[:slices_per_lesion]
        outside = [k for k in range(len(slices)) if k < s0 - 2 or k > s1 + 2]
        negatives = [outside[int(j)] for j in np.linspace(0, len(outside) - 1, negatives_per_patient)] \
            if outside and negatives_per_patient else []
        for k in sorted(lesion) + sorted(set(negatives)):
            positive = s0 <= k <= s1

            def load(path=slices[k], positive=positive, box=box) -> RawSample:
                pixels = read_pixels(path)
                mask = np.zeros(pixels.shape, bool)
                if positive:
                    r0, r1 = box["Start Row"] - index_base, box["End Row"] - index_base
                    c0, c1 = box["Start Column"] - index_base, box["End Column"] - index_base
                    if not (0 <= r0 <= r1 < pixels.shape[0] and 0 <= c0 <= c1 < pixels.shape[1]):
                        raise DataError(f"{path}: box rows {r0}..{r1}, columns {c0}..{c1} outside "
                                        f"the {pixels.shape} slice")
                    mask[r0:r1 + 1, c0:c1 + 1] = True
                return RawSample(image=to_unit(pixels), mask=mask, spacing=read_spacing(path))

            records.append(Record(sample_id=f"duke-{pid}-s{k + index_base}", patient_id=f"duke-{pid}",
                                  label=int(positive), modality="MRI", loader=load, source=slices[k],
                                  report=f"MRI {pid} slice {k + index_base} ({phase}-contrast): "
                                         f"{'tumour in the annotated box' if positive else 'no annotated tumour'}."))
    return records
