"""BUSI (Breast Ultrasound Images, Al-Dhabyani et al. 2020).

Layout: ``ROOT/Dataset_BUSI_with_GT/{benign,malignant,normal}/NAME (i).png`` with the lesion mask
``NAME (i)_mask.png`` and, for images with several lesions, ``NAME (i)_mask_1.png``,
``_mask_2.png``... merged by OR. ``ROOT`` may also be the ``Dataset_BUSI_with_GT`` folder itself.
Masks are never samples. Normal images have empty masks (their mask files, when present, are
read and checked to be empty-compatible; when absent the mask is all zero).
BUSI has no patient ids: every image is its own group. ``normal``: "benign" labels normal images
0 (not malignant, the default), "exclude" leaves them out (a documented change of the count),
"class" makes three classes for methods that need them (CILMP): normal 0, benign 1, malignant 2
(``THREE_CLASSES``).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List

import numpy as np

from .records import DataError, RawSample, Record, check_unique_ids, read_mask, read_png_gray, to_unit

CLASSES = ("benign", "malignant", "normal")
THREE_CLASSES = ("normal", "benign", "malignant")  # labels 0, 1, 2 with normal="class"
NORMAL_OPTIONS = ("benign", "exclude", "class")
_IMAGE = re.compile(r"^(?P<stem>.+\(\d+\))\.png$", re.IGNORECASE)
_MASK = re.compile(r"^(?P<stem>.+\(\d+\))_mask(?:_\d+)?\.png$", re.IGNORECASE)


def find_root(root: str) -> str:
    for cand in (os.path.join(root, "Dataset_BUSI_with_GT"), root):
        if all(os.path.isdir(os.path.join(cand, c)) for c in ("benign", "malignant")):
            return cand
    raise DataError(f"{root}: not a BUSI folder (expected Dataset_BUSI_with_GT/{{benign,malignant,"
                    f"normal}}/ or those class folders directly)")


def _loader(image_path: str, mask_paths: List[str]):
    def load() -> RawSample:
        image = read_png_gray(image_path)
        mask = np.zeros(image.shape, dtype=bool)
        for mp in mask_paths:
            m = read_mask(mp)  # decoded by its mode: palette, alpha, 16-bit, grey
            if m.shape != image.shape:
                raise DataError(f"{mp}: mask shape {m.shape} != image shape {image.shape}")
            mask |= m
        return RawSample(image=to_unit(image, 0.0, 100.0), mask=mask)
    return load


def load_busi(root: str, normal: str = "benign") -> List[Record]:
    if normal not in NORMAL_OPTIONS:
        raise ValueError(f"normal must be one of {NORMAL_OPTIONS}, got {normal!r}")
    base = find_root(root)
    records: List[Record] = []
    for cls in CLASSES:
        folder = os.path.join(base, cls)
        if not os.path.isdir(folder):
            if cls == "normal":
                continue
            raise DataError(f"{folder}: missing class folder")
        if cls == "normal" and normal == "exclude":
            continue
        files = sorted(os.listdir(folder))
        masks: Dict[str, List[str]] = {}
        images = []
        for f in files:
            mm = _MASK.match(f)
            if mm:
                masks.setdefault(mm.group("stem"), []).append(os.path.join(folder, f))
                continue
            im = _IMAGE.match(f)
            if im:
                images.append((im.group("stem"), os.path.join(folder, f)))
            elif f.lower().endswith(".png"):  # neither an image nor a mask: refuse, don't guess
                raise DataError(f"{os.path.join(folder, f)}: not a BUSI file name (expected "
                                f"'NAME (i).png' or 'NAME (i)_mask[_k].png')")
        stems = {s for s, _ in images}
        orphans = sorted(set(masks) - stems)
        if orphans:
            raise DataError(f"{folder}: mask without image for {orphans[:3]}")
        for stem, path in images:
            mask_paths = sorted(masks.get(stem, []))
            if not mask_paths and cls != "normal":
                raise DataError(f"{path}: no mask file ({stem}_mask.png) for a {cls} image")
            sid = _sample_id(cls, stem)
            label = THREE_CLASSES.index(cls) if normal == "class" else int(cls == "malignant")
            records.append(Record(sample_id=sid, patient_id=sid, label=label,
                                  modality="US", loader=_loader(path, mask_paths), source=path,
                                  report=f"US {sid}: {cls} breast ultrasound."))
        if not images and (cls != "normal" or normal == "class"):  # a class with no sample
            raise DataError(f"{folder}: class folder {cls!r} has no image (a model trained "
                            f"without it would learn fewer classes); put the {cls} images there "
                            f"or fix --data-root")
    if not records:
        raise DataError(f"{base}: no image found")
    check_unique_ids(records)
    return records


def _sample_id(cls: str, stem: str) -> str:
    """``busi-CLASS-i`` for BUSI's own names (``benign (12)`` in benign/), else the name is kept
    (``other (1)`` in benign/ -> ``busi-benign-other-1``), so no two files share an id."""
    name, num = re.match(r"^(.*?)\s*\((\d+)\)$", stem).groups()
    if name.strip().lower() == cls:
        return f"busi-{cls}-{num}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-") or "x"
    return f"busi-{cls}-{slug}-{num}"
