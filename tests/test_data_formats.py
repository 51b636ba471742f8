"""INbreast (and BUSI's classes) on small files written in their exact formats (DICOM via
pydicom, OsiriX plist XML, the ;-separated BI-RADS table), including corrupt files. Duke is in
tests/test_duke.py."""
import csv
import os
import plistlib

import numpy as np
import pytest

from avpt.data import BreastDataset, DataError, load_records
from avpt.data.inbreast import birads_rank


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


# Duke-Breast-Cancer-MRI: tests/test_duke.py (both naming conventions, indexing, sampling).


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
