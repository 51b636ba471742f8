"""Evaluation metrics from well-kept libraries: AUC and F1 (scikit-learn), Dice, IoU, HD95
(Euclidean distance transforms from scipy), and mean/std aggregation over folds and seeds.

Segmentation metrics are per image, averaged over images whose ground-truth mask is not empty
(the lesion-present images; BUSI "normal" images have nothing to segment). HD95: the 95th
percentile of the symmetric surface distances (boundary pixels of prediction and truth), in
pixels times ``spacing``; an empty prediction on a lesion image scores the image diagonal (the
worst possible distance) instead of an undefined value, so missed lesions are penalised.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence

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
    pred, gt = pred.astype(bool), gt.astype(bool)
    denom = pred.sum() + gt.sum()
    return 1.0 if denom == 0 else float(2.0 * (pred & gt).sum() / denom)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = pred.astype(bool), gt.astype(bool)
    union = (pred | gt).sum()
    return 1.0 if union == 0 else float((pred & gt).sum() / union)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: float = 1.0) -> float:
    """95th percentile symmetric Hausdorff distance between the mask boundaries."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    if not gt.any() and not pred.any():
        return 0.0
    if not gt.any() or not pred.any():
        return float(math.hypot(*gt.shape) * spacing)
    sp, sg = _surface(pred), _surface(gt)
    dist_to_gt = ndimage.distance_transform_edt(~sg)
    dist_to_pred = ndimage.distance_transform_edt(~sp)
    d = np.concatenate([dist_to_gt[sp], dist_to_pred[sg]])
    return float(np.percentile(d, 95) * spacing)


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


def segmentation_metrics(preds: Iterable[np.ndarray], gts: Iterable[np.ndarray],
                         spacing: float = 1.0) -> Dict[str, float]:
    """Mean Dice, IoU, HD95 over images with a non-empty ground truth (NaN when there is none)."""
    d, j, h = [], [], []
    for p, g in zip(preds, gts):
        if not np.asarray(g).any():
            continue
        d.append(dice(p, g)), j.append(iou(p, g)), h.append(hd95(p, g, spacing))
    if not d:
        return {"dice": float("nan"), "iou": float("nan"), "hd95": float("nan"), "seg_images": 0}
    return {"dice": float(np.mean(d)), "iou": float(np.mean(j)), "hd95": float(np.mean(h)),
            "seg_images": len(d)}


def aggregate(runs: List[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Mean and (sample) standard deviation of each numeric metric over runs (folds, seeds);
    NaN runs are left out of that metric, and ``n`` says how many counted."""
    out: Dict[str, Dict[str, float]] = {}
    keys = sorted({k for r in runs for k, v in r.items() if isinstance(v, (int, float))})
    for k in keys:
        vals = np.array([r[k] for r in runs if isinstance(r.get(k), (int, float)) and
                         not math.isnan(r[k])], dtype=np.float64)
        out[k] = {"mean": float(vals.mean()) if len(vals) else float("nan"),
                  "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0 if len(vals) else float("nan"),
                  "n": int(len(vals))}
    return out
