"""Duke-Breast-Cancer-MRI (Saha et al. 2018, TCIA): dynamic contrast-enhanced breast MRI.

Layout: ``ROOT/<patient>/**/*.dcm`` (TCIA's ``Duke-Breast-Cancer-MRI/Breast_MRI_001/<study>/
<series>/1-001.dcm``; ``ROOT`` may be the folder holding ``Duke-Breast-Cancer-MRI``), and the
table ``Annotation_Boxes.xlsx`` (or ``.csv``) with ``Patient ID, Start Row, End Row, Start Column,
End Column, Start Slice, End Slice``.

Series: told apart by SeriesInstanceUID; the pre-contrast and first post-contrast dynamic series
are found by ``duke_series.resolve`` (both naming conventions of the data set, non-fat-saturated
T1 never taken, acquisition order checked). A patient whose series cannot be resolved is skipped
and named in one warning (``unresolved="skip"``, the default) or stops the load with one line
(``unresolved="error"``). The chosen series per patient and the skipped patients are in
``records.provenance`` (the run writes them to ``metrics.json`` under ``data``).

Annotation indexing (``index_base=1``): rows, columns and slices are 1-based, rows and columns
inclusive; a row is an image row (y), a column an image column (x), and slice k is the k-th
slice in InstanceNumber order (TCIA's ``1-NNN.dcm`` numbering, whose zero padding varies, so
file names are not used). This is how the data set's authors read the table: the Mazurowski
lab's slice extractor (github.com/mazurowski-lab/MRI-parameter-prediction
data/dbc/png_extractor.py; the same step is in the lab's Duke MRI tutorial code) compares
Start/End Slice, "index start at 1 here", with the slice number of the file, positives
``start <= k < end``, negatives more than 5 slices away; github.com/LangDaniel/MAEMI
utils/bboxes/bboxes_ROI.py converts the boxes taking the slice index along InstanceNumber and
reversing it where InstanceNumber runs against the slice position. ``slice_order="position"``
orders by position along the slice normal instead.

2-D samples per patient: ``slices_per_lesion`` positives spread across the box (the centres of
equal sub-ranges of Start Slice .. End Slice - 1, see ``positive_slices``; label 1, the box as
mask) and ``negatives_per_patient`` negatives (label 0, empty mask) drawn, seeded by (seed,
patient), from the slices at least ``negative_gap`` slices from the box (5, the lab's rule) and
outside the first and last ``edge_margin`` of the volume (where the field of view leaves the
breast).
Intensity: per volume, [1st percentile, maximum] of the volume -> [0, 1] (estimated on up to
``VOLUME_SAMPLE`` evenly spaced slices plus every slice served, so no served slice is clipped at
the top, where an enhancing tumour is).
"""
from __future__ import annotations

import csv
import glob
import logging
import math
import os
import zlib
from typing import Dict, List, Optional

import numpy as np

from .dicom import read_header, read_pixels, read_spacing
from .duke_series import (HEADER_TAGS, Series, Unresolved, header_times, ordered_slices,
                          resolve, slice_position)
from .records import DataError, RawSample, Record

log = logging.getLogger(__name__)

BOX_COLUMNS = ("Patient ID", "Start Row", "End Row", "Start Column", "End Column", "Start Slice",
               "End Slice")
NEGATIVE_GAP = 5        # slices between a negative and the box (the Duke lab's extractor's rule)
EDGE_MARGIN = 0.15      # fraction of the volume at each end never used for negatives
VOLUME_SAMPLE = 16      # slices read to estimate a volume's intensity range


class DukeRecords(list):
    """The records, plus ``provenance``: {"duke_series": {patient: chosen series}, "duke_unresolved":
    {patient: reason}} (JSON-ready; recorded in the run's metrics.json)."""

    def __init__(self, records=(), provenance: Optional[Dict] = None):
        super().__init__(records)
        self.provenance = provenance or {}


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


