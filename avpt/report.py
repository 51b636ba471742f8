"""Figures of a run and a self-contained report.html (images embedded as base64 PNG).

Figures (under OUT/figures/):
  * ``curves.png``          training curves: loss terms and test metrics per epoch;
  * ``segmentation.png``    segmentation overlays (paper Fig. 5): truth contour green, prediction red;
  * a method's own figures (``Method.report_sections``; A-VPT's rollout overlays and attention
    by prompt type are drawn in ``avpt.methods.avpt.rollout``);
  * ``tsne.png``            t-SNE of the tissue (region) embeddings, by modality and tissue (Fig. 6).
"""
from __future__ import annotations

import base64
import html
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .figures import gray01, pick_examples, pyplot, sample_title, save_figure, stack_batch

TISSUES = ("glandular", "fatty", "ductal")


def curves(history: List[Dict], path: str) -> Optional[str]:
    if not history:
        return None
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for k in sorted(k for k in history[0] if k.startswith("train_")):
        axes[0].plot(ep, [h.get(k, np.nan) for h in history], marker="o", label=k[6:])
    axes[0].set_xlabel("epoch"), axes[0].set_title("training loss terms"), axes[0].legend(fontsize=7)
    for k in ("test_auc", "test_f1", "test_dice", "test_iou"):
        vals = [h.get(k, np.nan) for h in history]
        if not all(v is None or np.isnan(v) for v in vals):
            axes[1].plot(ep, [np.nan if v is None else v for v in vals], marker="o", label=k[5:])
    axes[1].set_xlabel("epoch"), axes[1].set_title("test metrics"), axes[1].set_ylim(0, 1.05)
    if axes[1].lines:
        axes[1].legend(fontsize=7)
    else:  # eval_every 0: the test set is scored once, at the end, not per epoch
        axes[1].text(0.5, 0.5, "test set scored once, after training\n(see the metrics table)",
                     ha="center", va="center", fontsize=8, transform=axes[1].transAxes)
    return save_figure(fig, path)


def segmentation(dataset, pred: Dict, indices: List[int], path: str) -> Optional[str]:
    if pred.get("preds") is None or not indices:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(indices), figsize=(2.2 * len(indices), 2.5), squeeze=False)
    for ax, i in zip(axes[0], indices):
        ax.imshow(gray01(dataset[i]["image"]), cmap="gray")
        if pred["gts"][i].any():
            ax.contour(pred["gts"][i], levels=[0.5], colors="lime", linewidths=1)
        if pred["preds"][i].any():
            ax.contour(pred["preds"][i], levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"{sample_title(dataset, i)}\np={pred['probs'][i]:.2f}", fontsize=7)
        ax.axis("off")
    fig.suptitle("segmentation: truth (green) vs prediction (red)", fontsize=9)
    return save_figure(fig, path)


@torch.no_grad()
def tsne(model, datasets, device, path: str, max_images: int = 150) -> Optional[str]:
    """t-SNE of region embeddings [R per image] (A-VPT) or pooled features (other methods)."""
    from sklearn.manifold import TSNE

    plt = pyplot()
    feats, mods, kinds = [], [], []
    model.eval()
    for ds in datasets:
        idx = pick_examples(ds, max_images)
        for start in range(0, len(idx), 32):
            batch = stack_batch(ds, idx[start:start + 32], device)
            out = model(batch["image"], maps=model.forward_maps(batch), modality=batch["modality"])
            names = [ds.records[i].modality for i in idx[start:start + 32]]
            if out.region_emb is not None:
                e = out.region_emb.float().cpu().numpy()
                for b in range(e.shape[0]):
                    for r in range(e.shape[1]):
                        feats.append(e[b, r]), mods.append(names[b])
                        kinds.append(TISSUES[r] if r < len(TISSUES) else f"region {r}")
            else:
                for b, f in enumerate(out.pooled.float().cpu().numpy()):
                    feats.append(f), mods.append(names[b]), kinds.append("image")
    if len(feats) < 6:
        return None
    x = np.stack(feats)
    emb = TSNE(2, perplexity=float(min(30, len(x) - 1) / 2 or 1), init="pca",
               random_state=0).fit_transform(x)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    markers = {"MG": "o", "US": "s", "MRI": "^"}
    colors = {"glandular": "tab:red", "fatty": "tab:orange", "ductal": "tab:blue", "image": "tab:gray"}
    for m in sorted(set(mods)):
        for k in sorted(set(kinds)):
            sel = [i for i in range(len(mods)) if mods[i] == m and kinds[i] == k]
            if sel:
                ax.scatter(emb[sel, 0], emb[sel, 1], s=12, marker=markers.get(m, "o"),
                           c=colors.get(k, "tab:green"), alpha=0.7, label=f"{m} {k}")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("t-SNE of tissue embeddings (marker: modality, colour: tissue)", fontsize=8)
    return save_figure(fig, path)


def backbone_note(result: Dict) -> str:
    """The report's warning when the run's frozen backbone had random weights ("" otherwise)."""
    record = result.get("backbone") or {}
    if record.get("pretrained") or not record:
        return ""
    return ("<b>Warning: the frozen backbone has random weights</b> (no <code>--pretrained</code>"
            f"; {html.escape(str(record.get('model_name')))}, init seed {record.get('init_seed')}): "
            "these numbers show that the pipeline runs, not what the method can learn.")


