"""Checks of a data set's classes before any training: every class has samples in the data
and in the training split (else a one-line ``DataError`` naming the split and the class); a
test split without some class is warned by name (its AUC is undefined)."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

from .records import DataError

log = logging.getLogger("avpt.data")


def _counts(labels: Sequence[int], classes: Sequence[str]) -> str:
    c = Counter(int(v) for v in labels)
    return ", ".join(f"{c.get(i, 0)} {name}" for i, name in enumerate(classes))


def check_split_classes(train_labels: Sequence[int], test_labels: Sequence[int],
                        classes: Sequence[str], split: str) -> None:
    """``train_labels`` / ``test_labels``: the labels (0..C-1) of the training and test samples
    of ``split`` (e.g. "fold 2 of 5"); ``classes``: the C class names. A training split that
    lacks a class is refused (the model would learn fewer classes than it reports); a test split
    that lacks one is warned."""
    missing = [name for i, name in enumerate(classes) if i not in {int(v) for v in train_labels}]
    if missing:
        raise DataError(f"the training samples of {split} have no {' / '.join(map(repr, missing))} "
                        f"sample ({_counts(train_labels, classes)}): a model trained on them knows "
                        f"fewer classes; add data of that class, use fewer --set folds=K, or "
                        f"--set fold=null")
    absent = [name for i, name in enumerate(classes) if i not in {int(v) for v in test_labels}]
    if absent:
        log.warning("the test samples of %s have no %s sample (%s): AUC and F1 over classes are "
                    "undefined for it", split, " / ".join(map(repr, absent)),
                    _counts(test_labels, classes))