def read_series(patient_dir: str) -> List[Series]:
    """Every series under a patient folder, from the headers (no pixels read)."""
    series: Dict[str, Series] = {}
    for path in sorted(glob.glob(os.path.join(patient_dir, "**", "*.dcm"), recursive=True)):
        h = read_header(path, HEADER_TAGS)
        uid = str(getattr(h, "SeriesInstanceUID", "") or os.path.dirname(path))
        s = series.get(uid)
        if s is None:
            s = series[uid] = Series(uid, str(getattr(h, "SeriesDescription", "") or ""),
                                     int(getattr(h, "SeriesNumber", 0) or 0))
        inst = getattr(h, "InstanceNumber", None)
        s.slices.append((int(inst) if inst not in (None, "") else None, slice_position(h), path))
        for tag, t in header_times(h).items():
            s.times.setdefault(tag, []).append(t)
    if not series:
        raise DataError(f"{patient_dir}: no DICOM series")
    return sorted(series.values(), key=lambda s: s.number)


def positive_slices(s0: int, s1: int, n: int) -> List[int]:
    """``n`` slices spread across the box s0..s1 (0-based Start..End Slice): the centres of n
    equal sub-ranges of s0..s1-1, every one of them when there are n or fewer. The End Slice is
    left out (unless it is the only one): the lab's own extractor counts it outside the tumour
    (``start <= k < end``) while the column's name reads inclusive; the slices before it are
    tumour under both readings."""
    last = s1 - 1 if s1 > s0 else s1
    depth = last - s0 + 1
    if n >= depth:
        return list(range(s0, last + 1))
    return sorted({s0 + int((i + 0.5) * depth / n) for i in range(n)})


def negative_candidates(n_slices: int, s0: int, s1: int, gap: int = NEGATIVE_GAP,
                        edge_margin: float = EDGE_MARGIN) -> List[int]:
    """Slices at least ``gap`` from the box and outside ``edge_margin`` of each volume end."""
    edge = int(math.ceil(edge_margin * n_slices))
    return [k for k in range(edge, n_slices - edge) if k <= s0 - gap or k >= s1 + gap]


def draw_negatives(candidates: List[int], n: int, seed: int, patient: str) -> List[int]:
    """``n`` of ``candidates`` without replacement, seeded by (seed, patient)."""
    if not candidates or n <= 0:
        return []
    rng = np.random.default_rng([seed, zlib.crc32(patient.encode())])
    return sorted(int(k) for k in rng.choice(candidates, size=min(n, len(candidates)), replace=False))


