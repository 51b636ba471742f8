"""The data of a run: the training and test sets a config names (a patient-level fold or a
cross-modal / cross-dataset transfer), the classes they hold, and what the method takes from them.

``build_data(cfg, image_size, out)`` -> (train set, test set, info); ``class_settings`` (the
method settings the data's classes set); ``classes_record`` (metrics.json's ``classes``).
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch


def build_data(cfg: Dict, image_size: int, out: str, main: bool = True, training: bool = True):
    """(train dataset, test dataset, info) per the config: a fold of the patient-level k-fold
    split, or a cross-modal/cross-dataset transfer (train on one, test on another).
    ``training=False`` (evaluation of a saved model: nothing is trained on the training split)
    only warns about classes the splits lack. With ``shots`` K the training set is K images per
    class (``avpt.data.folds.few_shot_indices``; the same draw when a saved model is
    evaluated), recorded in ``info["few_shot"]``; the normalisation statistics are then those
    of the K-shot images."""
    from .data import BreastDataset, Subset, load_records
    from .data.folds import load_or_make_folds, split_indices
    from .data.transforms import modality_stats

    recs = load_records(cfg["dataset"], cfg["data_root"], cfg["modality"], cfg["seed"], image_size,
                        cfg["data"])
    common = dict(seed=cfg["seed"], clahe=cfg["clahe"], rotation=cfg["rotation"], flip=cfg["flip"],
                  skip_bad=cfg["skip_bad"], pipeline=cfg["pipeline"])
    transfer = cfg["test_dataset"] is not None or cfg["test_modality"] is not None
    info: Dict[str, Any] = dict(getattr(recs, "provenance", None) or {})  # e.g. Duke's series
    if transfer:
        train = BreastDataset(recs, image_size, train=True, **common)
        if cfg["shots"]:
            chosen = _few_shot(cfg, train, range(len(train)), "the transfer's training data", info)
            train.stats.update(modality_stats(_images_by_modality(train, chosen)))
            train = Subset(train, chosen, True)
        test_recs = load_records(cfg["test_dataset"] or cfg["dataset"],
                                 cfg["test_data_root"] or cfg["data_root"], cfg["test_modality"],
                                 cfg["seed"], image_size, cfg["data"])
        test = BreastDataset(test_recs, image_size, train=False, stats=train.stats, **common)
        info.update({f"test_{k}": v for k, v in (getattr(test_recs, "provenance", None) or {}).items()})
        _check_classes(cfg, [r.label for r in train.records], [r.label for r in test.records],
                       "the transfer", training)
        info.update(split="transfer", skipped=len(train.skipped) + len(test.skipped),
                    train_modalities=sorted(set(train.modalities)),
                    test_modalities=sorted(set(test.modalities)))
        return train, test, info
    full = BreastDataset(recs, image_size, train=False, **common)
    if cfg["fold"] is None:
        labels = [r.label for r in full.records]
        _check_classes(cfg, labels, labels, "the data set (fold=null)", training)
        train_idx = range(len(full))
        if cfg["shots"]:
            train_idx = _few_shot(cfg, full, train_idx, "the data set (fold=null)", info)
        return Subset(full, train_idx, True), Subset(full, range(len(full)), False), \
            dict(info, split="none (test = train)", skipped=len(full.skipped))
    folds_file = cfg["folds_file"] or os.path.join(out, "folds.json")
    if main:
        folds = load_or_make_folds(folds_file, full.records, cfg["folds"], cfg["seed"])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if not main:
        folds = load_or_make_folds(folds_file, full.records, cfg["folds"], cfg["seed"])
    if not 0 <= int(cfg["fold"]) < len(folds):
        raise ValueError(f"fold must be in [0, {len(folds)}), got {cfg['fold']}")
    idx = split_indices(full.records, folds[int(cfg["fold"])])
    _check_classes(cfg, [full.records[i].label for i in idx["train"]],
                   [full.records[i].label for i in idx["test"]],
                   f"fold {cfg['fold']} of {len(folds)}", training)
    if cfg["shots"]:
        idx["train"] = _few_shot(cfg, full, idx["train"], f"fold {cfg['fold']} of {len(folds)}",
                                 info)
    # normalisation statistics from the training images only
    full.stats.update(modality_stats(_images_by_modality(full, idx["train"])))
    info.update(split=f"fold {cfg['fold']} of {len(folds)}", folds_file=folds_file,
                skipped=len(full.skipped))
    return Subset(full, idx["train"], True), Subset(full, idx["test"], False), info


def _images_by_modality(dataset, indices) -> Dict[str, list]:
    by_mod: Dict[str, list] = {}
    for i in indices:
        by_mod.setdefault(dataset.records[i].modality, []).append(dataset.images[i])
    return by_mod


def _few_shot(cfg: Dict, dataset, indices, split: str, info: Dict) -> list:
    """The K-shot training indices (``cfg["shots"]``, drawn with ``shots_seed`` or the run's
    seed), recorded in ``info["few_shot"]``: K, the seed, the images and patients drawn."""
    from .data.folds import few_shot_indices
    from .validate import data_classes

    seed = cfg["seed"] if cfg["shots_seed"] is None else cfg["shots_seed"]
    chosen = few_shot_indices(dataset.records, list(indices), int(cfg["shots"]), int(seed),
                              data_classes(cfg["dataset"], cfg["data"]), split)
    info["few_shot"] = {"shots": int(cfg["shots"]), "seed": int(seed),
                        "samples": [dataset.records[i].sample_id for i in chosen],
                        "patients": sorted({dataset.records[i].patient_id for i in chosen})}
    return chosen


def _check_classes(cfg: Dict, train_labels, test_labels, split: str,
                   training: bool = True) -> None:
    """Every class of the data set in the training samples (else a DataError; not when nothing
    trains on them), warned for the test samples (``avpt.data.checks``)."""
    from .data.checks import check_split_classes
    from .validate import data_classes

    classes = data_classes(cfg["dataset"], cfg["data"])
    check_split_classes(train_labels if training else range(len(classes)), test_labels, classes,
                        split)


def unaugmented(train_set):
    """The training set of ``build_data`` with the evaluation transforms: the same items in the
    same order, no augmentation (what ``Method.prepare`` reads)."""
    from .data import Subset

    if isinstance(train_set, Subset):
        return Subset(train_set.base, train_set.indices, False)
    return Subset(train_set, range(len(train_set)), False)


def class_settings(cfg: Dict, given: Dict) -> Dict:
    """Method settings from the data's classes (``avpt.validate.data_classes``) that ``given``
    (the user's model settings) leaves open: with C > 2 classes ``num_classes`` = C and, for a
    method whose config has ``class_names`` (text prompts), the data's class names; for one with
    ``modality_word`` (BiomedAP) the data's (``avpt.data.modality_word``)."""
    from .methods import get_config_class
    from .validate import data_classes

    classes = data_classes(cfg["dataset"], cfg["data"])
    out: Dict[str, Any] = {}
    fields = get_config_class(cfg["method"]).__dataclass_fields__
    if "modality_word" in fields and given.get("modality_word") is None:  # BiomedAP's prompts
        from .data import modality_word

        out["modality_word"] = modality_word(cfg["dataset"], cfg["modality"])
    if len(classes) == 2:
        return out
    out["num_classes"] = len(classes)
    if "class_names" in fields:
        out["class_names"] = tuple(classes)
    return {k: v for k, v in out.items() if k not in given}


def classes_record(cfg: Dict) -> Dict:
    """metrics.json's ``classes``: the class names (labels 0..C-1) and what auc/f1 mean."""
    from .metrics import metric_kind
    from .validate import data_classes

    names = data_classes(cfg["dataset"], cfg["data"])
    return {"names": list(names), "metrics": metric_kind(len(names))}
