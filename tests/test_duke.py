"""Duke-Breast-Cancer-MRI on fixtures in TCIA's layout, in both of the data set's naming
conventions: series choice by content (pre / first post-contrast, never a non-fat-saturated T1),
unresolvable patients skipped and named or refused in one line, the chosen series recorded,
the annotation table's indexing, the slice sampling rule and the per-volume intensity range."""
import csv
import logging
import os
import zlib

import numpy as np
import pytest

from avpt.data import DataError, load_records
from avpt.data.duke import negative_candidates, positive_slices
from avpt.data.duke_series import classify

from .test_data_formats import write_dicom

STUDY = "01-01-1990-NA-MRI BREAST BILATERAL W  WO-97538"
N_SLICES, SIZE = 40, 16
BOX = (5, 12, 4, 10, 20, 24)           # Start/End Row, Start/End Column, Start/End Slice (1-based)
NEG_ALLOWED_1B = {k + 1 for k in range(6, 34) if k <= 14 or k >= 28}   # edge 6, gap 5

# patient -> [(series number, SeriesDescription, AcquisitionTime or None, base value)]
NAMED = [(2, "ax t1", "101000", 100), (3, "ax dyn pre", "102000", 500),
         (4, "ax dyn 1st pass", "103000", 1500), (5, "ax dyn 2nd pass", "104000", 1600)]
BARE_GE = [(2, "ax t1 pre", "101000", 100), (3, "ax t1", "101500", 200),
           (600, "Ax Vibrant MultiPhase", "102000", 500),
           (601, "Ph1/Ax Vibrant MultiPhase", "103000", 1500),
           (602, "Ph2/Ax Vibrant MultiPhase", "104000", 1600)]
BARE_3D = [(1, "ax t1 pre", None, 100), (500, "ax 3d dyn", None, 500),
           (501, "Ph1/ax 3d dyn", None, 1500), (504, "Ph4/ax 3d dyn", None, 1900)]
NO_FIRST = [(3, "ax dyn pre", "102000", 500), (5, "ax dyn 2nd pass", "104000", 1600)]
TWO_BARE_UNTIMED = [(5, "ax dynamic", None, 500), (6, "ax dynamic", None, 1500)]
TWO_BARE_TIMED = [(9, "ax dynamic", "103000", 1500), (8, "ax dynamic", "102000", 500)]
ONLY_PHASED = [(601, "Ph1/ax dyn", "103000", 1500), (602, "Ph2/ax dyn", "104000", 1600)]
CONTRADICTED = [(3, "ax dyn pre", "104000", 500), (4, "ax dyn 1st pass", "103000", 1500)]


def write_series(root, pid, number, desc, acq, base, n=N_SLICES, size=SIZE, instance=None,
                 position=None, blob_slice=None):
    """One series in TCIA's tree; slice k (0-based in InstanceNumber order) has pixel values
    base + 10 * InstanceNumber (+ a bright blob on ``blob_slice``)."""
    folder = os.path.join(root, "Duke-Breast-Cancer-MRI", pid, STUDY,
                          f"{number}.000000-{desc.replace('/', '')}-{number * 7 % 1000:05d}")
    rng = np.random.default_rng(number)
    for k in range(n):
        inst = instance(k) if instance else k + 1
        arr = rng.integers(0, 5, (size, size)) + base + 10 * inst
        if blob_slice is not None and inst == blob_slice:
            arr[6:9, 6:9] = 4000
        tags = dict(SeriesInstanceUID=f"1.2.826.0.1.{zlib.crc32(pid.encode())}.{number}",
                    SeriesDescription=desc, SeriesNumber=number, InstanceNumber=inst, PatientID=pid,
                    ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                    ImagePositionPatient=[0, 0, float(position(inst) if position else inst)])
        if acq:
            tags["AcquisitionTime"] = acq
        write_dicom(os.path.join(folder, f"1-{k + 1:03d}.dcm"), arr, **tags)


def write_table(root, pids, box=BOX):
    with open(os.path.join(root, "Annotation_Boxes.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Patient ID", "Start Row", "End Row", "Start Column", "End Column",
                     "Start Slice", "End Slice"])
        w.writerows([[p, *box] for p in pids])


def write_patients(root, patients):
    for pid, series in patients.items():
        for spec in series:
            write_series(root, pid, *spec)
    write_table(root, list(patients))


def chosen(recs, pid):
    return recs.provenance["duke_series"][pid]["description"]


