"""Data: the synthetic phantom (default, no files needed) and real-format loaders (BUSI, INbreast,
Duke-Breast-Cancer-MRI), preprocessing/augmentation, folds and the modality-alternating sampler.

``load_records(dataset, root, modalities, **options) -> list[Record]`` is the one entry point.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .dataset import BreastDataset, ModalityBatchSampler, Subset
from .modalities import (DATASET_MODALITY, DATASETS, GENERIC_MODALITY_WORD, MODALITIES,
                         MODALITY_WORDS, modality_word)
from .phantom import make_phantom
from .records import DataError, RawSample, Record, check_unique_ids



def phantom_records(num_patients: int = 16, views: int = 2, modalities: Sequence[str] = MODALITIES,
                    seed: int = 0, size: int = 224, phase: str = "post",
                    lesion_scale: float = 1.0) -> List[Record]:
    """``views`` images of each of ``num_patients`` patients per modality, generated lazily."""
    records = []
    for m in modalities:
        for p in range(num_patients):
            for v in range(views):
                def load(m=m, p=p, v=v) -> RawSample:
                    s = make_phantom(seed, m, p, v, size=size, phase=phase,
                                     lesion_scale=lesion_scale)
                    return RawSample(image=s.image, mask=s.mask, tissue=s.tissue, report=s.report)
                s_label = p % 2
                pid = f"{m}-P{p:04d}"
                records.append(Record(sample_id=f"{pid}-v{v}", patient_id=pid, label=s_label,
                                      modality=m, loader=load, source=f"phantom:{pid}-v{v}",
                                      report=""))
    return records


def load_records(dataset: str, root: Optional[str] = None, modalities: Optional[Sequence[str]] = None,
                 seed: int = 0, image_size: int = 224, options: Optional[Dict] = None) -> List[Record]:
    """Records of ``dataset``. ``modalities`` selects phantom modalities (real data sets have one).
    ``options``: per-loader settings (phantom: num_patients, views, phase, lesion_scale; busi: normal;
    inbreast: birads_threshold, window; duke: phase, negatives_per_patient, slices_per_lesion,
    annotations, index_base, unresolved, slice_order, negative_gap, edge_margin). Duke's records
    carry ``provenance`` (the series chosen per patient, the patients skipped)."""
    options = dict(options or {})
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if dataset == "phantom":
        mods = list(modalities or MODALITIES)
        bad = [m for m in mods if m not in MODALITIES]
        if bad:
            raise ValueError(f"modality must be among {MODALITIES}, got {bad}")
        recs = phantom_records(options.get("num_patients", 16), options.get("views", 2), mods, seed,
                               image_size, options.get("phase", "post"),
                               float(options.get("lesion_scale", 1.0)))
        return recs
    if not root:
        raise ValueError(f"--data-root is required for dataset {dataset!r}")
    want = DATASET_MODALITY[dataset]
    if modalities and list(modalities) != [want]:
        raise ValueError(f"dataset {dataset!r} is {want} only, got modality {list(modalities)}")
    if dataset == "busi":
        from .busi import load_busi
        recs = load_busi(root, normal=options.get("normal", "benign"))
    elif dataset == "inbreast":
        from .inbreast import load_inbreast
        recs = load_inbreast(root, birads_threshold=str(options.get("birads_threshold", "4a")),
                             window=bool(options.get("window", True)))
    else:
        from .duke import EDGE_MARGIN, NEGATIVE_GAP, load_duke
        recs = load_duke(root, phase=options.get("phase", "post"),
                         negatives_per_patient=int(options.get("negatives_per_patient", 1)),
                         slices_per_lesion=int(options.get("slices_per_lesion", 3)),
                         annotations=options.get("annotations"),
                         index_base=int(options.get("index_base", 1)), seed=seed,
                         unresolved=options.get("unresolved", "skip"),
                         slice_order=options.get("slice_order", "instance"),
                         negative_gap=int(options.get("negative_gap", NEGATIVE_GAP)),
                         edge_margin=float(options.get("edge_margin", EDGE_MARGIN)))
    check_unique_ids(recs)  # ids key the folds and the metrics: two files never share one
    return recs


__all__ = ["BreastDataset", "ModalityBatchSampler", "Subset", "DataError", "Record", "RawSample",
           "DATASETS", "DATASET_MODALITY", "load_records", "phantom_records", "make_phantom", "MODALITIES",
           "MODALITY_WORDS", "GENERIC_MODALITY_WORD", "modality_word"]
