"""What every figure of the package is drawn with: matplotlib without a display, PNG files, and
the samples shown (picked, stacked, titled). Used by the run report (``avpt.report``), the
methods table (``avpt.methods_table``) and a method's own figures (``Method.report_sections``).
Imports nothing else of ``avpt``."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    """Write ``fig`` to ``path`` (PNG, 90 dpi), close it; returns ``path``."""
    fig.savefig(path, dpi=90, bbox_inches="tight")
    pyplot().close(fig)
    return path


def pick_examples(dataset, n: int, seed: int = 0) -> List[int]:
    """Up to n indices, spread over modalities and labels, deterministic."""
    rng = np.random.default_rng(seed)
    groups: Dict[Tuple[str, int], List[int]] = {}
    for i, (m, y) in enumerate(zip(dataset.modalities, dataset.labels)):
        groups.setdefault((m, int(y)), []).append(i)
    order = [list(rng.permutation(v)) for _, v in sorted(groups.items())]
    picked: List[int] = []
    while len(picked) < n and any(order):
        for g in order:
            if g and len(picked) < n:
                picked.append(int(g.pop(0)))
    return picked


def stack_batch(dataset, indices: List[int], device) -> Dict[str, torch.Tensor]:
    """The items ``indices`` of ``dataset`` stacked per key ([n, ...]) on ``device``."""
    items = [dataset[i] for i in indices]
    return {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}


def gray01(img: torch.Tensor) -> np.ndarray:
    """The first channel of img [C, H, W], min-max scaled to [0, 1] (a numpy [H, W])."""
    g = img[0].float().cpu().numpy()
    return (g - g.min()) / max(g.max() - g.min(), 1e-8)


def sample_title(dataset, i: int) -> str:
    """A figure title for sample ``i``: its modality and label."""
    rec = dataset.records[i]
    return f"{rec.modality} {'malig.' if rec.label else 'benign'}"