def write_run_report(model, train_set, test_set, pred: Dict, result: Dict, out: str, device,
                     num_images: int = 6) -> Tuple[Dict[str, str], str]:
    """All figures of a run and OUT/report.html; returns ({name: path}, report path)."""
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    figures: Dict[str, Optional[str]] = {}
    path = os.path.join(out, "report.html")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        import logging
        logging.getLogger(__name__).warning("matplotlib is not installed: report without figures")
        write_html(path, "A-VPT run report", [("Run", result)], {}, notes=backbone_note(result))
        return {}, path
    idx = pick_examples(test_set, num_images)
    figures["training curves"] = curves(result.get("history", []), os.path.join(fig_dir, "curves.png"))
    figures["segmentation overlays (Fig. 5)"] = segmentation(test_set, pred, idx,
                                                             os.path.join(fig_dir, "segmentation.png"))
    figures.update(model.report_sections(test_set, idx[:4], device, fig_dir))
    figures["t-SNE of tissue embeddings by modality (Fig. 6)"] = tsne(
        model, [train_set, test_set], device, os.path.join(fig_dir, "tsne.png"))
    figures = {k: v for k, v in figures.items() if v}
    write_html(path, "A-VPT run report", [("Run", result)], figures, notes=backbone_note(result))
    return figures, path


def img_tag(path: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if not np.isfinite(v) else f"{v:.4f}"
    if v is None:
        return "n/a"
    return html.escape(str(v))


def _metric_cell(t: Dict, k: str) -> str:
    """A metrics-table cell; HD95 with its unit (mm or px) beside the figure."""
    cell = _fmt(t.get(k))
    if k == "hd95" and t.get("hd95_unit") and cell != "n/a":
        cell += f" {html.escape(str(t['hd95_unit']))}"
    return cell


def segmentation_note(tests: List[Dict], grouped: bool = False) -> str:
    """What the segmentation figures of these test dicts are: resolution, HD95 unit and
    convention, the empty-mask rules and how many images each touched; with ``grouped``, how
    the per-patient/per-breast rows are made."""
    from .metrics import EMPTY_PREDICTION_RULES, HD95_CONVENTIONS

    seg = [t for t in tests if t.get("hd95_convention")]
    if not seg:
        return "Segmentation metrics are over test images with a lesion."
    t = seg[0]
    where = ("at each image's original size (predicted masks resized back)"
             if t.get("resolution") == "native" else "at the model's input size")
    units = sorted({str(s.get("hd95_unit")) for s in seg})
    counts = "; ".join(f"{s.get('empty_truth_images', 0)} without a lesion left out "
                       f"({s.get('empty_truth_false_positives', 0)} with a predicted mask), "
                       f"{s.get('empty_prediction_images', 0)} lesion images with an empty "
                       f"prediction" for s in seg)
    groups = (" Per-patient/per-breast rows: a group's probability is the mean of its views', "
              "its label the largest; Dice, IoU, HD95 the mean over its lesion images, then over "
              "groups with a lesion." if grouped else "")
    return (f"Dice, IoU and HD95 {where}, over test images with a lesion. HD95 in "
            f"{' / '.join(units)} (mm where the DICOM pixel spacing is known, else pixels), "
            f"convention {t['hd95_convention']}: {HD95_CONVENTIONS[t['hd95_convention']]}. A lesion "
            f"image with an empty prediction has Dice = IoU = 0 and for HD95 "
            f"{EMPTY_PREDICTION_RULES[t['hd95_empty_prediction']]}. Per run: {counts}.{groups}")


def write_html(path: str, title: str, runs: List[Tuple[str, Dict]], figures: Dict[str, str],
               notes: str = "") -> str:
    """A single HTML file: a metrics table per run, the figures inline, the resolved configs."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
             "pre{background:#f6f6f6;padding:.5em;overflow:auto;font-size:11px}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if notes:
        parts.append(f"<p>{notes}</p>")
    keys = ("auc", "f1", "accuracy", "dice", "iou", "hd95", "n")
    parts.append("<h2>Test metrics</h2><table><tr><th>run</th>" +
                 "".join(f"<th>{k}</th>" for k in keys) + "<th>split</th><th>device</th><th>time (s)</th></tr>")
    for name, res in runs:
        rows = [(name, res.get("test", {}))] + [(f"{name}, per {group}", g) for group, g in
                                                (res.get("test_by") or {}).items()]
        for label, t in rows:
            parts.append(f"<tr><td>{html.escape(label)}</td>"
                         + "".join(f"<td>{_metric_cell(t, k)}</td>" for k in keys)
                         + f"<td>{_fmt(res.get('data', {}).get('split'))}</td>"
                         f"<td>{_fmt(res.get('device'))}</td><td>{_fmt(res.get('time_s'))}</td></tr>")
    note = segmentation_note([r.get("test", {}) for _, r in runs],
                             any(r.get("test_by") for _, r in runs))
    parts.append(f"</table><p>{html.escape(note)}</p>")
    for name, res in runs:
        if "params" in res:
            p = res["params"]
            parts.append(f"<p>{html.escape(name)}: {p['trainable']:,} trainable parameters, "
                         f"{p['percent_of_visual']:.3f}% of the visual tower.</p>")
    for caption, fig in figures.items():
        parts.append(f"<h2>{html.escape(caption)}</h2>{img_tag(fig)}")
    for name, res in runs:
        cfg = {k: v for k, v in res.items() if k in ("config", "data")}
        parts.append(f"<h2>Configuration: {html.escape(name)}</h2><pre>"
                     f"{html.escape(json.dumps(cfg, indent=1, default=str))}</pre>")
    parts.append("</body></html>")
    from .run_io import write_text

    write_text(path, "\n".join(parts))
    return path