@pytest.mark.parametrize("desc,expected", [
    ("ax dyn pre", ("dynamic", 0)), ("ax dyn 1st pass", ("dynamic", 1)),
    ("ax 3d dyn 2nd pass", ("dynamic", 2)), ("1st ax dyn", ("dynamic", 1)),
    ("ax dyn 1st pas", ("dynamic", 1)), ("t1_fl3d_tra_dynVIEWS_spair 1st pass", ("dynamic", 1)),
    ("t1_fl3d_tra_dynVIEWS_spair_ pre", ("dynamic", 0)), ("ax 3d pre", ("dynamic", 0)),
    ("ax 3d dyn", ("dynamic", None)), ("ax dynamic", ("dynamic", None)),
    ("Ax Vibrant MultiPhase", ("dynamic", None)), ("ax 3d dyn MP", ("dynamic", None)),
    ("Ph1/ax 3d dyn", ("dynamic", 1)), ("Ph1ax 3d dyn", ("dynamic", 1)),
    ("Ph3/Ax Vibrant MultiPhase", ("dynamic", 3)), ("Ph4/ax dynamic", ("dynamic", 4)),
    ("ax t1", ("t1", None)), ("ax t1 pre", ("t1", None)), ("ax t1 +c", ("t1", None)),
    ("Ax 3D T1 NON FS", ("t1", None)), ("ax 3d t1 bilateral", ("t1", None)),
    ("AX IDEAL Breast", ("t1", None)), ("ax t1 tse +c", ("t1", None)), ("SEG", ("other", None)),
])
def test_series_names_of_both_conventions(desc, expected):
    assert classify(desc) == expected


def test_series_choice_both_conventions(tmp_path, caplog):
    root = str(tmp_path)
    write_patients(root, {"Breast_MRI_001": NAMED, "Breast_MRI_002": BARE_GE,
                          "Breast_MRI_003": BARE_3D, "Breast_MRI_004": NO_FIRST,
                          "Breast_MRI_005": TWO_BARE_UNTIMED, "Breast_MRI_006": TWO_BARE_TIMED,
                          "Breast_MRI_007": CONTRADICTED, "Breast_MRI_008": ONLY_PHASED})
    with caplog.at_level(logging.WARNING, logger="avpt.data.duke"):
        post = load_records("duke", root, options={"phase": "post"})
    assert chosen(post, "Breast_MRI_001") == "ax dyn 1st pass"
    assert chosen(post, "Breast_MRI_002") == "Ph1/Ax Vibrant MultiPhase"     # not "ax t1" (no. 3)
    assert chosen(post, "Breast_MRI_003") == "Ph1/ax 3d dyn"
    assert chosen(post, "Breast_MRI_006") == "ax dynamic"                    # the later of two
    assert post.provenance["duke_series"]["Breast_MRI_006"]["series_number"] == 9
    assert "acquisition time" in post.provenance["duke_series"]["Breast_MRI_006"]["chosen"]
    skipped = post.provenance["duke_unresolved"]
    assert set(skipped) == {"Breast_MRI_004", "Breast_MRI_005", "Breast_MRI_007"}
    assert "no first post-contrast" in skipped["Breast_MRI_004"]
    assert "no distinct acquisition times" in skipped["Breast_MRI_005"]
    assert "contradict" in skipped["Breast_MRI_007"]
    summary = [r.getMessage() for r in caplog.records if "skipped 3 of 8" in r.getMessage()]
    assert len(summary) == 1 and all(p in summary[0] for p in skipped)
    assert chosen(post, "Breast_MRI_008") == "Ph1/ax dyn"                    # no pre needed
    assert {r.patient_id for r in post} == {f"duke-Breast_MRI_00{i}" for i in (1, 2, 3, 6, 8)}
    assert all(("1st pass" in r.source or "Ph1" in r.source or "9.000000" in r.source) for r in post)

    pre = load_records("duke", root, options={"phase": "pre"})
    assert chosen(pre, "Breast_MRI_001") == "ax dyn pre"
    assert chosen(pre, "Breast_MRI_002") == "Ax Vibrant MultiPhase"          # not "ax t1 pre"
    assert chosen(pre, "Breast_MRI_003") == "ax 3d dyn"                      # by series number
    assert chosen(pre, "Breast_MRI_004") == "ax dyn pre"                     # pre needs no phase 1
    assert pre.provenance["duke_series"]["Breast_MRI_006"]["series_number"] == 8
    assert set(pre.provenance["duke_unresolved"]) == {"Breast_MRI_005", "Breast_MRI_007",
                                                      "Breast_MRI_008"}
    assert "0 pre-contrast" in pre.provenance["duke_unresolved"]["Breast_MRI_008"]
    pos = next(r for r in pre if r.patient_id == "duke-Breast_MRI_002" and r.label == 1)
    assert os.path.basename(os.path.dirname(pos.source)).startswith("600.000000-Ax Vibrant")


