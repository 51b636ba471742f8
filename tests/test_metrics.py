"""Metrics: Dice, IoU and HD95 against hand-computed values and against the field's libraries
(MONAI's compute_dice / compute_iou / compute_hausdorff_distance, MedPy's dc / jc / hd95: the
`dev` extra installs both) on random and adversarial mask pairs with anisotropic spacing; the
empty-mask rules and their counts; scoring at the original resolution; per-group scores; AUC/F1
against hand-counted cases; aggregation over folds."""
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from avpt import metrics as M

# The GPU tier leaves these out: not a device path (metrics on numpy arrays).
pytestmark = pytest.mark.cpu_only


def _square(n, y0, x0, s):
    m = np.zeros((n, n), bool)
    m[y0:y0 + s, x0:x0 + s] = True
    return m


def test_dice_iou_known_values():
    a = _square(20, 0, 0, 4)          # 16 px
    b = _square(20, 0, 2, 4)          # overlap 8 px
    assert M.dice(a, b) == pytest.approx(2 * 8 / 32)
    assert M.iou(a, b) == pytest.approx(8 / 24)
    assert M.dice(a, a) == 1.0 and M.iou(a, a) == 1.0
    assert M.dice(a, ~a) == 0.0


# ----------------------------------------------------------------------------------------------
# HD95 by hand
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("convention", ["monai", "medpy"])
def test_hd95_hand_computed_with_anisotropic_spacing(convention):
    # two single pixels: every distance is the one between them
    p, g = np.zeros((12, 16), bool), np.zeros((12, 16), bool)
    p[7, 11], g[2, 3] = True, True
    assert M.hd95(p, g, (0.5, 0.7), convention) == pytest.approx(math.hypot(5 * 0.5, 8 * 0.7))
    assert M.hd95(p, g, None, convention) == pytest.approx(math.hypot(5, 8))
    # a 32 x 32 box against the 30 x 30 box inside it: the boundaries are one row (0.5 mm) or one
    # column (0.7 mm) apart, only the 4 corners (hypot) farther: under 5% of either direction,
    # while over 5% of each is a column apart, so the 95th percentile is 0.7 mm in both
    # conventions (1 pixel without spacing)
    outer, inner = _square(40, 4, 4, 32), _square(40, 5, 5, 30)
    assert M.hd95(outer, inner, (0.5, 0.7), convention) == pytest.approx(0.7)
    assert M.hd95(inner, outer, (0.7, 0.5), convention) == pytest.approx(0.7)
    assert M.hd95(outer, inner, None, convention) == pytest.approx(1.0)
    assert M.hd95(outer, outer, (0.5, 0.7), convention) == 0.0


def test_hd95_conventions_differ_as_stated():
    # truth: a 20-pixel line; prediction: its first pixel. pred -> truth: [0]; truth -> pred:
    # 0, 1, ..., 19. MONAI: max(0, 95th pct of 0..19) = 0.95 * 19; MedPy: the 95th percentile of
    # the 21 pooled values 0, 0, 1, ..., 19 = 18
    g = np.zeros((3, 24), bool)
    g[1, 2:22] = True
    p = np.zeros_like(g)
    p[1, 2] = True
    assert M.hd95(p, g) == pytest.approx(0.95 * 19)
    assert M.hd95(p, g, convention="medpy") == pytest.approx(18.0)
    with pytest.raises(ValueError, match="convention must be one of monai, medpy"):
        M.hd95(p, g, convention="max")
    with pytest.raises(ValueError, match="spacing must be"):
        M.hd95(p, g, spacing=(0.5, -1))


def test_hd95_is_nan_for_an_empty_mask():
    a = _square(16, 2, 2, 5)
    z = np.zeros_like(a)
    assert all(math.isnan(M.hd95(x, y)) for x, y in ((z, a), (a, z), (z, z)))
    assert M.max_distance((16, 21), (0.5, 0.7)) == pytest.approx(math.hypot(15 * 0.5, 20 * 0.7))


# ----------------------------------------------------------------------------------------------
# against MONAI and MedPy
# ----------------------------------------------------------------------------------------------
def _blob(rng, shape, sigma, level):
    return ndimage.gaussian_filter(rng.random(shape), sigma) > level


