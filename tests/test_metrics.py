"""Metrics: Dice/IoU/HD95 against hand-computed and brute-force values, AUC/F1 against
hand-counted cases, aggregation over folds."""
import math

import numpy as np
import pytest

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


def _brute_hd95(p, g):
    def border(m):
        from scipy import ndimage
        return np.argwhere(m & ~ndimage.binary_erosion(m, border_value=0))
    sp, sg = border(p), border(g)
    d = np.sqrt(((sp[:, None, :] - sg[None, :, :]) ** 2).sum(-1))
    return np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)


def test_hd95_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(3):
        p = _square(32, *rng.integers(2, 12, 2), int(rng.integers(5, 15)))
        g = _square(32, *rng.integers(2, 12, 2), int(rng.integers(5, 15)))
        assert M.hd95(p, g) == pytest.approx(_brute_hd95(p, g))
    a = _square(32, 5, 5, 6)
    assert M.hd95(a, a) == 0.0
    shifted = _square(32, 5, 8, 6)    # every boundary point moves by at most 3 px
    assert 0 < M.hd95(a, shifted) <= 3.0
    assert M.hd95(a, shifted, spacing=0.5) == pytest.approx(M.hd95(a, shifted) * 0.5)
    # a missed lesion costs the image diagonal
    assert M.hd95(np.zeros_like(a), a) == pytest.approx(math.hypot(32, 32))


def test_classification_metrics():
    labels = [0, 0, 1, 1]
    assert M.auc(labels, [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.f1(labels, [0, 1, 1, 1]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert math.isnan(M.auc([1, 1], [0.2, 0.3]))
    out = M.classification_metrics(labels, [0.1, 0.6, 0.7, 0.9])
    assert out["auc"] == 1.0 and out["accuracy"] == 0.75


def test_segmentation_metrics_skip_empty_truth():
    a = _square(16, 2, 2, 5)
    res = M.segmentation_metrics([a, a, np.zeros_like(a)], [a, np.zeros_like(a), np.zeros_like(a)])
    assert res["seg_images"] == 1 and res["dice"] == 1.0 and res["hd95"] == 0.0


def test_aggregate_mean_std():
    agg = M.aggregate([{"auc": 0.8, "dice": float("nan")}, {"auc": 0.9, "dice": 0.5}, {"auc": 1.0, "dice": 0.7}])
    assert agg["auc"]["mean"] == pytest.approx(0.9)
    assert agg["auc"]["std"] == pytest.approx(0.1)
    assert agg["dice"]["n"] == 2 and agg["dice"]["mean"] == pytest.approx(0.6)


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
