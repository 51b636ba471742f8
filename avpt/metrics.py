"""Evaluation metrics as the field computes them: AUC and F1 (scikit-learn), Dice, IoU and HD95
(scipy's exact Euclidean distance transform, cross-checked against MONAI and MedPy in
tests/test_metrics.py), and mean/std aggregation over folds and seeds.

Segmentation figures are per image, at the image's original size and pixel spacing when the
evaluation has them (``avpt.engine.score``: HD95 in mm where every image's DICOM spacing is
known, else in pixels), averaged over images whose ground truth is not empty (images without a
lesion have nothing to segment: left out and counted). HD95 follows MONAI by default (the larger
of the two directed 95th percentiles), MedPy on request (both directions pooled):
``HD95_CONVENTIONS``. A lesion image with an empty prediction gets Dice = IoU = 0 and an HD95 by
``EMPTY_PREDICTION_RULES`` (default: the image's largest distance), counted. Every choice is
named in the figures' dict (``summarise_segmentation``) and in docs/metrics.md.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage


def auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC of the malignant-class score; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores)))


def f1(labels: Sequence[int], preds: Sequence[int]) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(labels), np.asarray(preds), average="binary", zero_division=0))


def accuracy(labels, preds) -> float:
    return float(np.mean(np.asarray(labels) == np.asarray(preds)))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2 |P & G| / (|P| + |G|); 1 for two empty masks (scores leave those out)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    denom = np.count_nonzero(pred) + np.count_nonzero(gt)
    return 1.0 if denom == 0 else float(2.0 * np.count_nonzero(pred & gt) / denom)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """|P & G| / |P | G|; 1 for two empty masks (scores leave those out)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else float(np.count_nonzero(pred & gt) / union)


# HD95 conventions: both take the boundary pixels of each mask (a mask pixel with a 4-neighbour
# outside the mask or outside the image, as scipy's binary_erosion with border_value=0 marks
# them in MONAI and MedPy) and the Euclidean distance, in millimetres given the spacing, from
# each boundary pixel of one mask to the nearest boundary pixel of the other; they differ in how
# the two directions are combined.
HD95_CONVENTIONS = {
    "monai": "the larger of the two directed 95th percentiles (MONAI "
             "HausdorffDistanceMetric(percentile=95), compute_hausdorff_distance)",
    "medpy": "the 95th percentile of both directions' distances pooled (MedPy "
             "medpy.metric.binary.hd95)",
}
# A lesion image whose predicted mask is empty has no HD95 (MONAI: NaN, MedPy: an exception).
EMPTY_PREDICTION_RULES = {
    "max": "scores the largest distance within the image (the diagonal between corner pixel "
           "centres, in the HD95 unit): a missed lesion costs the worst value, not nothing",
    "skip": "is left out of the HD95 mean (as MONAI's NaN under a NaN-ignoring mean)",
}


