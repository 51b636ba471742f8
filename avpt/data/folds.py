"""Patient-level stratified k-fold splits, written to disk once and reused.

``make_folds(records, k, seed)``: scikit-learn's ``StratifiedGroupKFold`` over patient ids (a
patient's images never straddle train and test) stratified by label. ``load_or_make_folds``
writes ``folds.json`` (sample ids per fold, plus the seed and k) and, when the file exists,
reads it back and checks that it covers exactly the current sample ids, so every run, method
and seed of a study uses the same folds.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

import numpy as np

from .records import DataError, Record


def make_folds(records: Sequence[Record], k: int = 5, seed: int = 0) -> List[List[str]]:
    """k lists of test sample ids; every sample in exactly one, no patient in two."""
    from sklearn.model_selection import StratifiedGroupKFold

    patients = {r.patient_id for r in records}
    if len(patients) < k:
        raise ValueError(f"{k}-fold cross-validation needs at least {k} patients, got {len(patients)}")
    labels = np.array([r.label for r in records])
    groups = np.array([r.patient_id for r in records])
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    for _, test in splitter.split(np.zeros(len(records)), labels, groups):
        folds.append(sorted(records[i].sample_id for i in test))
    return folds


def load_or_make_folds(path: str, records: Sequence[Record], k: int = 5, seed: int = 0) -> List[List[str]]:
    ids = {r.sample_id for r in records}
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        folds = saved["folds"]
        covered = {s for fold in folds for s in fold}
        if covered != ids or len(folds) != k:
            raise DataError(f"{path}: the saved folds ({len(folds)} folds, {len(covered)} samples) "
                            f"do not match this data set ({k} folds, {len(ids)} samples): they were "
                            f"made for other data; to evaluate on the whole of this data set give "
                            f"--set fold=null, to make new folds give --set folds_file=NEW.json")
        return folds
    folds = make_folds(records, k, seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from avpt_kernels._files import write_bytes_atomic

    write_bytes_atomic(path, json.dumps({"k": k, "seed": seed, "folds": folds}, indent=1).encode())
    return folds


def split_indices(records: Sequence[Record], test_ids: Sequence[str]) -> Dict[str, List[int]]:
    test = set(test_ids)
    return {"train": [i for i, r in enumerate(records) if r.sample_id not in test],
            "test": [i for i, r in enumerate(records) if r.sample_id in test]}


def few_shot_indices(records: Sequence[Record], indices: Sequence[int], shots: int, seed: int,
                     class_names: Sequence[str], split: str = "the training split") -> List[int]:
    """K = ``shots`` training images per class out of ``indices`` (into ``records``), drawn
    patient by patient: per class, the class's patients in an order drawn from ``seed``, each
    one's images of that class (in a drawn order) taken until K are in; only the last patient
    may give fewer than all its images. The draw is a subset of the training split, which is
    patient-level, so no patient reaches the test set. Sorted indices; a class with fewer than K
    images is a one-line ``ConfigError`` naming --shots and the class."""
    from ..errors import ConfigError

    rng = np.random.default_rng((seed, 31, shots))
    chosen: List[int] = []
    for label, name in enumerate(class_names):
        by_patient: Dict[str, List[int]] = {}
        for i in indices:
            if records[i].label == label:
                by_patient.setdefault(records[i].patient_id, []).append(i)
        count = sum(len(v) for v in by_patient.values())
        if count < shots:
            raise ConfigError(f"--shots {shots}: class {name!r} has {count} training images in "
                              f"{split}; give --shots {count} or fewer")
        taken: List[int] = []
        for p in rng.permutation(sorted(by_patient)):
            images = by_patient[str(p)]
            taken += [images[j] for j in rng.permutation(len(images))][:shots - len(taken)]
            if len(taken) == shots:
                break
        chosen += taken
    return sorted(chosen)
