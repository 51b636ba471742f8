"""INbreast (and BUSI's classes) on small files written in their exact formats (DICOM via
pydicom, OsiriX plist XML, the ;-separated BI-RADS table), including corrupt files. Duke is in
tests/test_duke.py."""
import csv
import os
import plistlib

import numpy as np
import pytest

from avpt.data import BreastDataset, DataError, load_records
from avpt.data.inbreast import birads_rank, read_rois, roi_type
from avpt.data.mammo import chest_wall_left, laterality

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
ROWS, COLS = 120, 96                    # portrait, as a 4084 x 3328 mammogram
TISSUE, MASS, CALC, BACKGROUND = 1200, 2200, 4000, 40
MASS_ROWS, MASS_DIST = (50, 61), (20, 31)     # rows, distance from the chest wall (end-exclusive)
CALC_ROWS, CALC_DIST = (30, 33), (40, 43)     # a 3x3 microcalcification: 0.08% of the image
INBREAST = [  # file name, patient hash, BI-RADS, ROI names (None: no XML), laterality, tags
    ("20586908", "6c613a14b80a8591", "2", None, "L", {"ImageLaterality": "L"}),
    ("20586934", "6c613a14b80a8591", "4c", ("Mass", "Calcification"), "R", {"ImageLaterality": "R"}),
    ("22678622", "61b13c59bcba149e", "3", ("Espiculated Region",), "L", {}),   # file name only
    ("22678646", "61b13c59bcba149e", "5", ("Assymetry",), "R",
     {"ImageLaterality": "R", "WindowCenter": 2000, "WindowWidth": 2000}),
    ("24055274", "7da6b4a22bd2d2a6", "4", None, "R",
     {"ImageLaterality": "R", "PhotometricInterpretation": "MONOCHROME1"}),
]


def mammogram(lat, seed=0):
    """[ROWS, COLS] raw pixels as displayed: a half-ellipse breast on the chest wall edge (left
    for L, right for R), a uniform mass and a 3x3 calcification; and the column map."""
    rng = np.random.default_rng(seed)
    r, d = np.mgrid[:ROWS, :COLS]                       # d: distance from the chest wall
    breast = ((r - ROWS / 2) / (ROWS / 2.4)) ** 2 + (d / (0.75 * COLS)) ** 2 <= 1
    img = np.where(breast, TISSUE + rng.integers(0, 300, (ROWS, COLS)),
                   BACKGROUND + rng.integers(0, 10, (ROWS, COLS)))
    img[slice(*MASS_ROWS), slice(*MASS_DIST)] = MASS
    img[slice(*CALC_ROWS), slice(*CALC_DIST)] = CALC
    col = (lambda dist: COLS - 1 - dist) if lat == "R" else (lambda dist: dist)
    return (img[:, ::-1] if lat == "R" else img), col


def mass_polygon(col):
    c0, c1 = sorted((col(MASS_DIST[0]), col(MASS_DIST[1] - 1)))
    r0, r1 = MASS_ROWS[0], MASS_ROWS[1] - 1
    return [f"({x:.6f}, {y:.6f})" for x, y in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))]