def test_unresolved_refused_in_one_line(tmp_path):
    root = str(tmp_path)
    write_patients(root, {"Breast_MRI_001": NAMED, "Breast_MRI_004": NO_FIRST})
    with pytest.raises(DataError) as err:
        load_records("duke", root, options={"unresolved": "error"})
    msg = str(err.value)
    assert "\n" not in msg and "Breast_MRI_004" in msg and "no first post-contrast" in msg
    assert "data.unresolved=skip" in msg
    only_bad = str(tmp_path / "bad")
    write_patients(only_bad, {"Breast_MRI_004": NO_FIRST})
    with pytest.raises(DataError, match="no patient with a resolvable post-contrast series"):
        load_records("duke", only_bad)


def test_annotation_indexing_instance_order_and_one_based(tmp_path):
    """Files named against InstanceNumber, positions running against it: Start/End Slice count
    1-based along InstanceNumber; ``slice_order=position`` counts along the position."""
    root = str(tmp_path)
    n = N_SLICES
    pid = "Breast_MRI_010"
    write_series(root, pid, 3, "ax dyn pre", "102000", 500, instance=lambda k: n - k,
                 position=lambda inst: -inst)
    write_series(root, pid, 4, "ax dyn 1st pass", "103000", 1500, instance=lambda k: n - k,
                 position=lambda inst: -inst)
    write_table(root, [pid], box=(5, 12, 4, 10, 22, 22))
    rec = next(r for r in load_records("duke", root, options={"slices_per_lesion": 1}) if r.label)
    assert rec.sample_id == f"duke-{pid}-s22"
    import pydicom
    assert int(pydicom.dcmread(rec.source).InstanceNumber) == 22            # not file 1-022.dcm
    raw = rec.load()
    assert raw.mask.sum() == (12 - 5 + 1) * (10 - 4 + 1)                    # inclusive ends
    assert raw.mask[4, 3] and raw.mask[11, 9] and not raw.mask[12, 9] and not raw.mask[4, 10]
    by_pos = next(r for r in load_records("duke", root, options={"slices_per_lesion": 1,
                                                                 "slice_order": "position"})
                  if r.label)
    assert int(pydicom.dcmread(by_pos.source).InstanceNumber) == n + 1 - 22   # ascending z
    zero = next(r for r in load_records("duke", root, options={"slices_per_lesion": 1,
                                                               "index_base": 0}) if r.label)
    assert int(pydicom.dcmread(zero.source).InstanceNumber) == 23


def test_slice_sampling_rule(tmp_path):
    assert positive_slices(19, 23, 3) == [19, 21, 22]       # across the box, End Slice left out
    assert positive_slices(19, 20, 3) == [19] and positive_slices(19, 19, 2) == [19]
    assert positive_slices(10, 30, 1) == [20]
    cands = negative_candidates(40, 19, 23)
    assert cands == [k for k in range(6, 34) if k <= 14 or k >= 28]
    assert negative_candidates(12, 4, 6) == []                             # nothing far enough
    root = str(tmp_path)
    pids = [f"Breast_MRI_0{i}" for i in (20, 21, 22)]
    write_patients(root, {p: NAMED[1:3] for p in pids})
    opts = {"negatives_per_patient": 3, "slices_per_lesion": 3}
    a = load_records("duke", root, seed=0, options=opts)
    negs = {r.sample_id for r in a if r.label == 0}
    assert len(negs) == 9 and all(r.load().mask.sum() == 0 for r in a if r.label == 0)
    assert all(int(s.rsplit("-s", 1)[1]) in NEG_ALLOWED_1B for s in negs)  # never an edge slice
    assert {r.sample_id for r in a if r.label} == {f"duke-{p}-s{k}" for p in pids
                                                   for k in (20, 22, 23)}
    assert negs == {r.sample_id for r in load_records("duke", root, seed=0, options=opts)
                    if r.label == 0}                                       # seeded
    assert negs != {r.sample_id for r in load_records("duke", root, seed=1, options=opts)
                    if r.label == 0}


def test_intensity_per_volume_keeps_the_enhancing_top(tmp_path):
    """A bright 3x3 blob on one slice stays at the top of the range, and a slice without it
    is not stretched to full range as a per-slice percentile window would do."""
    root = str(tmp_path)
    pid = "Breast_MRI_030"
    write_series(root, pid, 3, "ax dyn pre", "102000", 500)
    write_series(root, pid, 4, "ax dyn 1st pass", "103000", 1500, blob_slice=22)
    write_table(root, [pid])
    recs = load_records("duke", root, options={"slices_per_lesion": 3, "negatives_per_patient": 1})
    pos = next(r for r in recs if r.sample_id.endswith("-s22")).load()
    neg = next(r for r in recs if r.label == 0).load()
    assert pos.image[6:9, 6:9].min() == 1.0
    tissue = np.delete(pos.image.ravel(), [i * SIZE + j for i in range(6, 9) for j in range(6, 9)])
    assert tissue.max() < 0.2 and neg.image.max() < 0.2


