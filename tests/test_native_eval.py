"""`avpt eval` at the original resolution: on INbreast- and Duke-layout folders whose DICOM
headers give the pixel spacing, with the model's mask fixed to a known block, HD95 comes out in
millimetres at the images' own size and equals the hand-computed value; the spacing reader; the
report's unit and conventions."""
import csv
import dataclasses
import json
import math
import os
import plistlib

import numpy as np
import pytest
import torch

from avpt.cli import main
from avpt.data import DataError, load_records

from .test_cli import FAST, TINY_PHANTOM
from .test_data_formats import write_dicom

# The tiny backbone's input is 64 x 64; the fixtures' images are 128 x 128, twice that, so the
# model's mask (logits +1 on the input block [8, 24) x [8, 24), -1 elsewhere), resized back
# bilinearly on the half-pixel grid, is exactly the block [16, 48) x [16, 48) (a factor-2 resize
# keeps each pixel's sign: its own input pixel weighs >= 9/16). The truth is the 30 x 30 box
# [17, 47) x [17, 47) inside it: every boundary pixel of either is one row or one column from the
# other's, the corners (under 5%) farther, so HD95 = the larger of the row and column spacings
# (both conventions; tests/test_metrics.py checks the same case against MONAI and MedPy), Dice =
# 2 * 900 / (1024 + 900), IoU = 900 / 1024.
NATIVE = 128
BLOCK = (8, 24)
BOX = (17, 47)
DICE, IOU = 2 * 900 / (1024 + 900), 900 / 1024


def write_duke_native(root, spacing=(0.5, 0.7)):
    pid = "Breast_MRI_001"
    rng = np.random.default_rng(3)
    for series, desc in ((3, "ax dyn pre"), (4, "ax dyn 1st pass")):
        for k in range(20):  # room for a negative >= 5 slices from the box, off the ends
            path = os.path.join(root, "Duke-Breast-Cancer-MRI", pid, "01-01-1990-NA-MRI",
                                f"{series}.000000-{desc}", f"1-{k + 1:03d}.dcm")
            write_dicom(path, rng.integers(0, 2000, (NATIVE, NATIVE)),
                        SeriesInstanceUID=f"1.2.3.{series}", SeriesDescription=desc,
                        SeriesNumber=series, InstanceNumber=k + 1, PatientID=pid,
                        PixelSpacing=[str(s) for s in spacing])
    with open(os.path.join(root, "Annotation_Boxes.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Patient ID", "Start Row", "End Row", "Start Column", "End Column",
                    "Start Slice", "End Slice"])
        w.writerow([pid, BOX[0] + 1, BOX[1], BOX[0] + 1, BOX[1], 3, 5])   # 1-based, inclusive


def write_inbreast_native(root, spacing=(0.07, 0.05)):
    """One patient: left CC and MLO with the lesion box, right CC without (no XML)."""
    rng = np.random.default_rng(4)
    images = [("30000001", "L_CC", "5", True), ("30000002", "L_MLO", "5", True),
              ("30000003", "R_CC", "1", False)]
    with open(os.path.join(root, "INbreast.csv"), "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Patient ID", "Laterality", "View", "File Name", "Bi-Rads"])
        for name, view, birads, _ in images:
            w.writerow(["removed", view[0], view[2:], name, birads])
    lo, hi = BOX[0], BOX[1] - 1
    for name, view, _, roi in images:
        # a flat image: the loader's crop to the breast (avpt/data/mammo.py) then keeps all of
        # it, so the fixed block stays on the box (the model's mask is fixed, not read from it)
        write_dicom(os.path.join(root, "AllDICOMs", f"{name}_abcdef0123456789_MG_{view}_ANON.dcm"),
                    np.full((NATIVE, NATIVE), 3000 + int(rng.integers(0, 2))),
                    ImagerPixelSpacing=[str(s) for s in spacing])
        if roi:
            os.makedirs(os.path.join(root, "AllXML"), exist_ok=True)
            corners = [(lo, lo), (hi, lo), (hi, hi), (lo, hi)]
            plist = {"Images": [{"ROIs": [{"Name": "Mass", "Point_px": [
                f"({x:.1f}, {y:.1f})" for x, y in corners]}]}]}
            with open(os.path.join(root, "AllXML", f"{name}.xml"), "wb") as f:
                plistlib.dump(plist, f)


@pytest.fixture(scope="module")
def phantom_model(tmp_path_factory):
    """A 1-epoch tiny A-VPT on the phantom, scored with MedPy's HD95 convention."""
    out = tmp_path_factory.mktemp("native") / "run"
    assert main(["train", *TINY_PHANTOM, "--epochs", "1", "--out", str(out), "--set", "fold=null",
                 "--set", "report=false", "--set", "tensorboard=false",
                 "--set", "metrics.hd95=medpy"] + FAST) == 0
    return out


def test_eval_keeps_the_runs_metric_settings(phantom_model, tmp_path):
    """On the run's own data the run's metrics. settings hold (the figures equal the run's);
    the phantom has no spacing: pixels, at its original size (the model's input size)."""
    assert main(["eval", "--checkpoint", str(phantom_model), "--out", str(tmp_path / "ev")]
                + FAST) == 0
    ev = json.load(open(tmp_path / "ev" / "metrics.json"))["test"]
    assert ev == json.load(open(phantom_model / "metrics.json"))["test"]
    assert ev["hd95_convention"] == "medpy" and ev["hd95_unit"] == "px"
    assert ev["resolution"] == "native" and ev["seg_images"] + ev["empty_truth_images"] == ev["n"]