def _cases():
    """(name, pred, truth): random blobs (non-square, touching the borders) and adversarial
    pairs: single pixels, masks along the image edges, a ring with a hole against a disk, a
    checkerboard (every pixel a boundary), one-pixel lines, a full image."""
    rng = np.random.default_rng(7)
    cases = []
    for k in range(6):
        shape = (int(rng.integers(10, 40)), int(rng.integers(10, 40)))
        cases.append((f"blobs{k}", _blob(rng, shape, 1.5, 0.5), _blob(rng, shape, 2.0, 0.5)))
    px_a, px_b = np.zeros((9, 13), bool), np.zeros((9, 13), bool)
    px_a[0, 0], px_b[8, 12] = True, True                     # opposite corners
    cases.append(("single pixels", px_a, px_b))
    cases.append(("pixel vs blob", px_a, _blob(rng, (9, 13), 1.0, 0.5) | px_b))
    edge = np.zeros((15, 20), bool)
    edge[0, :], edge[:, -1] = True, True                     # along two image edges
    cases.append(("touching borders", edge, np.ones((15, 20), bool)))
    yy, xx = np.mgrid[:25, :31]
    r = np.hypot(yy - 12, xx - 14)
    cases.append(("ring with a hole vs disk", (r <= 10) & (r >= 5), r <= 8))
    cases.append(("checkerboard", (yy + xx) % 2 == 0, r <= 6))
    line = np.zeros((25, 31), bool)
    line[3, 2:29] = True
    cases.append(("lines", line, np.roll(line, (9, 1), (0, 1))))
    cases.append(("identical", r <= 7, r <= 7))
    return cases


SPACINGS = [None, (1.0, 1.0), (0.5, 0.7), (2.0, 0.3)]