def write_inbreast(root):
    with open(os.path.join(root, "INbreast.csv"), "w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f, delimiter=";")                 # ;-separated, BOM, empty trailing row
        w.writerow(["Patient ID", "Patient age", "Laterality", "View", "Acquisition date",
                    "File Name", "ACR", "Bi-Rads"])
        for name, _, birads, _, lat, _ in INBREAST:
            w.writerow(["removed", "", lat, "CC", "201001", name, "2", birads])
        w.writerow([""] * 8)
    for i, (name, patient, _, rois, lat, tags) in enumerate(INBREAST):
        img, col = mammogram(lat, i)
        tags = dict(tags)
        if tags.get("PhotometricInterpretation") == "MONOCHROME1":
            img = 20000 - img
        write_dicom(os.path.join(root, "AllDICOMs", f"{name}_{patient}_MG_{lat}_CC_ANON.dcm"),
                    img, **tags)
        if rois:
            os.makedirs(os.path.join(root, "AllXML"), exist_ok=True)
            # as OsiriX writes them: Point_px "(x, y)" with 6 decimals, Point_mm, Area, Center...
            items = [{"Name": rois[0], "NumberOfPoints": 4, "Point_px": mass_polygon(col),
                      "Point_mm": ["(1.0, 2.0, 0.0)"] * 4, "Area": 0.6, "Center": "(1.0, 2.0, 0.0)",
                      "IndexInImage": 0, "Type": 15}]
            if len(rois) > 1:
                items.append({"Name": rois[1], "NumberOfPoints": 1, "Type": 19,
                              "Point_px": [f"({col(CALC_DIST[0] + 1):.6f}, {CALC_ROWS[0] + 1:.6f})"]})
            plist = {"Images": [{"ImageIndex": 0, "ImageHeight": ROWS, "ImageWidth": COLS,
                                 "NumberOfROIs": len(items), "ROIs": items}]}
            with open(os.path.join(root, "AllXML", f"{name}.xml"), "wb") as f:
                plistlib.dump(plist, f)


def test_birads_order():
    assert birads_rank("4") == birads_rank("4a") < birads_rank("4B") < birads_rank("5")
    with pytest.raises(DataError, match="BI-RADS"):
        birads_rank("7")


def test_inbreast_labels_table_and_grouping(tmp_path):
    root = str(tmp_path)
    write_inbreast(root)
    recs = load_records("inbreast", root)
    assert [r.label for r in recs] == [0, 1, 0, 1, 1]          # 4a and above malignant
    assert len({r.patient_id for r in recs}) == 3                # grouped by the file-name hash
    assert [r.label for r in load_records("inbreast", root, options={"birads_threshold": "4c"})] \
        == [0, 1, 0, 1, 0]
    assert {r.modality for r in recs} == {"MG"}
    assert not recs[0].load().mask.any()                         # no XML: no lesion


def test_inbreast_roi_polygons_to_the_pixel(tmp_path, caplog):
    root = str(tmp_path)
    write_inbreast(root)
    mask = read_rois(os.path.join(root, "AllXML", "20586934.xml"), (ROWS, COLS))
    c0, c1 = COLS - MASS_DIST[1], COLS - 1 - MASS_DIST[0]        # the R file's mass columns
    expect = np.zeros((ROWS, COLS), bool)
    expect[slice(*MASS_ROWS), c0:c1 + 1] = True
    assert (mask == expect).all()                                # filled, point ROI left out
    for name in ("22678622", "22678646"):                        # misspelt names still lesions
        assert read_rois(os.path.join(root, "AllXML", f"{name}.xml"), (ROWS, COLS)).sum() == 11 * 11
    other = os.path.join(root, "AllXML", "other.xml")
    with open(other, "wb") as f:
        plistlib.dump({"Images": [{"ROIs": [{"Name": "Pectoral", "Point_px": mass_polygon(
            lambda d: d)}]}]}, f)
    with caplog.at_level("WARNING"):
        assert read_rois(other, (ROWS, COLS)).sum() == 11 * 11
    assert "'Pectoral' is not one of INbreast's lesion types" in caplog.text
    assert [roi_type(n) for n in ("Espiculated Region", "Assymetry", "Calcifications", " mass ",
                                  "Cluster", "Distortion", "Pectoral")] == \
        ["spiculated region", "asymmetry", "calcification", "mass", "cluster", "distortion", "other"]


def _breast_bbox(image, level):
    rows, cols = np.nonzero(image > level)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def test_mammogram_orientation_crop_and_aspect(tmp_path):
    """Both lateralities end with the chest wall on the left, cropped to the breast, padded
    square (the breast's height/width unchanged) and the mask still on the mass."""
    root = str(tmp_path)
    write_inbreast(root)
    recs = {r.sample_id: r for r in load_records("inbreast", root, options={"window": False})}
    for sid in ("inbreast-20586908", "inbreast-20586934", "inbreast-22678622"):
        raw = recs[sid].load()
        img, mask = raw.image, raw.mask
        assert img.shape[0] == img.shape[1]                      # square: resize keeps aspect
        r0, r1, c0, c1 = _breast_bbox(img, 0.15)
        assert c0 <= 2                                           # chest wall on the left edge
        assert img[:, -img.shape[1] // 4:].max() < 0.15          # right of the breast: background
        src, _ = mammogram("L")
        s0, s1, t0, t1 = _breast_bbox(src, 600)
        assert (r1 - r0, c1 - c0) == (s1 - s0, t1 - t0)           # aspect of the breast kept
        assert img.shape[0] <= ROWS                              # cropped to the breast
        if mask.any():
            mass_level = img[mask]
            assert mask.sum() == 11 * 11 and np.ptp(mass_level) < 1e-6      # exactly the mass
            rows, cols = np.nonzero(mask)
            assert cols.min() - c0 == MASS_DIST[0]               # distance from the chest wall


def test_mammogram_keeps_the_calcification(tmp_path):
    """The 3x3 calcification (0.08% of the pixels) stays brighter than any tissue; a 99.5
    percentile clip, the former preprocessing, flattens it into the tissue."""
    from avpt.data.dicom import read_image
    from avpt.data.records import to_unit

    root = str(tmp_path)
    write_inbreast(root)
    recs = {r.sample_id: r for r in load_records("inbreast", root)}
    for sid in ("inbreast-20586908", "inbreast-24055274"):       # MONOCHROME2, MONOCHROME1
        img = recs[sid].load().image
        top = np.sort(img.ravel())
        calc, tissue = top[-9:], top[:-9]
        assert calc.min() > tissue.max() + 0.2 and calc.min() == 1.0
    pixels, _ = read_image(recs["inbreast-20586908"].source)
    old = to_unit(pixels)
    assert (old >= 1.0).sum() > 9                                # old: calc = brightest tissue


def test_mammogram_window_from_tags(tmp_path):
    root = str(tmp_path)
    write_inbreast(root)
    rec = next(r for r in load_records("inbreast", root) if r.sample_id == "inbreast-22678646")
    raw = rec.load()
    # LINEAR window, centre 2000, width 2000 (DICOM PS3.3 C.11.2.1.2): the mass at 2200
    assert np.allclose(raw.image[raw.mask], (2200 - 1999.5) / 1999 + 0.5, atol=1e-6)
    full = next(r for r in load_records("inbreast", root, options={"window": False})
                if r.sample_id == "inbreast-22678646").load()
    assert full.image.max() == 1.0 and full.image[full.mask].max() < 0.6


def test_laterality_header_then_file_name(caplog):
    from pydicom.dataset import Dataset

    ds = Dataset()
    assert laterality(ds, "x/1_ab_MG_L_CC_ANON.dcm") == "L"
    ds.ImageLaterality = "R"
    with caplog.at_level("WARNING"):
        assert laterality(ds, "x/1_ab_MG_L_CC_ANON.dcm") == "R"
    assert "file name says L" in caplog.text
    assert laterality(Dataset(), "x/image.dcm") is None
    right, _ = mammogram("R")                                    # no laterality: by content
    assert chest_wall_left(right.astype(float), None) and not chest_wall_left(right[:, ::-1], None)


def test_inbreast_corrupt_files(tmp_path):
    root = str(tmp_path)
    write_inbreast(root)
    bad = os.path.join(root, "AllDICOMs", "22678622_61b13c59bcba149e_MG_L_CC_ANON.dcm")
    with open(bad, "wb") as f:
        f.write(b"not a dicom file at all")
    recs = load_records("inbreast", root)
    with pytest.raises(DataError, match="22678622_61b13c59bcba149e_MG_L_CC_ANON.dcm"):
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


def test_resize_keeps_the_aspect_ratio():
    """A 40 x 20 image with a disc: square output, the disc still round, zero padding left and
    right, the mask (order 0) on the disc."""
    from avpt.data.transforms import resize

    r, c = np.mgrid[:40, :20]
    disc = ((r - 20) ** 2 + (c - 10) ** 2 <= 64).astype(np.float32)
    img, mask = resize(0.5 + 0.5 * disc, 32), resize(disc, 32, order=0) > 0.5
    assert img.shape == mask.shape == (32, 32)
    rows, cols = np.nonzero(mask)
    assert np.ptp(rows) == np.ptp(cols)                          # round, not stretched 2:1
    assert (img[:, :8] == 0).all() and (img[:, 24:] == 0).all() and img[:, 8:24].min() > 0.4
    assert img[mask].min() > 0.75 and img[mask].mean() > 0.9     # aligned with the disc


def test_voi_lut_table_from_the_file():
    """A VOI LUT Sequence (a table, not a window) maps through pydicom onto [0, 1] by the
    table's own output range."""
    from pydicom.dataset import Dataset

    from avpt.data.dicom import display_unit

    ds = Dataset()
    ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 16, 0
    table = np.linspace(100, 4000, 4096).astype(int)
    item = Dataset()
    item.LUTDescriptor, item.LUTData = [4096, 0, 12], table.tolist()
    ds.VOILUTSequence = [item]
    out = display_unit(np.array([[0.0, 1000.0], [2000.0, 5000.0]]), ds)
    assert np.allclose(out.ravel(), (table[[0, 1000, 2000, 4095]] - 100) / 3900, atol=1e-6)