@pytest.fixture
def block_masks(monkeypatch):
    """Every model loaded by ``avpt eval`` predicts the input block BLOCK x BLOCK."""
    from avpt import checkpoint

    real = checkpoint.load_trainable

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        forward = model.forward

        def fixed(images, **kw):
            out = forward(images, **kw)
            seg = torch.full_like(out.seg_logits, -1.0)
            seg[..., BLOCK[0]:BLOCK[1], BLOCK[0]:BLOCK[1]] = 1.0
            return dataclasses.replace(out, seg_logits=seg)

        model.forward = fixed
        return model

    monkeypatch.setattr(checkpoint, "load_trainable", load)


@pytest.mark.parametrize("dataset, expected_mm, groups", [
    ("duke", 0.7, "[patient]"),          # PixelSpacing 0.5 (rows) x 0.7 (columns) mm
    ("inbreast", 0.07, "[patient,breast]"),  # ImagerPixelSpacing 0.07 x 0.05 mm
])
def test_eval_reports_hd95_in_mm_at_native_resolution(phantom_model, block_masks, tmp_path,
                                                      capsys, dataset, expected_mm, groups):
    root = tmp_path / "data"
    root.mkdir()
    (write_duke_native if dataset == "duke" else write_inbreast_native)(str(root))
    out = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(phantom_model), "--dataset", dataset,
                 "--data-root", str(root), "--out", str(out), "--set", "fold=null",
                 "--set", f"metrics.groups={groups}"] + FAST) == 0
    printed = capsys.readouterr().out
    test = json.load(open(out / "metrics.json"))["test"]
    assert test["hd95"] == pytest.approx(expected_mm, rel=1e-9)
    assert test["hd95_unit"] == "mm" and test["resolution"] == "native"
    assert test["dice"] == pytest.approx(DICE) and test["iou"] == pytest.approx(IOU)
    assert test["hd95_convention"] == "monai" and test["hd95_empty_prediction"] == "max"
    # Duke: positives from Start..End-1 of the 3-slice box (End Slice lies outside the tumour in
    # the data set's own extractor: docs/data.md) and 1 negative; INbreast: 2 lesion views
    lesions = 2
    assert test["seg_images"] == lesions and test["empty_truth_images"] == 1
    assert test["empty_truth_false_positives"] == 1 and test["empty_prediction_images"] == 0
    assert "(hd95 in mm, native resolution)" in printed
    by = json.load(open(out / "metrics.json"))["test_by"]
    assert by["patient"]["n"] == 1 and by["patient"]["hd95"] == pytest.approx(expected_mm)
    assert by["patient"]["hd95_unit"] == "mm"
    if dataset == "inbreast":                            # left breast (2 views), right breast
        assert by["breast"]["n"] == 2 and by["breast"]["seg_groups"] == 1
        assert by["breast"]["hd95"] == pytest.approx(expected_mm)


def test_bad_metric_settings_are_one_line_errors(phantom_model, tmp_path, capsys):
    for setting, message in (("metrics.hd95=hausdorff", "metrics.hd95 must be monai or medpy"),
                             ("metrics.groups=[breast]", "breast needs mammograms of known "
                                                         "laterality (dataset inbreast)")):
        assert main(["eval", "--checkpoint", str(phantom_model), "--out", str(tmp_path / "ev"),
                     "--set", setting] + FAST) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_read_spacing(tmp_path):
    from avpt.data.dicom import read_spacing

    arr = np.zeros((4, 5))
    cases = {"both": dict(PixelSpacing=["0.3", "0.4"], ImagerPixelSpacing=["0.5", "0.6"]),
             "imager": dict(ImagerPixelSpacing=["0.5", "0.6"]), "none": {},
             "one value": dict(PixelSpacing="0.5"), "negative": dict(PixelSpacing=["-0.5", "0.5"])}
    for name, tags in cases.items():
        write_dicom(str(tmp_path / f"{name}.dcm"), arr, **tags)
    assert read_spacing(str(tmp_path / "both.dcm")) == (0.3, 0.4)      # PixelSpacing first
    assert read_spacing(str(tmp_path / "imager.dcm")) == (0.5, 0.6)
    assert read_spacing(str(tmp_path / "none.dcm")) is None
    with pytest.raises(DataError, match="one value.dcm: PixelSpacing .* is not two numbers"):
        read_spacing(str(tmp_path / "one value.dcm"))
    with pytest.raises(DataError, match="negative.dcm: PixelSpacing .* not two positive"):
        read_spacing(str(tmp_path / "negative.dcm"))


def test_loaders_carry_spacing_and_laterality(tmp_path):
    write_inbreast_native(str(tmp_path))
    recs = load_records("inbreast", str(tmp_path))
    assert [r.laterality for r in recs] == ["L", "L", "R"]
    raw = recs[0].load()
    assert raw.spacing == (0.07, 0.05) and raw.mask.shape == (NATIVE, NATIVE)
    assert raw.mask.sum() == 900


def test_report_puts_the_unit_beside_hd95(tmp_path):
    from avpt.report import write_html

    test = {"auc": 0.9, "dice": 0.8, "hd95": 1.25, "hd95_unit": "mm", "resolution": "native",
            "hd95_convention": "monai", "hd95_empty_prediction": "max", "seg_images": 3,
            "empty_truth_images": 2, "empty_truth_false_positives": 1,
            "empty_prediction_images": 0}
    by = {"breast": dict(test, hd95=1.5, n=2)}
    html = open(write_html(str(tmp_path / "r.html"), "t", [("run", {"test": test, "test_by": by})],
                           {})).read()
    assert "<td>1.2500 mm</td>" in html and "run, per breast" in html and "1.5000 mm" in html
    assert "larger of the two directed 95th percentiles" in html
    assert "2 without a lesion left out (1 with a predicted mask)" in html
    assert math.isfinite(test["hd95"])