def check_spacing(spacing, where: str = "spacing") -> Optional[Tuple[float, float]]:
    """None, one positive number or (row, column) positive numbers -> None or (row, column)."""
    if spacing is None:
        return None
    vals = np.atleast_1d(np.asarray(spacing, dtype=np.float64)).ravel()
    if vals.size == 1:
        vals = np.repeat(vals, 2)
    if vals.size != 2 or not np.all(np.isfinite(vals)) or np.any(vals <= 0):
        raise ValueError(f"{where} must be None, a positive number or two positive numbers "
                         f"(row, column), got {spacing!r}")
    return float(vals[0]), float(vals[1])


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing=None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Directed boundary distances of two non-empty masks [H, W]: (from each boundary pixel of
    ``pred`` to the nearest of ``gt`` [P], from each of ``gt`` to ``pred`` [G]), in units of
    ``spacing`` (row, column; None: pixels). Computed (scipy's exact Euclidean distance
    transform) on the bounding box of pred | gt with a one-pixel margin: every boundary lies
    inside it, and its edges are either empty margin or the image's own edges, so no distance
    changes while a 4084 x 3328 mammogram costs only its lesion's box."""
    union = pred | gt
    rows, cols = np.flatnonzero(union.any(1)), np.flatnonzero(union.any(0))
    r0, r1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, pred.shape[0])
    c0, c1 = max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, pred.shape[1])
    p, g = _boundary(pred[r0:r1, c0:c1]), _boundary(gt[r0:r1, c0:c1])
    sampling = check_spacing(spacing)
    to_gt = ndimage.distance_transform_edt(~g, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~p, sampling=sampling)
    return to_gt[p], to_pred[g]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing=None, convention: str = "monai") -> float:
    """95th-percentile Hausdorff distance of two masks [H, W] in units of ``spacing`` (row,
    column mm; None: pixels) by ``convention`` (``HD95_CONVENTIONS``: "monai", the default, or
    "medpy"). NaN when either mask is empty (``EMPTY_PREDICTION_RULES`` decide what a score
    makes of it). Percentiles are numpy's linear interpolation, as both libraries'."""
    if convention not in HD95_CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(HD95_CONVENTIONS)}, got "
                         f"{convention!r}")
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
    if not pred.any() or not gt.any():
        return float("nan")
    to_gt, to_pred = surface_distances(pred, gt, spacing)
    if convention == "monai":
        return float(max(np.percentile(to_gt, 95), np.percentile(to_pred, 95)))
    return float(np.percentile(np.concatenate([to_gt, to_pred]), 95))


def max_distance(shape: Sequence[int], spacing=None) -> float:
    """The largest distance between two pixel centres of an image of ``shape`` (H, W), in units
    of ``spacing``: what ``EMPTY_PREDICTION_RULES['max']`` scores."""
    sr, sc = check_spacing(spacing) or (1.0, 1.0)
    return float(math.hypot((shape[0] - 1) * sr, (shape[1] - 1) * sc))


def classification_metrics(labels, probs, threshold: float = 0.5) -> Dict[str, float]:
    """labels [N] in {0, 1}, probs [N] malignant probability."""
    probs = np.asarray(probs, dtype=np.float64)
    preds = (probs >= threshold).astype(int)
    return {"auc": auc(labels, probs), "f1": f1(labels, preds), "accuracy": accuracy(labels, preds)}


def multiclass_metrics(labels, probs) -> Dict[str, float]:
    """labels [N] in {0..C-1}, probs [N, C] class probabilities (C > 2): AUC one-vs-rest macro
    (NaN unless every class is in ``labels``), F1 macro, accuracy of the arg-max class."""
    from sklearn.metrics import f1_score, roc_auc_score

    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    classes = np.arange(probs.shape[1])
    preds = probs.argmax(axis=1)
    if set(np.unique(labels).tolist()) == set(classes.tolist()):
        auc_ = float(roc_auc_score(labels, probs / probs.sum(axis=1, keepdims=True),
                                   multi_class="ovr", average="macro", labels=classes))
    else:
        auc_ = float("nan")
    f1_ = float(f1_score(labels, preds, average="macro", labels=classes, zero_division=0))
    return {"auc": auc_, "f1": f1_, "accuracy": accuracy(labels, preds)}


def metric_kind(num_classes: int) -> str:
    """What ``auc`` and ``f1`` mean for ``num_classes`` classes (metrics.json, the report)."""
    if num_classes <= 2:
        return "binary: AUC of the malignant probability, F1 of malignant at p >= 0.5, accuracy"
    return (f"{num_classes} classes: AUC one-vs-rest macro, F1 macro, accuracy of the arg-max "
            f"class")


# The evaluation settings (config section ``metrics.``): HD95 convention, the empty-prediction
# rule, and the groups (besides images) to score by.
METRIC_DEFAULTS = {"hd95": "monai", "empty_prediction": "max", "groups": []}
GROUPS = ("patient", "breast")


