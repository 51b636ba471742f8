"""Data: the phantom (determinism, morphology, physics), the BUSI loader on files written in
BUSI's exact layout (merged masks, normal images, corrupt files), preprocessing consistency,
patient-level folds and the modality-alternating sampler."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import measure

from avpt.data import (BreastDataset, DataError, ModalityBatchSampler, load_records, make_phantom)
from avpt.data import transforms as T
from avpt.data.folds import load_or_make_folds, make_folds

# The GPU tier leaves these out: not a device path (data readers and augmentation).
pytestmark = pytest.mark.cpu_only


# ----------------------------------------------------------------------------------------------
# Phantom
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["MG", "US", "MRI"])
def test_phantom_deterministic_and_well_formed(modality):
    a = make_phantom(3, modality, patient=5, view=1, size=64)
    b = make_phantom(3, modality, patient=5, view=1, size=64)
    c = make_phantom(4, modality, patient=5, view=1, size=64)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (64, 64) and a.image.dtype == np.float32
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    assert a.tissue.shape == (3, 64, 64) and 0 <= a.tissue.min() and a.tissue.max() <= 1
    assert a.mask.any() and a.mask.mean() < 0.25
    assert a.label == 1 and a.patient_id == f"{modality}-P0005"
    assert a.report.startswith(f"{modality} {a.patient_id}:") and "\n" not in a.report
    assert "malignancy" in a.report


def _solidity(mask):
    props = measure.regionprops(measure.label(mask))
    big = max(props, key=lambda p: p.area)
    return big.solidity


def test_phantom_morphology_benign_round_malignant_spiculated():
    ben = [_solidity(make_phantom(0, "MG", p, 0, size=128).mask) for p in range(0, 12, 2)]
    mal = [_solidity(make_phantom(0, "MG", p, 0, size=128).mask) for p in range(1, 12, 2)]
    assert min(ben) > 0.9            # convex, smooth
    assert max(mal) < min(ben)       # irregular, spiculated
    assert np.mean(mal) < 0.8


def test_phantom_modality_physics():
    # US: malignant lesions shadow what lies behind them, benign ones enhance it
    def behind_ratios(parity):
        out = []
        for p in range(parity, 40, 2):
            s = make_phantom(1, "US", p, 0, size=96)
            ys, xs = np.nonzero(s.mask)
            if ys.max() + 16 >= 96:   # no room behind the lesion
                continue
            col = slice(max(int(xs.mean()) - 3, 0), int(xs.mean()) + 3)
            below = s.image[ys.max() + 4: ys.max() + 16, col].mean()
            beside = s.image[ys.max() + 4: ys.max() + 16, :].mean()
            out.append(below / beside)
            if len(out) == 8:
                return np.array(out)
        raise AssertionError("too few phantoms with room behind the lesion")
    malignant, benign = behind_ratios(1), behind_ratios(0)
    assert malignant.mean() < 0.7 and benign.mean() > 1.0 and np.median(malignant) < np.median(benign)
    # MRI: contrast enhancement of the lesion only after contrast
    pre = make_phantom(2, "MRI", 1, 0, size=64, phase="pre")
    post = make_phantom(2, "MRI", 1, 0, size=64, phase="post")
    assert post.image[post.mask].mean() > pre.image[pre.mask].mean() + 0.2
    # MG: the dense lesion attenuates more than the surrounding fat
    mg = make_phantom(2, "MG", 3, 0, size=64)
    fat = (mg.tissue[1] > 0.8) & ~mg.mask
    assert mg.image[mg.mask].mean() > mg.image[fat].mean()


def test_phantom_records_patient_grouping():
    recs = load_records("phantom", modalities=["US"], image_size=32, options=dict(num_patients=4, views=2))
    assert len(recs) == 8 and {r.modality for r in recs} == {"US"}
    assert len({r.patient_id for r in recs}) == 4
    assert [r.label for r in recs] == [0, 0, 1, 1, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="modality"):
        load_records("phantom", modalities=["CT"])


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------
def test_geometric_transform_is_shared_by_image_maps_and_mask():
    mask = np.zeros((32, 32), bool)
    mask[4:12, 6:20] = True
    img = mask.astype(np.float32)
    tissue = np.stack([img, 1 - img, img])
    for seed in range(4):
        angle, flip = T.augment_params(seed, 0, 0)
        assert -10 <= angle <= 10
        i, t, m = T.apply(img, tissue, mask, angle, flip)
        assert torch.equal(i > 0.5, m > 0.5)
        assert torch.equal(t[0] > 0.5, m > 0.5)
    # a pure flip is exact
    i, t, m = T.apply(img, tissue, mask, 0.0, True)
    assert torch.equal(m, torch.from_numpy(mask[:, ::-1].copy()).float())
    assert T.augment_params(1, 2, 3) == T.augment_params(1, 2, 3)


def test_dataset_items_and_normalisation():
    recs = load_records("phantom", image_size=32, options=dict(num_patients=2, views=1))
    ds = BreastDataset(recs, 32, train=True, seed=0)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["maps"].shape == (3, 32, 32)
    assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert set(ds.stats) == {"MG", "US", "MRI"}
    ds.set_epoch(0)
    a = ds[1]["image"]
    ds.set_epoch(1)
    assert not torch.equal(a, ds[1]["image"])           # new augmentation each epoch
    ds.set_epoch(0)
    assert torch.equal(a, ds[1]["image"])               # same epoch, same augmentation
    assert all(r.report for r in ds.records)


def test_folds_patient_level_stratified_and_reused(tmp_path):
    recs = load_records("phantom", modalities=["MG"], image_size=16, options=dict(num_patients=10, views=3))
    folds = make_folds(recs, 5, seed=0)
    assert sorted(s for f in folds for s in f) == sorted(r.sample_id for r in recs)
    pid = {r.sample_id: r.patient_id for r in recs}
    owners = {}
    for k, f in enumerate(folds):
        for s in f:
            assert owners.setdefault(pid[s], k) == k   # a patient lives in one fold
    path = str(tmp_path / "folds.json")
    first = load_or_make_folds(path, recs, 5, seed=0)
    saved = json.load(open(path))
    saved["folds"][0], saved["folds"][1] = saved["folds"][1], saved["folds"][0]
    json.dump(saved, open(path, "w"))
    assert load_or_make_folds(path, recs, 5, seed=99) == saved["folds"] != first  # read, not remade
    with pytest.raises(DataError, match="do not match"):
        load_or_make_folds(path, recs[:-1], 5)


def test_modality_batches_alternate_and_shard():
    mods = ["MG"] * 40 + ["US"] * 40 + ["MRI"] * 16
    s = ModalityBatchSampler(mods, {"default": 16, "MRI": 8}, seed=0)
    batches = s.all_batches()
    kinds = [mods[b[0]] for b in batches]
    assert kinds[:6] == ["MG", "US", "MRI"] * 2
    assert all(len({mods[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(96))
    assert max(len(b) for b, k in zip(batches, kinds) if k == "MRI") == 8
    r0 = list(ModalityBatchSampler(mods, 16, seed=0, rank=0, world_size=2))
    r1 = list(ModalityBatchSampler(mods, 16, seed=0, rank=1, world_size=2))
    assert len(r0) == len(r1) and not set(map(tuple, r0)) & set(map(tuple, r1))


# ----------------------------------------------------------------------------------------------
# BUSI
# ----------------------------------------------------------------------------------------------
def write_busi(root, n_per_class=3, size=40):
    """A BUSI-layout folder: Dataset_BUSI_with_GT/{benign,malignant,normal}/NAME (i).png + masks."""
    base = os.path.join(root, "Dataset_BUSI_with_GT")
    rng = np.random.default_rng(0)
    for cls in ("benign", "malignant", "normal"):
        os.makedirs(os.path.join(base, cls))
        for i in range(1, n_per_class + 1):
            img = (rng.random((size, size + 4)) * 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(base, cls, f"{cls} ({i}).png"))
            m = np.zeros((size, size + 4), np.uint8)
            if cls != "normal":
                m[5:15, 5:15] = 255
            Image.fromarray(m).save(os.path.join(base, cls, f"{cls} ({i})_mask.png"))
    # a second lesion of benign (1) in its own mask file
    m2 = np.zeros((size, size + 4), np.uint8)
    m2[25:35, 25:35] = 255
    Image.fromarray(m2).save(os.path.join(base, "benign", "benign (1)_mask_1.png"))
    return base


def test_busi_loader(tmp_path):
    base = write_busi(str(tmp_path))
    recs = load_records("busi", str(tmp_path))
    assert len(recs) == 9                                     # masks are never samples
    assert sorted(r.label for r in recs) == [0] * 6 + [1] * 3
    assert {r.modality for r in recs} == {"US"}
    b1 = next(r for r in recs if r.sample_id == "busi-benign-1").load()
    assert b1.mask.sum() == 200                               # _mask and _mask_1 merged by OR
    assert b1.image.shape == (40, 44) and 0 <= b1.image.min() <= b1.image.max() <= 1
    normal = next(r for r in recs if r.sample_id == "busi-normal-2").load()
    assert not normal.mask.any()
    assert len(load_records("busi", base, options={"normal": "exclude"})) == 6   # root may be the inner folder


def test_busi_corrupt_file_named_or_skipped(tmp_path):
    base = write_busi(str(tmp_path))
    bad = os.path.join(base, "malignant", "malignant (2).png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    recs = load_records("busi", str(tmp_path))
    with pytest.raises(DataError, match=r"malignant \(2\)\.png"):
        BreastDataset(recs, 32)
    ds = BreastDataset(recs, 32, skip_bad=True)
    assert len(ds) == 8 and len(ds.skipped) == 1 and "malignant (2).png" in ds.skipped[0]


def test_busi_missing_mask_or_stray_file_is_an_error(tmp_path):
    base = write_busi(str(tmp_path))
    os.remove(os.path.join(base, "malignant", "malignant (3)_mask.png"))
    with pytest.raises(DataError, match=r"malignant \(3\)\.png.*no mask"):
        load_records("busi", str(tmp_path))
    base = write_busi(str(tmp_path / "b"))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(os.path.join(base, "benign", "benign (1) copy.png"))
    with pytest.raises(DataError, match=r"benign \(1\) copy\.png"):
        load_records("busi", str(tmp_path / "b"))