class VolumeWindow:
    """Per-volume intensity range [1st percentile, max] of a series, computed once, lazily."""

    def __init__(self, slices: List[str], served: List[int]):
        n = len(slices)
        sample = set(np.linspace(0, n - 1, min(VOLUME_SAMPLE, n)).round().astype(int).tolist())
        self.paths = [slices[k] for k in sorted(sample | set(served))]
        self.range: Optional[tuple] = None

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self.range is None:
            vol = np.concatenate([read_pixels(p).ravel() for p in self.paths])
            self.range = (float(np.percentile(vol, 1.0)), float(vol.max()))
        lo, hi = self.range
        if hi - lo < 1e-8:
            return np.zeros(pixels.shape, dtype=np.float32)
        return np.clip((pixels - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def load_duke(root: str, phase: str = "post", negatives_per_patient: int = 1,
              slices_per_lesion: int = 3, annotations: Optional[str] = None,
              index_base: int = 1, seed: int = 0, unresolved: str = "skip",
              slice_order: str = "instance", negative_gap: int = NEGATIVE_GAP,
              edge_margin: float = EDGE_MARGIN) -> DukeRecords:
    if phase not in ("pre", "post"):
        raise ValueError(f"phase must be 'pre' or 'post', got {phase!r}")
    if unresolved not in ("skip", "error"):
        raise ValueError(f"unresolved must be 'skip' or 'error', got {unresolved!r}")
    if slice_order not in ("instance", "position"):
        raise ValueError(f"slice_order must be 'instance' or 'position', got {slice_order!r}")
    inner = os.path.join(root, "Duke-Breast-Cancer-MRI")
    data_dir = inner if os.path.isdir(inner) else root
    boxes = read_boxes(_find_table(root, annotations))
    patients = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    if not patients:
        raise DataError(f"{data_dir}: no patient folder")
    records = DukeRecords(provenance={"duke_series": {}, "duke_unresolved": {}})
    chosen, skipped = records.provenance["duke_series"], records.provenance["duke_unresolved"]
    for pid in patients:
        pdir = os.path.join(data_dir, pid)
        if pid not in boxes:
            raise DataError(f"{pdir}: patient {pid} has no row in the annotation table")
        try:
            series, how = resolve(read_series(pdir), phase)
            slices, order = ordered_slices(series, slice_order)
        except Unresolved as exc:
            if unresolved == "error":
                raise DataError(f"{pdir}: {phase}-contrast series unresolved: {exc} "
                                f"(data.unresolved=skip skips such patients)") from None
            skipped[pid] = str(exc)
            continue
        chosen[pid] = dict(series.summary(), phase=phase, chosen=how, slice_order=order)
        records.extend(_patient_records(pid, slices, boxes[pid], phase, index_base, seed,
                                        slices_per_lesion, negatives_per_patient, negative_gap,
                                        edge_margin))
    if skipped:
        log.warning("Duke: skipped %d of %d patients whose %s-contrast series could not be "
                    "resolved: %s", len(skipped), len(patients), phase,
                    "; ".join(f"{p} ({r})" for p, r in skipped.items()))
    if not records:
        raise DataError(f"{data_dir}: no patient with a resolvable {phase}-contrast series "
                        f"({len(skipped)} skipped)")
    return records


def _patient_records(pid, slices, box, phase, index_base, seed, slices_per_lesion,
                     negatives_per_patient, negative_gap, edge_margin) -> List[Record]:
    s0, s1 = box["Start Slice"] - index_base, box["End Slice"] - index_base
    if not (0 <= s0 <= s1 < len(slices)):
        raise DataError(f"{pid}: box slices {box['Start Slice']}..{box['End Slice']} outside the "
                        f"{len(slices)} slices of the {phase}-contrast series")
    lesion = positive_slices(s0, s1, slices_per_lesion)
    negatives = draw_negatives(negative_candidates(len(slices), s0, s1, negative_gap, edge_margin),
                               negatives_per_patient, seed, pid)
    window = VolumeWindow(slices, lesion + negatives)
    out = []
    for k in lesion + negatives:
        positive = s0 <= k <= s1

        def load(path=slices[k], positive=positive) -> RawSample:
            pixels = read_pixels(path)
            mask = np.zeros(pixels.shape, bool)
            if positive:
                r0, r1 = box["Start Row"] - index_base, box["End Row"] - index_base
                c0, c1 = box["Start Column"] - index_base, box["End Column"] - index_base
                if not (0 <= r0 <= r1 < pixels.shape[0] and 0 <= c0 <= c1 < pixels.shape[1]):
                    raise DataError(f"{path}: box rows {r0}..{r1}, columns {c0}..{c1} outside "
                                    f"the {pixels.shape} slice")
                mask[r0:r1 + 1, c0:c1 + 1] = True
            return RawSample(image=window(pixels), mask=mask, spacing=read_spacing(path))

        out.append(Record(sample_id=f"duke-{pid}-s{k + index_base}", patient_id=f"duke-{pid}",
                          label=int(positive), modality="MRI", loader=load, source=slices[k],
                          report=f"MRI {pid} slice {k + index_base} ({phase}-contrast): "
                                 f"{'tumour in the annotated box' if positive else 'no annotated tumour'}."))
    return out
