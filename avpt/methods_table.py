"""Methods side by side: bootstrap 95% intervals over test images, an HTML table and a plot.

``per_image(pred)`` turns a prediction dict of ``avpt.train.predict`` (probs [N], labels [N],
preds [N, H, W] bool or None, gts [N, H, W] bool) into per-image arrays; ``bootstrap_ci`` draws
test images with replacement (``scipy.stats.bootstrap``, percentile method) and recomputes each
metric (AUC, F1 over the resampled images; Dice, IoU, HD95 as the mean over resampled lesion
images), giving (point estimate, low, high). ``comparison_html`` and ``comparison_plot`` render
rows ``{"method", "split", "metrics": {key: (est, lo, hi)}, "trainable_pct"}``.
"""
from __future__ import annotations

import html
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import metrics as M

KEYS = ("auc", "f1", "dice", "iou", "hd95")
PAPER_SHARE = 1.87  # the paper's A-VPT trainable share of ViT-B/16, percent


def per_image(pred: Dict, settings: Optional[Dict] = None) -> Dict[str, np.ndarray]:
    """Per-image arrays: probs, labels [N]; dice, iou, hd95 [N] (NaN where no lesion or no
    segmentation head) as ``avpt.engine.score`` computes them (original resolution where the
    data has it; ``settings`` the config's ``metrics.`` section), and ``unit`` of hd95."""
    from .engine import segmentation_per_image

    n = len(pred["labels"])
    seg = {k: np.full(n, np.nan) for k in ("dice", "iou", "hd95")}
    per = segmentation_per_image(pred, settings)
    if per is not None:
        seg = {k: per[k] for k in seg}
    return dict(probs=np.asarray(pred["probs"], float), labels=np.asarray(pred["labels"], int),
                unit=per["unit"] if per is not None else None, **seg)


def _statistic(arrays: Dict[str, np.ndarray], key: str):
    def stat(idx):
        idx = np.asarray(idx, int)
        if key == "auc":
            return M.auc(arrays["labels"][idx], arrays["probs"][idx])
        if key == "f1":
            return M.f1(arrays["labels"][idx], (arrays["probs"][idx] >= 0.5).astype(int))
        vals = arrays[key][idx]
        vals = vals[np.isfinite(vals)]
        return float(vals.mean()) if len(vals) else float("nan")
    return stat


def bootstrap_ci(arrays: Dict[str, np.ndarray], keys: Sequence[str] = KEYS, n_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> Dict[str, Tuple[float, float, float]]:
    """{key: (estimate on all images, low, high)}: percentile bootstrap over test images
    (``scipy.stats.bootstrap``); (nan, nan, nan) for a metric undefined on the full set."""
    from scipy.stats import bootstrap

    n = len(arrays["labels"])
    out = {}
    for key in keys:
        stat = _statistic(arrays, key)
        est = stat(np.arange(n))
        if not math.isfinite(est):
            out[key] = (float("nan"),) * 3
            continue
        res = bootstrap((np.arange(n),), stat, vectorized=False, n_resamples=n_resamples,
                        confidence_level=level, method="percentile",
                        random_state=np.random.default_rng(seed))
        lo, hi = res.confidence_interval
        out[key] = (float(est), float(lo), float(hi))
    return out


def _cell(v) -> str:
    est, lo, hi = v
    if not math.isfinite(est):
        return "n/a"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{est:.3f}"
    return f"{est:.3f} <small>[{lo:.3f}, {hi:.3f}]</small>"


def comparison_html(rows: List[Dict], caption: str = "") -> str:
    """An HTML table: one row per (method, split), AUC/F1/Dice/IoU/HD95 as 'est [lo, hi]', and
    the trainable share of the visual tower next to the paper's 1.87%."""
    units = sorted({r["hd95_unit"] for r in rows if r.get("hd95_unit")}) or ["px"]
    hd95_head = "HD95 (" + "/".join(units) + ")"  # the unit beside the figures
    head = "".join(f"<th>{k.upper() if k != 'hd95' else hd95_head}</th>" for k in KEYS)
    parts = [f"<table class='comparison'><caption>{html.escape(caption)}</caption><tr><th>method</th>"
             f"<th>test set</th><th>n</th>{head}<th>trainable % of visual tower</th></tr>"]
    for r in rows:
        pct = r.get("trainable_pct")
        parts.append(f"<tr><td>{html.escape(r['method'])}</td><td>{html.escape(r['split'])}</td>"
                     f"<td>{r.get('n', '')}</td>"
                     + "".join(f"<td>{_cell(r['metrics'].get(k, (float('nan'),) * 3))}</td>" for k in KEYS)
                     + f"<td>{'n/a' if pct is None else f'{pct:.2f}%'}</td></tr>")
    parts.append(f"</table><p>Point estimate on all test images, then the 95% percentile bootstrap "
                 f"interval (test images resampled, 1000 draws). Segmentation metrics are over "
                 f"test images with a lesion, at each image's original size (HD95 in mm where "
                 f"the pixel spacing is known, else pixels; MONAI's HD95 convention unless "
                 f"metrics.hd95 says otherwise; see docs/metrics.md); a method without a segmentation head shows n/a. "
                 f"Trainable share: trainable parameters over the visual tower's; the paper's "
                 f"A-VPT trains {PAPER_SHARE}% of ViT-B/16 — the tiny backbone has far fewer "
                 f"parameters, so the same modules are a larger share of it.</p>")
    return "\n".join(parts)


def comparison_plot(rows: List[Dict], path: str, keys: Sequence[str] = ("auc", "f1", "dice")) -> Optional[str]:
    """Grouped bars (one panel per split, one group per metric) with the bootstrap intervals as
    error bars; the legend sits outside the axes. Returns ``path`` or None without rows."""
    from .figures import pyplot, save_figure

    if not rows:
        return None
    plt = pyplot()
    splits = list(dict.fromkeys(r["split"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits) + 1.5, 3.2), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, split in zip(axes[0], splits):
        for j, meth in enumerate(methods):
            r = next((r for r in rows if r["split"] == split and r["method"] == meth), None)
            if r is None:
                continue
            vals = np.array([r["metrics"].get(k, (np.nan,) * 3) for k in keys], float)
            err = np.abs(vals[:, 1:].T - vals[:, 0])
            ax.bar(np.arange(len(keys)) + j * width, np.nan_to_num(vals[:, 0]), width,
                   yerr=np.nan_to_num(err), capsize=2, label=meth)
        ax.set_xticks(np.arange(len(keys)) + width * (len(methods) - 1) / 2)
        ax.set_xticklabels([k.upper() for k in keys])
        ax.set_ylim(0, 1.05)
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.set_title(split, fontsize=9)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.suptitle("test metrics with 95% bootstrap intervals (dotted: AUC of chance)", fontsize=9)
    return save_figure(fig, path)