@pytest.mark.parametrize("spacing", SPACINGS, ids=str)
def test_dice_iou_hd95_equal_monai(spacing):
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")

    def t(m):
        return torch.as_tensor(m[None, None], dtype=torch.float32)

    for name, p, g in _cases():
        dice = float(monai_metrics.compute_dice(t(p), t(g), include_background=True))
        iou = float(monai_metrics.compute_iou(t(p), t(g), include_background=True))
        hd = float(monai_metrics.compute_hausdorff_distance(
            t(p), t(g), include_background=True, percentile=95, spacing=spacing))
        assert M.dice(p, g) == pytest.approx(dice, rel=1e-6, abs=1e-7), name
        assert M.iou(p, g) == pytest.approx(iou, rel=1e-6, abs=1e-7), name
        assert M.hd95(p, g, spacing) == pytest.approx(hd, rel=1e-5, abs=1e-6), name
    a = _square(12, 2, 2, 4)
    z = np.zeros_like(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns of the empty masks
        for x, y in ((z, a), (a, z), (z, z)):  # MONAI: NaN for an empty mask, as M.hd95
            assert math.isnan(float(monai_metrics.compute_hausdorff_distance(
                t(x), t(y), include_background=True, percentile=95)))
            assert math.isnan(M.hd95(x, y))


@pytest.mark.parametrize("spacing", SPACINGS, ids=str)
def test_dice_iou_hd95_equal_medpy(spacing):
    binary = pytest.importorskip("medpy.metric.binary")
    for name, p, g in _cases():
        assert M.dice(p, g) == pytest.approx(binary.dc(p, g), rel=1e-12), name
        assert M.iou(p, g) == pytest.approx(binary.jc(p, g), rel=1e-12), name
        assert M.hd95(p, g, spacing, "medpy") == pytest.approx(
            binary.hd95(p, g, voxelspacing=spacing), rel=1e-9), name
    with pytest.raises(RuntimeError):  # MedPy refuses an empty mask; M.hd95 says NaN
        binary.hd95(np.zeros((5, 5), bool), _square(5, 1, 1, 2))


# ----------------------------------------------------------------------------------------------
# the empty-mask rules, native resolution, groups
# ----------------------------------------------------------------------------------------------
def test_empty_mask_rules_and_counts():
    a, b = _square(16, 2, 2, 5), _square(16, 3, 2, 5)
    z = np.zeros_like(a)
    preds = [a, z, b, a, z]
    gts = [a, a, a, z, z]   # lesion: exact, missed, shifted; no lesion: false positive, empty
    res = M.segmentation_metrics(preds, gts, spacing=(0.5, 0.5))
    diag = math.hypot(15 * 0.5, 15 * 0.5)
    hd_shift = M.hd95(b, a, (0.5, 0.5))
    assert res["seg_images"] == 3 and res["empty_truth_images"] == 2
    assert res["empty_truth_false_positives"] == 1 and res["empty_prediction_images"] == 1
    assert res["dice"] == pytest.approx((1 + 0 + M.dice(b, a)) / 3)
    assert res["hd95"] == pytest.approx((0 + diag + hd_shift) / 3)
    assert res["hd95_unit"] == "mm" and res["hd95_convention"] == "monai"
    skip = M.segmentation_metrics(preds, gts, spacing=(0.5, 0.5), empty_prediction="skip")
    assert skip["hd95"] == pytest.approx(hd_shift / 2) and skip["empty_prediction_images"] == 1
    assert skip["dice"] == res["dice"]                       # Dice of a miss is 0 either way
    none = M.segmentation_metrics([a, z], [z, z])
    assert none["seg_images"] == 0 and math.isnan(none["dice"]) and math.isnan(none["hd95"])
    assert M.segmentation_metrics([b], [a])["hd95_unit"] == "px"
    # one image without a spacing: every HD95 in pixels, never mm and px averaged together
    mixed = M.image_segmentation_scores([(b, a), (b, a)], [(0.5, 0.5), None])
    assert mixed["unit"] == "px" and mixed["spacing_missing"] == 1
    assert mixed["hd95"][0] == mixed["hd95"][1] == M.hd95(b, a)


def test_metric_settings_are_checked():
    assert M.metric_settings(None) == {"hd95": "monai", "empty_prediction": "max", "groups": []}
    assert M.metric_settings({"groups": "breast"})["groups"] == ["breast"]
    for bad, match in (({"hd95": "max"}, "metrics.hd95 must be monai or medpy"),
                       ({"empty_prediction": "zero"}, "metrics.empty_prediction must be"),
                       ({"groups": ["study"]}, "metrics.groups must be a list of patient, breast"),
                       ({"unit": "mm"}, "unknown metrics setting metrics.unit")):
        with pytest.raises(ValueError, match=match):
            M.metric_settings(bad)


def _native_pred():
    """Two images: logits at a 4 x 4 input whose block [1:3, 1:3] is positive, which at the
    original 8 x 8 (twice the size, bilinear on the half-pixel grid, then > 0) is rows/columns
    2..5; the first image's truth is rows/columns 3..4 (spacing 0.5 mm rows, 0.7 mm columns),
    the second has no lesion."""
    from avpt.data.native import NativeMask

    logits = -np.ones((2, 4, 4), np.float32)
    logits[:, 1:3, 1:3] = 1.0
    truth = np.zeros((8, 8), bool)
    truth[3:5, 3:5] = True
    native = [NativeMask.of(truth, (0.5, 0.7)), NativeMask.of(np.zeros((8, 8), bool), (0.5, 0.7))]
    gts = np.zeros((2, 4, 4), bool)
    gts[0, 1:3, 1:3] = True       # at the input size the truth is the whole predicted block
    return dict(probs=np.array([0.8, 0.3]), labels=np.array([1, 0]), preds=logits > 0,
                seg_logits=logits, gts=gts, native=native, patients=["p1", "p1"],
                breasts=["p1/L", "p1/R"])


def test_score_at_native_resolution_in_mm():
    from avpt.data.native import NativeMask, to_native
    from avpt.engine import score, segmentation_per_image

    pred = _native_pred()
    up = to_native(pred["seg_logits"][0], (8, 8))
    assert up.sum() == 16 and up[2:6, 2:6].all()            # the block, twice the size
    m = score(pred)
    # by hand: the prediction's boundary is its 12 outer pixels: 4 one row from the truth
    # (0.5 mm), 4 one column (0.7 mm), 4 corners diagonal (hypot(0.5, 0.7) = 0.86 mm); the
    # truth's 4 pixels are all boundary, each one row (0.5 mm) from the prediction's boundary.
    # 95th percentiles: 0.86 (prediction -> truth), 0.5 (truth -> prediction); MONAI takes the
    # larger, 0.86 mm; MedPy pools the 16 values, 0.86 mm too
    diag = math.hypot(0.5, 0.7)
    assert m["hd95"] == pytest.approx(diag)
    assert m["hd95_unit"] == "mm" and m["resolution"] == "native"
    assert m["dice"] == pytest.approx(2 * 4 / (16 + 4)) and m["iou"] == pytest.approx(4 / 16)
    assert m["seg_images"] == 1 and m["empty_truth_images"] == 1
    assert m["empty_truth_false_positives"] == 1             # the second image's block
    assert score(pred, {"hd95": "medpy"})["hd95"] == pytest.approx(diag)
    at_input = score(dict(pred, native=None))                  # no native truths: input size
    assert at_input["resolution"] == "input" and at_input["hd95_unit"] == "px"
    assert at_input["dice"] == 1.0 and at_input["hd95"] == 0.0
    # a 4084 x 3328 mammogram's mask is stored as its lesion's box
    big = np.zeros((4084, 3328), bool)
    big[2000:2050, 1000:1040] = True
    nm = NativeMask.of(big, (0.07, 0.07))
    assert nm.crop.shape == (50, 40) and (nm.full() == big).all()
    assert segmentation_per_image(dict(pred, preds=None)) is None


def test_group_scores_combine_views():
    from avpt.engine import score, score_groups

    pred = _native_pred()
    pred.update(probs=np.array([0.8, 0.2, 0.3, 0.1]), labels=np.array([1, 0, 0, 0]),
                patients=["p1", "p1", "p2", "p2"], breasts=["p1/L", "p1/R", "p2/L", "p2/L"])
    for k in ("seg_logits", "preds", "gts"):
        pred[k] = np.concatenate([pred[k], pred[k]])
    pred["native"] = pred["native"] * 2
    out = score_groups(pred, {"groups": ["patient", "breast"]})
    # patients: p1 mean 0.5 (label 1), p2 mean 0.2 (label 0): AUC 1
    assert out["patient"]["n"] == 2 and out["patient"]["auc"] == 1.0
    assert out["patient"]["accuracy"] == 1.0                  # 0.5 >= 0.5 -> malignant: right
    assert out["breast"]["n"] == 3 and out["breast"]["seg_groups"] == 2
    per_image = score(pred)
    assert out["breast"]["hd95"] == pytest.approx(per_image["hd95"])  # same lesion, twice
    assert out["patient"]["hd95_unit"] == "mm"
    assert score_groups(pred, None) == {}


# ----------------------------------------------------------------------------------------------
# classification, aggregation
# ----------------------------------------------------------------------------------------------
def test_classification_metrics():
    labels = [0, 0, 1, 1]
    assert M.auc(labels, [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.f1(labels, [0, 1, 1, 1]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert math.isnan(M.auc([1, 1], [0.2, 0.3]))
    out = M.classification_metrics(labels, [0.1, 0.6, 0.7, 0.9])
    assert out["auc"] == 1.0 and out["accuracy"] == 0.75


def test_aggregate_mean_std():
    agg = M.aggregate([{"auc": 0.8, "dice": float("nan")}, {"auc": 0.9, "dice": 0.5}, {"auc": 1.0, "dice": 0.7}])
    assert agg["auc"]["mean"] == pytest.approx(0.9)
    assert agg["auc"]["std"] == pytest.approx(0.1)
    assert agg["dice"]["n"] == 2 and agg["dice"]["mean"] == pytest.approx(0.6)
    assert "unit" not in agg["auc"]
    units = M.aggregate([{"hd95": 1.0, "hd95_unit": "mm"}, {"hd95": 3.0, "hd95_unit": "mm"}])
    assert units["hd95"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2, "unit": "mm"}
    assert M.aggregate([{"hd95": 1.0, "hd95_unit": "mm"},
                        {"hd95": 3.0, "hd95_unit": "px"}])["hd95"]["unit"] == "mixed"


def test_three_class_metrics_are_one_vs_rest_macro():
    from sklearn.metrics import f1_score, roc_auc_score

    from avpt.engine import score, undefined_metrics

    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 0, 1, 2, 2, 1, 0])
    probs = rng.dirichlet(np.ones(3), size=len(labels))
    m = M.multiclass_metrics(labels, probs)
    assert m["auc"] == roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert m["f1"] == f1_score(labels, probs.argmax(1), average="macro")
    assert m["accuracy"] == np.mean(probs.argmax(1) == labels)
    pred = dict(labels=labels, probs=probs[:, -1], class_probs=probs, preds=None, gts=None)
    assert {k: score(pred)[k] for k in m} == m
    missing = dict(pred, labels=np.array([0, 1, 1, 0, 1, 0, 0, 1, 0]))
    assert np.isnan(score(missing)["auc"])
    assert "one-vs-rest AUC needs every class" in undefined_metrics(missing, score(missing))["auc"]
    assert "one-vs-rest macro" in M.metric_kind(3) and M.metric_kind(2).startswith("binary")
