"""INbreast and Duke-Breast-Cancer-MRI loaders on small files written in their exact formats
(DICOM via pydicom, OsiriX plist XML, the ;-separated BI-RADS table, Annotation_Boxes xlsx/csv),
including corrupt files."""
import csv
import os
import plistlib

import numpy as np
import pytest

from avpt.data import BreastDataset, DataError, load_records
from avpt.data.inbreast import birads_rank

# The GPU tier leaves these out: not a device path (data readers).
pytestmark = pytest.mark.cpu_only


def write_dicom(path, arr, **tags):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = tags.pop("PhotometricInterpretation", "MONOCHROME2")
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = arr.astype(np.uint16).tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)        # pydicom >= 3
    except TypeError:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)       # pydicom 2.x


# ----------------------------------------------------------------------------------------------
# INbreast
# ----------------------------------------------------------------------------------------------
INBREAST = [  # file name, patient hash, BI-RADS, has ROI xml
    ("20586908", "6c613a14b80a8591", "2", False),
    ("20586934", "6c613a14b80a8591", "4c", True),
    ("22678622", "61b13c59bcba149e", "3", True),
    ("22678646", "61b13c59bcba149e", "5", True),
    ("24055274", "7da6b4a22bd2d2a6", "4", False),
]


def write_inbreast(root, size=48):
    rng = np.random.default_rng(0)
    with open(os.path.join(root, "INbreast.csv"), "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Patient ID", "Patient age", "Laterality", "View", "Acquisition date",
                    "File Name", "ACR", "Bi-Rads"])
        for name, _, birads, _ in INBREAST:
            w.writerow(["removed", "", "R", "CC", "201001", name, "2", birads])
    for name, patient, _, roi in INBREAST:
        write_dicom(os.path.join(root, "AllDICOMs", f"{name}_{patient}_MG_R_CC_ANON.dcm"),
                    rng.integers(0, 4000, (size, size + 8)))
        if roi:
            os.makedirs(os.path.join(root, "AllXML"), exist_ok=True)
            plist = {"Images": [{"ImageIndex": 0, "NumberOfROIs": 2, "ROIs": [
                {"Name": "Mass", "NumberOfPoints": 4,
                 "Point_px": ["(10.0, 5.0)", "(20.0, 5.0)", "(20.0, 15.0)", "(10.0, 15.0)"]},
                {"Name": "Calcification", "NumberOfPoints": 1, "Point_px": ["(30.0, 30.0)"]}]}]}
            with open(os.path.join(root, "AllXML", f"{name}.xml"), "wb") as f:
                plistlib.dump(plist, f)


def test_birads_order():
    assert birads_rank("4") == birads_rank("4a") < birads_rank("4B") < birads_rank("5")
    with pytest.raises(DataError, match="BI-RADS"):
        birads_rank("7")


def test_inbreast_loader(tmp_path):
    root = str(tmp_path)
    write_inbreast(root)
    recs = load_records("inbreast", root)
    assert [r.label for r in recs] == [0, 1, 0, 1, 1]          # 4a and above malignant
    assert len({r.patient_id for r in recs}) == 3                # grouped by the file-name hash
    assert [r.label for r in load_records("inbreast", root, options={"birads_threshold": "4c"})] \
        == [0, 1, 0, 1, 0]
    with_roi = recs[1].load()
    assert with_roi.mask.sum() == 11 * 11                        # polygon filled, point ROI ignored
    assert with_roi.mask[10, 15] and not with_roi.mask[30, 30]
    assert not recs[0].load().mask.any()                         # no XML: no lesion
    assert {r.modality for r in recs} == {"MG"}


def test_inbreast_corrupt_files(tmp_path):
    root = str(tmp_path)
    write_inbreast(root)
    bad = os.path.join(root, "AllDICOMs", "22678622_61b13c59bcba149e_MG_R_CC_ANON.dcm")
    with open(bad, "wb") as f:
        f.write(b"not a dicom file at all")
    recs = load_records("inbreast", root)
    with pytest.raises(DataError, match="22678622_61b13c59bcba149e_MG_R_CC_ANON.dcm"):
        BreastDataset(recs, 32)
    assert len(BreastDataset(recs, 32, skip_bad=True)) == 4
    with open(os.path.join(root, "AllXML", "20586934.xml"), "w") as f:
        f.write("<plist><dict><key>Images</key>")           # truncated XML
    with pytest.raises(DataError, match="20586934.xml"):
        BreastDataset(load_records("inbreast", root), 32, skip_bad=False)


