"""The torch Dataset over loader records, and the modality-alternating batch sampler.

``BreastDataset(records, image_size, train=...)`` loads and preprocesses every record once at
construction (so a corrupt file fails at once, naming the file, or is skipped and counted with
``skip_bad=True``), caches the result, and serves per item:

  image [3, S, S] float32 (grayscale repeated to the backbone's 3 channels, normalised per modality),
  maps [3, S, S] float32 in [0, 1] (glandular, fatty, ductal), mask [1, S, S] float32 {0, 1},
  label (long), modality (long index into MODALITIES), index (long).

Augmentation depends only on (seed, epoch, index): call ``set_epoch`` before each epoch.
``native`` [N] keeps each sample's original size, pixel spacing and lesion mask
(``avpt.data.native.NativeMask``) for evaluation at the original resolution.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from . import transforms as T
from .modalities import MODALITIES
from .native import NativeMask
from .records import DataError, Record
from .tissue_priors import tissue_prior_single

log = logging.getLogger(__name__)


class BreastDataset(Dataset):
    def __init__(self, records: Sequence[Record], image_size: int, train: bool = False,
                 seed: int = 0, clahe: bool = True, rotation: float = T.MAX_ROTATION_DEG,
                 flip: bool = True, stats: Optional[Dict[str, Tuple[float, float]]] = None,
                 skip_bad: bool = False, pipeline: str = "avpt-paper"):
        if pipeline not in T.PIPELINES:
            raise ValueError(f"pipeline must be one of {', '.join(T.PIPELINES)}, got {pipeline!r}")
        self.pipeline = T.PIPELINES[pipeline]
        clahe = clahe and self.pipeline.clahe
        self.image_size, self.train, self.seed = int(image_size), train, seed
        self.rotation, self.flip, self.epoch = rotation, flip, 0
        self.records: List[Record] = []
        self.skipped: List[str] = []
        images, tissues, masks, native = [], [], [], []
        for rec in records:
            try:
                raw = rec.load()
            except DataError as exc:
                if not skip_bad:
                    raise DataError(f"{exc} (pass --skip-bad to skip unreadable files and count "
                                    f"them)") from exc
                log.warning("skipping %s", exc)
                self.skipped.append(str(exc))
                continue
            if raw.report and not rec.report:
                rec.report = raw.report
            img = T.resize(raw.image, self.image_size)
            if clahe:
                img = T.clahe(img)
            if raw.tissue is not None:
                tissue = T.resize(raw.tissue, self.image_size)
            else:
                tissue = tissue_prior_single(img, rec.modality)
            mask = T.resize(raw.mask.astype(np.float32), self.image_size, order=0) > 0.5
            if not np.isfinite(tissue).all():
                # The region maps are validated here, where they are loaded, not in the model's
                # forward (a value check there would cost a host sync per step on a GPU).
                exc = DataError(f"{rec.source or rec.sample_id}: region maps "
                                f"contain NaN or inf")
                if not skip_bad:
                    raise exc
                log.warning("skipping %s", exc)
                self.skipped.append(str(exc))
                continue
            images.append(img.astype(np.float32))
            tissues.append(np.clip(tissue, 0, 1).astype(np.float16))
            masks.append(mask)
            native.append(NativeMask.of(raw.mask, getattr(raw, "spacing", None)))
            self.records.append(rec)
        if not self.records:
            raise DataError("no usable sample: every record failed to load" if records
                            else "the data set is empty")
        self.images, self.tissues, self.masks, self.native = images, tissues, masks, native
        if stats is None:
            by_mod: Dict[str, list] = {}
            for rec, img in zip(self.records, images):
                by_mod.setdefault(rec.modality, []).append(img)
            stats = T.modality_stats(by_mod)
        self.stats = dict(stats)
        missing = {r.modality for r in self.records} - set(self.stats)
        if missing:  # e.g. transfer to an unseen modality: its own image statistics, no labels used
            by_mod = {m: [i for r, i in zip(self.records, images) if r.modality == m] for m in missing}
            self.stats.update(T.modality_stats(by_mod))

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records])

    @property
    def modalities(self) -> List[str]:
        return [r.modality for r in self.records]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        rec = self.records[index]
        img, tissue = self.images[index], self.tissues[index].astype(np.float32)
        mask = self.masks[index]
        if self.pipeline.augment == "resized_crop":
            box, flip = (T.resized_crop_params(self.seed, self.epoch, index, self.image_size,
                                               self.flip) if self.train else (None, False))
            img_t, maps_t, mask_t = T.apply_crop(img, tissue, mask, box, flip)
        else:
            angle, flip = (T.augment_params(self.seed, self.epoch, index, self.rotation, self.flip)
                           if self.train else (0.0, False))
            img_t, maps_t, mask_t = T.apply(img, tissue, mask, angle, flip)
        # Maps in [0, 1] by construction (clipped and checked finite at load; the transforms
        # interpolate); clamp against interpolation overshoot on the CPU, where it is free.
        maps_t = maps_t.clamp_(0.0, 1.0)
        if self.pipeline.normalise == "clip":
            img_t = T.clip_normalise(img_t.clamp(0.0, 1.0)).contiguous()
        else:
            mean, std = self.stats[rec.modality]
            img_t = ((img_t - mean) / std).unsqueeze(0).expand(3, -1, -1).contiguous()
        return dict(image=img_t, maps=maps_t, mask=mask_t.unsqueeze(0),
                    label=torch.tensor(rec.label, dtype=torch.long),
                    modality=torch.tensor(MODALITIES.index(rec.modality), dtype=torch.long),
                    index=torch.tensor(index, dtype=torch.long))


class Subset(Dataset):
    """A view of some items of a BreastDataset (keeps records, labels and set_epoch)."""

    def __init__(self, base: BreastDataset, indices: Sequence[int], train: bool):
        self.base, self.indices, self.train = base, list(indices), train

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def records(self) -> List[Record]:
        return [self.base.records[i] for i in self.indices]

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels[self.indices]

    @property
    def native(self) -> List[NativeMask]:
        return [self.base.native[i] for i in self.indices]

    @property
    def modalities(self) -> List[str]:
        return [self.base.records[i].modality for i in self.indices]

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, i: int):
        prev = self.base.train
        self.base.train = self.train
        try:
            item = self.base[self.indices[i]]
        finally:
            self.base.train = prev
        item["index"] = torch.tensor(i, dtype=torch.long)
        return item


class ModalityBatchSampler(Sampler[List[int]]):
    """Batches of a single modality, alternating modalities within the epoch (MG, US, MRI, MG, ...)
    until every modality's batches are used; shuffled by (seed, epoch). With ``world_size > 1``
    each rank takes every world_size-th batch, truncated so all ranks run the same number of steps.
    ``batch_size`` may be a dict per modality (the paper: 32 for 2-D, 8 for MRI)."""

    def __init__(self, modalities: Sequence[str], batch_size, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        self.modalities = list(modalities)
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _size(self, modality: str) -> int:
        bs = self.batch_size
        return int(bs.get(modality, bs.get("default", 32))) if isinstance(bs, dict) else int(bs)

    def all_batches(self) -> List[List[int]]:
        rng = np.random.default_rng((self.seed, self.epoch, 7))
        per_mod: Dict[str, List[List[int]]] = {}
        for m in MODALITIES:
            idx = [i for i, x in enumerate(self.modalities) if x == m]
            if not idx:
                continue
            if self.shuffle:
                idx = [idx[j] for j in rng.permutation(len(idx))]
            size = self._size(m)
            chunks = [idx[i:i + size] for i in range(0, len(idx), size)]
            if self.drop_last and len(chunks) > 1 and len(chunks[-1]) < size:
                chunks.pop()
            per_mod[m] = chunks
        batches, k = [], 0
        while any(per_mod.values()):
            for m in list(per_mod):
                if k < len(per_mod[m]):
                    batches.append(per_mod[m][k])
            k += 1
            if all(k >= len(v) for v in per_mod.values()):
                break
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        batches = self.all_batches()
        if self.world_size > 1:
            steps = len(batches) // self.world_size
            batches = batches[self.rank::self.world_size][:steps]
        return iter(batches)

    def __len__(self) -> int:
        n = len(self.all_batches())
        return n // self.world_size if self.world_size > 1 else n