def test_chosen_series_recorded_in_the_run(tmp_path):
    from avpt.config import DEFAULTS
    from avpt.run_data import build_data

    root = str(tmp_path / "data")
    write_patients(root, {"Breast_MRI_001": NAMED, "Breast_MRI_004": NO_FIRST})
    cfg = dict(DEFAULTS, dataset="duke", data_root=root, fold=None, clahe=False,
               data={"slices_per_lesion": 1, "negatives_per_patient": 1})
    _, _, info = build_data(cfg, 16, str(tmp_path / "out"))
    assert info["duke_series"]["Breast_MRI_001"]["description"] == "ax dyn 1st pass"
    assert info["duke_series"]["Breast_MRI_001"]["slice_order"] == "InstanceNumber"
    assert "Breast_MRI_004" in info["duke_unresolved"]


def test_several_phases_in_one_series_unresolved(tmp_path):
    """A series holding two acquisitions per slice position (unique InstanceNumbers) is not
    taken as one volume of twice the slices."""
    root = str(tmp_path)
    pid = "Breast_MRI_040"
    write_series(root, pid, 600, "Ax Vibrant MultiPhase", "102000", 500,
                 position=lambda inst: (inst - 1) % (N_SLICES // 2))
    write_series(root, pid, 601, "Ph1/Ax Vibrant MultiPhase", "103000", 1500)
    write_patients(root, {"Breast_MRI_001": NAMED})
    write_table(root, ["Breast_MRI_001", pid], box=(5, 12, 4, 10, 12, 13))
    for phase in ("pre", "post"):   # the pre series is checked when it is the one read
        recs = load_records("duke", root, options={"phase": phase})
        if phase == "pre":
            assert "20 positions (several phases" in recs.provenance["duke_unresolved"][pid]
        else:
            assert chosen(recs, pid) == "Ph1/Ax Vibrant MultiPhase"


@pytest.mark.parametrize("table", ["xlsx", "csv"])
def test_annotation_table_formats(tmp_path, table):
    root = str(tmp_path)
    write_patients(root, {"Breast_MRI_001": NAMED[1:3]})
    if table == "xlsx":
        import openpyxl
        os.remove(os.path.join(root, "Annotation_Boxes.csv"))
        wb = openpyxl.Workbook()
        wb.active.append(["Patient ID", "Start Row", "End Row", "Start Column", "End Column",
                          "Start Slice", "End Slice"])
        wb.active.append(["Breast_MRI_001", *BOX])
        wb.save(os.path.join(root, "Annotation_Boxes.xlsx"))
    recs = load_records("duke", root, options={"slices_per_lesion": 1})
    assert [r.sample_id for r in recs if r.label] == ["duke-Breast_MRI_001-s22"]


def test_corrupt_and_inconsistent(tmp_path):
    root = str(tmp_path)
    write_patients(root, {"Breast_MRI_001": NAMED[1:3], "Breast_MRI_002": NAMED[1:3]})
    bad = os.path.join(root, "Duke-Breast-Cancer-MRI", "Breast_MRI_002", STUDY)
    bad = os.path.join(bad, next(d for d in os.listdir(bad) if "1st pass" in d), "1-005.dcm")
    with open(bad, "wb") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(DataError, match="1-005.dcm"):
        load_records("duke", root)
    os.remove(bad)
    with open(os.path.join(root, "Annotation_Boxes.csv"), "a") as f:
        f.write("Breast_MRI_003,1,2,3,4,5,x\n")
    with pytest.raises(DataError, match="Annotation_Boxes.csv"):
        load_records("duke", root)
    write_table(root, ["Breast_MRI_001", "Breast_MRI_002"], box=(5, 12, 4, 10, 38, 41))
    with pytest.raises(DataError, match="outside the 40 slices"):
        load_records("duke", root)


@pytest.mark.parametrize("key,value,accepted", [
    ("unresolved", "maybe", "'skip' or 'error'"), ("slice_order", "z", "'instance' or 'position'"),
    ("negative_gap", 0, "an integer >= 1"), ("edge_margin", 0.5, r"a number in \[0, 0.5\)"),
])
def test_new_loader_settings_checked_in_one_line(key, value, accepted):
    from avpt.errors import ConfigError
    from avpt.validate import _data_settings

    with pytest.raises(ConfigError, match=f"data.{key} must be {accepted}, got"):
        _data_settings({"dataset": "duke", "test_dataset": None, "data": {key: value}})
    _data_settings({"dataset": "duke", "test_dataset": None,
                    "data": {"unresolved": "error", "slice_order": "position", "negative_gap": 3,
                             "edge_margin": 0.0}})