# ----------------------------------------------------------------------------------------------
# Duke
# ----------------------------------------------------------------------------------------------
def write_duke(root, table="xlsx", n_slices=8, size=32):
    rng = np.random.default_rng(1)
    boxes = {"Breast_MRI_001": (5, 12, 8, 20, 3, 5), "Breast_MRI_002": (10, 20, 4, 14, 5, 6)}
    for pid in boxes:
        for series, desc in ((3, "ax dyn pre"), (4, "ax dyn 1st pass")):
            for k in range(n_slices):
                path = os.path.join(root, "Duke-Breast-Cancer-MRI", pid, "01-01-1990-NA-MRI",
                                    f"{series}.000000-{desc}", f"1-{k + 1:03d}.dcm")
                value = 500 if series == 3 else 1500
                arr = rng.integers(0, 200, (size, size)) + value
                write_dicom(path, arr, SeriesInstanceUID=f"1.2.3.{int(pid[-3:])}.{series}",
                            SeriesDescription=desc, SeriesNumber=series, InstanceNumber=k + 1,
                            PatientID=pid)
    header = ["Patient ID", "Start Row", "End Row", "Start Column", "End Column", "Start Slice", "End Slice"]
    rows = [[pid, *b] for pid, b in boxes.items()]
    if table == "xlsx":
        import openpyxl
        wb = openpyxl.Workbook()
        ws = wb.active
        ws.append(header)
        for r in rows:
            ws.append(r)
        wb.save(os.path.join(root, "Annotation_Boxes.xlsx"))
    else:
        with open(os.path.join(root, "Annotation_Boxes.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    return boxes


@pytest.mark.parametrize("table", ["xlsx", "csv"])
def test_duke_loader(tmp_path, table):
    root = str(tmp_path)
    write_duke(root, table)
    recs = load_records("duke", root, options={"slices_per_lesion": 2, "negatives_per_patient": 1})
    by_id = {r.sample_id: r for r in recs}
    # patient 1: box slices 3..5 (1-based) -> central 2 slices 4, 3 (ties to the lower); one
    # negative at least 3 slices away from the box: slice 8
    assert sorted(i for i in by_id if "001" in i) == ["duke-Breast_MRI_001-s3", "duke-Breast_MRI_001-s4",
                                                      "duke-Breast_MRI_001-s8"]
    pos = by_id["duke-Breast_MRI_001-s4"].load()
    assert pos.mask.sum() == (12 - 5 + 1) * (20 - 8 + 1)
    assert pos.mask[4, 7] and not pos.mask[3, 7] and pos.mask[11, 19] and not pos.mask[12, 19]
    neg = by_id["duke-Breast_MRI_001-s8"]
    assert neg.label == 0 and not neg.load().mask.any()
    assert {r.patient_id for r in recs} == {"duke-Breast_MRI_001", "duke-Breast_MRI_002"}
    # phase selection: post-contrast slices are the bright series
    post_img = by_id["duke-Breast_MRI_001-s4"].source
    assert "1st pass" in post_img
    pre = load_records("duke", root, options={"phase": "pre", "slices_per_lesion": 1})
    assert all("pre" in r.source for r in pre)


def test_duke_corrupt_and_inconsistent(tmp_path):
    root = str(tmp_path)
    write_duke(root, "csv")
    bad = os.path.join(root, "Duke-Breast-Cancer-MRI", "Breast_MRI_002", "01-01-1990-NA-MRI",
                       "4.000000-ax dyn 1st pass", "1-005.dcm")
    with open(bad, "wb") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(DataError, match="1-005.dcm"):
        load_records("duke", root)
    os.remove(bad)
    with open(os.path.join(root, "Annotation_Boxes.csv"), "a") as f:
        f.write("Breast_MRI_003,1,2,3,4,5,x\n")
    with pytest.raises(DataError, match="Annotation_Boxes.csv"):
        load_records("duke", root)


def test_busi_three_classes(tmp_path):
    """normal="class": normal / benign / malignant are labels 0 / 1 / 2; the default is unchanged."""
    from .test_data import write_busi

    write_busi(str(tmp_path), n_per_class=2, size=24)
    three = {r.sample_id: r.label for r in load_records("busi", str(tmp_path), options={"normal": "class"})}
    assert three == {"busi-normal-1": 0, "busi-normal-2": 0, "busi-benign-1": 1, "busi-benign-2": 1,
                     "busi-malignant-1": 2, "busi-malignant-2": 2}
    default = {r.sample_id: r.label for r in load_records("busi", str(tmp_path))}
    assert default["busi-normal-1"] == 0 and default["busi-benign-1"] == 0 and default["busi-malignant-1"] == 1
    with pytest.raises(ValueError, match="normal must be one of"):
        load_records("busi", str(tmp_path), options={"normal": "classes"})
