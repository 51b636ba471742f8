"""How much of a microcalcification cluster survives mammogram preprocessing (a measurement, not
a test; not collected by pytest): ``python -m benchmarks.calcification_contrast [--size 224]``.

A synthetic 4084 x 3328 mammogram (14-bit, 70 um pixels: smooth fibroglandular texture on a
half-ellipse breast, dark background) holds a cluster of 12 calcifications, 0.35-0.7 mm (5-10
pixels) across. Two pipelines, each followed by the dataset's resize to the model's input and,
optionally, CLAHE:

* ``clip99.5``: the former one, 0.5/99.5-percentile clip of the whole image, stretched to a square;
* ``keep-top``: ``avpt.data.mammo.preprocess`` (full range, no top clip, chest wall left, cropped
  to the breast, padded square) then the aspect-keeping resize.

Printed per pipeline (one JSON row each): at native resolution, the fraction of tissue pixels
as bright as the dimmest calcification (1.0 = calcifications indistinguishable from the
brightest tissue); at model size, the cluster's contrast-to-noise ratio, (peak in the cluster -
median of the tissue around it) / std of that tissue.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

ROWS, COLS = 4084, 3328


def synthetic_mammogram(seed: int = 0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    r, c = np.mgrid[:ROWS, :COLS]
    breast = ((r - ROWS / 2) / (ROWS / 2.3)) ** 2 + (c / (0.8 * COLS)) ** 2 <= 1
    texture = gaussian_filter(rng.standard_normal((-(-ROWS // 8), -(-COLS // 8))), 6)
    texture = np.kron((texture - texture.min()) / np.ptp(texture), np.ones((8, 8)))[:ROWS, :COLS]
    img = np.where(breast, 1400 + 900 * texture + rng.normal(0, 25, (ROWS, COLS)),
                   60 + rng.normal(0, 5, (ROWS, COLS)))
    cluster = np.zeros((ROWS, COLS), bool)
    cy, cx = 1900, 1300
    for _ in range(12):
        y, x = cy + rng.integers(-60, 60), cx + rng.integers(-60, 60)
        half = int(rng.integers(2, 6))
        cluster[y - half:y + half + 1, x - half:x + half + 1] = True
    img[cluster] = 3300 + rng.normal(0, 25, int(cluster.sum()))
    return np.clip(img, 0, 16383), cluster


def measure(image: np.ndarray, cluster: np.ndarray) -> dict:
    ys, xs = np.nonzero(cluster)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    pad = max(3, (y1 - y0))
    ring = np.zeros_like(cluster)
    ring[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad] = True
    ring[y0:y1, x0:x1] = False
    tissue = image[ring & (image > 0)]
    peak = float(image[y0:y1, x0:x1].max())
    return {"cnr": (peak - float(np.median(tissue))) / max(float(tissue.std()), 1e-6)}


def run(size: int, clahe_on: bool) -> list:
    from pydicom.dataset import Dataset

    from avpt.data import transforms as T
    from avpt.data.mammo import preprocess
    from avpt.data.records import to_unit

    pixels, cluster = synthetic_mammogram()
    ds = Dataset()
    ds.PhotometricInterpretation, ds.ImageLaterality = "MONOCHROME2", "L"
    rows = []
    old = to_unit(pixels)
    new, new_cluster = preprocess(pixels, ds, cluster)
    for name, img, mask in (("clip99.5", old, cluster), ("keep-top", new, new_cluster)):
        tissue = img[(~mask) & (img > 0.05)]
        ys, xs = np.nonzero(mask)        # the cluster's box: single calcifications vanish at order 0
        box = np.zeros(mask.shape, np.float32)
        box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1
        if name == "clip99.5":   # the former resize: stretch to a square
            from skimage.transform import resize as sk_resize
            small = sk_resize(img, (size, size), anti_aliasing=True, preserve_range=True)
            small_mask = sk_resize(box, (size, size), order=0) > 0.5
        else:
            small, small_mask = T.resize(img, size), T.resize(box, size, 0) > 0.5
        if clahe_on:
            small = T.clahe(small)
        rows.append(dict(pipeline=name, size=size, clahe=clahe_on,
                         native_tissue_at_or_above_dimmest_calc=float((tissue >= img[mask].min()).mean()),
                         **measure(small, small_mask)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    for clahe_on in (False, True):
        for row in run(args.size, clahe_on):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