def metric_settings(settings: Optional[Dict] = None) -> Dict:
    """``settings`` (None or a partial ``metrics.`` section) checked, with METRIC_DEFAULTS filled
    in; a bad one raises ValueError naming the key and what is accepted."""
    out = {**METRIC_DEFAULTS, **(settings or {})}
    unknown = sorted(set(out) - set(METRIC_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown metrics setting {', '.join('metrics.' + k for k in unknown)}; "
                         f"its settings: {', '.join('metrics.' + k for k in METRIC_DEFAULTS)}")
    if out["hd95"] not in HD95_CONVENTIONS:
        raise ValueError(f"metrics.hd95 must be {' or '.join(HD95_CONVENTIONS)}, got "
                         f"{out['hd95']!r}")
    if out["empty_prediction"] not in EMPTY_PREDICTION_RULES:
        raise ValueError(f"metrics.empty_prediction must be {' or '.join(EMPTY_PREDICTION_RULES)},"
                         f" got {out['empty_prediction']!r}")
    groups = out["groups"]
    if isinstance(groups, str):
        groups = [groups]
    if not isinstance(groups, (list, tuple)) or any(g not in GROUPS for g in groups):
        raise ValueError(f"metrics.groups must be a list of {', '.join(GROUPS)}, got {groups!r}")
    out["groups"] = list(dict.fromkeys(groups))
    return out


def image_segmentation_scores(pairs: Iterable[Tuple[np.ndarray, np.ndarray]],
                              spacings: Sequence, convention: str = "monai",
                              empty_prediction: str = "max") -> Dict:
    """Per-image Dice, IoU, HD95 of (prediction, truth) mask pairs [H_i, W_i] (any size per
    image) with ``spacings`` [N] (row, column mm, or None). HD95 is in mm when every image's
    spacing is known, else in pixels for all (``unit``). Returns arrays [N]: ``dice``, ``iou``,
    ``hd95`` (the empty-prediction rule applied; NaN where skipped), ``lesion`` (truth not empty;
    the other images get NaN: nothing to segment), ``empty_prediction``; and ``unit``,
    ``spacing_missing`` (images without a spacing)."""
    spacings = [check_spacing(s, f"spacing of image {i}") for i, s in enumerate(spacings)]
    missing = sum(s is None for s in spacings)
    unit = "mm" if spacings and not missing else "px"
    n = len(spacings)
    dice_, iou_, hd_ = (np.full(n, np.nan) for _ in range(3))
    lesion, empty = np.zeros(n, bool), np.zeros(n, bool)
    count = 0
    for i, (p, g) in enumerate(pairs):
        if i >= n:
            raise ValueError(f"more mask pairs than the {n} spacings")
        count += 1
        p, g = np.asarray(p, bool), np.asarray(g, bool)
        lesion[i], empty[i] = g.any(), not p.any()
        if not lesion[i]:
            continue
        sp = spacings[i] if unit == "mm" else None
        dice_[i], iou_[i] = dice(p, g), iou(p, g)
        if empty[i]:
            hd_[i] = max_distance(g.shape, sp) if empty_prediction == "max" else np.nan
        else:
            hd_[i] = hd95(p, g, sp, convention)
    if count != n:
        raise ValueError(f"{count} mask pairs for {n} spacings")
    return dict(dice=dice_, iou=iou_, hd95=hd_, lesion=lesion, empty_prediction=empty, unit=unit,
                spacing_missing=int(missing))


def summarise_segmentation(per_image: Dict, convention: str = "monai",
                           empty_prediction: str = "max", resolution: str = "native"
                           ) -> Dict[str, object]:
    """Mean Dice, IoU, HD95 over the lesion images of ``image_segmentation_scores``, with what
    the figures are: ``hd95_unit`` (mm or px), ``resolution`` (native: each image's original
    size; input: the model's), the convention and empty-prediction rule, and counts: images
    scored (``seg_images``), left out for an empty truth (``empty_truth_images``; of them with a
    non-empty prediction, ``empty_truth_false_positives``), lesion images with an empty
    prediction (``empty_prediction_images``: the rule touched these)."""
    lesion = per_image["lesion"]
    hd = per_image["hd95"][lesion]
    hd = hd[np.isfinite(hd)]
    out: Dict[str, object] = {
        "dice": float(per_image["dice"][lesion].mean()) if lesion.any() else float("nan"),
        "iou": float(per_image["iou"][lesion].mean()) if lesion.any() else float("nan"),
        "hd95": float(hd.mean()) if len(hd) else float("nan"),
        "hd95_unit": per_image["unit"], "resolution": resolution, "hd95_convention": convention,
        "hd95_empty_prediction": empty_prediction, "seg_images": int(lesion.sum()),
        "empty_truth_images": int((~lesion).sum()),
        "empty_truth_false_positives": int((~lesion & ~per_image["empty_prediction"]).sum()),
        "empty_prediction_images": int((lesion & per_image["empty_prediction"]).sum()),
    }
    return out


def segmentation_metrics(preds: Iterable[np.ndarray], gts: Iterable[np.ndarray], spacing=None,
                         convention: str = "monai", empty_prediction: str = "max"
                         ) -> Dict[str, object]:
    """``summarise_segmentation`` of masks at one size and one ``spacing`` (row, column mm or
    None) for every image."""
    gts = list(gts)
    per = image_segmentation_scores(zip(preds, gts), [spacing] * len(gts), convention,
                                    empty_prediction)
    return summarise_segmentation(per, convention, empty_prediction)


def group_metrics(groups: Sequence[str], labels, probs, per_image: Optional[Dict] = None
                  ) -> Dict[str, object]:
    """Scores of groups of images (a patient's or a breast's views) instead of images:
    classification of each group from the mean of its images' probabilities (``probs`` [N] or
    [N, C]) against the largest label of its images (malignant if any view is); Dice, IoU, HD95
    the mean over a group's lesion images, then over groups that have one. ``n``: groups."""
    groups = np.asarray(groups)
    keys = list(dict.fromkeys(groups.tolist()))
    idx = [np.flatnonzero(groups == k) for k in keys]
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    g_labels = np.array([labels[i].max() for i in idx])
    g_probs = np.stack([probs[i].mean(axis=0) for i in idx])
    out: Dict[str, object] = (multiclass_metrics(g_labels, g_probs) if g_probs.ndim == 2
                              else classification_metrics(g_labels, g_probs))
    if per_image is not None:
        lesion = per_image["lesion"]
        scored = [i[lesion[i]] for i in idx if lesion[i].any()]
        for k in ("dice", "iou", "hd95"):
            vals = np.array([np.nanmean(per_image[k][i]) if np.isfinite(per_image[k][i]).any()
                             else np.nan for i in scored])
            vals = vals[np.isfinite(vals)]
            out[k] = float(vals.mean()) if len(vals) else float("nan")
        out.update(hd95_unit=per_image["unit"], seg_groups=len(scored))
    out["n"] = len(keys)
    return out


def aggregate(runs: List[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Mean and (sample) standard deviation of each numeric metric over runs (folds, seeds);
    NaN runs are left out of that metric, and ``n`` says how many counted. A metric with a unit
    in the runs (``hd95_unit``) keeps it (``unit``; "mixed" if the runs disagree)."""
    out: Dict[str, Dict[str, float]] = {}
    keys = sorted({k for r in runs for k, v in r.items() if isinstance(v, (int, float))})
    for k in keys:
        vals = np.array([r[k] for r in runs if isinstance(r.get(k), (int, float)) and
                         not math.isnan(r[k])], dtype=np.float64)
        out[k] = {"mean": float(vals.mean()) if len(vals) else float("nan"),
                  "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0 if len(vals) else float("nan"),
                  "n": int(len(vals))}
        units = {r[f"{k}_unit"] for r in runs if r.get(f"{k}_unit")}
        if units:
            out[k]["unit"] = units.pop() if len(units) == 1 else "mixed"
    return out
