"""Training recipes as data (``avpt.recipes``), the CLIP input pipeline and few-shot splits: the
authors' optimizer, schedule and pipeline as a run records them and as the trainer builds them,
through the CLI on the phantom and on a BUSI-layout folder."""
import json
import math

import numpy as np
import pytest
import torch

from avpt.cli import main
from avpt.config import DEFAULTS, load_config
from avpt.errors import ConfigError

from .test_data import write_busi

# the CoOp family's Dassl recipe, as the authors' configs give it
DASSL = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine",
         "warmup": "constant", "warmup_epochs": 1, "warmup_lr": 1e-5, "pipeline": "clip"}
CILMP_REFERENCE = dict(DASSL, lr=0.0025, epochs=100, batch_size=64, flip=True, amp="fp16")
BIOMEDAP_REFERENCE = dict(DASSL, lr=0.0025, epochs=100, batch_size=4, flip=False, amp="off")


def _recipe_of(cfg, keys):
    return {k: cfg[k] for k in keys}


def test_reference_recipes_are_the_authors_settings():
    for method, want in (("cilmp", CILMP_REFERENCE), ("biomedap", BIOMEDAP_REFERENCE)):
        cfg = load_config(overrides=dict(method=method, backbone="tiny", recipe="reference"))
        assert _recipe_of(cfg, want) == want, method
    paper = load_config(overrides=dict(method="cilmp", backbone="tiny"))  # default avpt-paper
    keys = ("optimizer", "lr", "weight_decay", "epochs", "batch_size", "batch_size_mri",
            "warmup_epochs", "warmup", "lr_schedule", "pipeline", "amp")
    assert _recipe_of(paper, keys) == _recipe_of(DEFAULTS, keys)
    assert (paper["optimizer"], paper["lr"], paper["epochs"], paper["warmup_epochs"]) == \
        ("adamw", 1e-4, 50, 5)
    avpt_ref = load_config(overrides=dict(backbone="tiny", recipe="reference"))
    assert _recipe_of(avpt_ref, keys) == _recipe_of(paper, keys)   # A-VPT's authors: the paper


def test_the_user_s_settings_win_over_the_recipe():
    cfg = load_config(overrides=dict(method="cilmp", backbone="tiny", recipe="reference", epochs=3),
                      sets=["lr=0.01", "pipeline=avpt-paper"])
    assert (cfg["epochs"], cfg["lr"], cfg["pipeline"], cfg["optimizer"]) == (3, 0.01, "avpt-paper", "sgd")


def test_a_method_without_an_authors_recipe_refuses_reference():
    with pytest.raises(ConfigError, match="recipe reference: method 'vpt' has no recipe"):
        load_config(overrides=dict(method="vpt", backbone="tiny", recipe="reference"))
    with pytest.raises(ConfigError, match="recipe must be one of"):
        load_config(overrides=dict(backbone="tiny"), sets=["recipe=fast"])
    with pytest.raises(ConfigError, match="optimizer 'sgd' needs compile=none"):
        load_config(overrides=dict(method="cilmp", backbone="tiny", recipe="reference",
                                   compile="default"))


def test_constant_warm_up_then_cosine():
    from avpt.engine import lr_lambda

    f = lr_lambda(4, 20, warmup="constant", warmup_factor=1e-5 / 0.0025)
    assert [f(s) for s in range(4)] == [1e-5 / 0.0025] * 4
    assert f(4) == 1.0 and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)
    linear = lr_lambda(4, 20)   # the A-VPT paper's: linear from 0
    assert [linear(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_lambda(2, 10, schedule="constant")(7) == 1.0


def _records(patients_per_class, views):
    from avpt.data.records import Record

    recs = []
    for label in (0, 1):
        for p in range(patients_per_class):
            for v in range(views):
                recs.append(Record(sample_id=f"c{label}p{p}v{v}", patient_id=f"c{label}p{p}",
                                   label=label, modality="US", loader=None))
    return recs


def test_few_shot_draws_patients_and_k_images_per_class():
    from avpt.data.folds import few_shot_indices

    recs = _records(patients_per_class=5, views=3)
    idx = list(range(len(recs)))
    chosen = few_shot_indices(recs, idx, 4, seed=0, class_names=("benign", "malignant"))
    assert len(chosen) == 8 and chosen == sorted(chosen)
    for label in (0, 1):
        mine = [recs[i] for i in chosen if recs[i].label == label]
        assert len(mine) == 4
        counts = sorted(sum(r.patient_id == p for r in mine) for p in {r.patient_id for r in mine})
        assert counts == [1, 3]            # whole patients first, the last one cut at K
    assert few_shot_indices(recs, idx, 4, 0, ("benign", "malignant")) == chosen   # the seed fixes it
    assert any(few_shot_indices(recs, idx, 4, s, ("benign", "malignant")) != chosen for s in (1, 2, 3))
    train = [i for i in idx if recs[i].patient_id not in ("c1p0", "c1p1")]   # a training split
    assert set(few_shot_indices(recs, train, 9, 0, ("benign", "malignant"))) <= set(train)
    with pytest.raises(ConfigError, match=r"--shots 10: class 'malignant' has 9 training images"):
        few_shot_indices(recs, train, 10, 0, ("benign", "malignant"))


def test_clip_pipeline_is_rgb_with_clip_statistics_and_one_crop_for_all():
    from avpt.data import BreastDataset, phantom_records
    from avpt.data.transforms import CLIP_MEAN, CLIP_STD

    recs = phantom_records(num_patients=2, views=1, modalities=("US",), size=32)
    plain = BreastDataset(recs, 32, train=False, pipeline="clip")
    item = plain[0]
    grey = torch.from_numpy(plain.images[0])
    want = (grey[None] - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert item["image"].shape == (3, 32, 32) and torch.allclose(item["image"], want, atol=1e-6)
    clahe = BreastDataset(recs, 32, train=False)              # the A-VPT pipeline equalises
    assert not np.array_equal(clahe.images[0], plain.images[0])
    aug = BreastDataset(recs, 32, train=True, pipeline="clip", seed=3)
    aug.set_epoch(1)
    a, b = aug[0], aug[0]
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], item["image"])
    aug.set_epoch(2)
    assert not torch.equal(aug[0]["image"], a["image"])       # a new crop every epoch
    with pytest.raises(ValueError, match="pipeline must be one of"):
        BreastDataset(recs, 32, pipeline="imagenet")


# --- through the CLI: the recorded config and the optimizer the trainer built -----------------
FAST = ["--backend", "torch", "--set", "eval_batch_size=8", "--set", "progress=false",
        "--set", "threads=1", "--set", "report=false", "--set", "tensorboard=false",
        "--device", "cpu", "--epochs", "1"]
SMALL_CILMP = ["--set", "model.prefix_length=2", "--set", "model.suffix_length=2",
               "--set", "model.knowledge_length=4"]


def _check_run(out, want, shots=None):
    saved = json.load(open(out / "metrics.json"))
    cfg = saved["config"]
    assert cfg["recipe"] == "reference" and cfg["epochs"] == 1
    assert _recipe_of(cfg, [k for k in want if k != "epochs"]) == \
        {k: v for k, v in want.items() if k != "epochs"}
    run_cfg = json.load(open(out / "model" / "avpt_config.json"))["run"]
    assert run_cfg["optimizer"] == want["optimizer"] and run_cfg["pipeline"] == "clip"
    groups = torch.load(out / "checkpoint.pt", weights_only=False)["optimizer"]["param_groups"]
    assert groups[0]["momentum"] == 0.9 and groups[0]["weight_decay"] == 5e-4   # SGD's keys
    assert "betas" not in groups[0] and groups[0]["initial_lr"] == want["lr"]
    assert math.isfinite(saved["history"][-1]["train_loss"]) and saved["test"]["n"] > 0
    if shots:
        few = saved["data"]["few_shot"]
        assert few["shots"] == shots and few["seed"] == cfg["seed"]
        assert saved["data"]["train_samples"] == shots * 2 == len(few["samples"])
    return saved


PHANTOM = ["--dataset", "phantom", "--backbone", "tiny", "--modality", "MG", "US",
           "--set", "data.num_patients=6", "--set", "data.views=2"]


@pytest.mark.cpu_only  # pinned to --device cpu
def test_cilmp_and_biomedap_reference_recipes_on_the_phantom(tmp_path):
    assert main(["train", "--method", "cilmp", "--recipe", "reference", *PHANTOM, "--out",
                 str(tmp_path / "cilmp"), *FAST, *SMALL_CILMP]) == 0
    _check_run(tmp_path / "cilmp", CILMP_REFERENCE)
    assert main(["train", "--method", "biomedap", "--recipe", "reference", "--shots", "4",
                 *PHANTOM, "--out", str(tmp_path / "biomedap"), *FAST]) == 0
    _check_run(tmp_path / "biomedap", BIOMEDAP_REFERENCE, shots=4)


@pytest.mark.cpu_only  # pinned to --device cpu
def test_cilmp_and_biomedap_reference_recipes_on_a_busi_folder(tmp_path, capsys):
    root = tmp_path / "busi"
    write_busi(str(root), n_per_class=8, size=32)
    busi = ["--dataset", "busi", "--data-root", str(root), "--backbone", "tiny"]
    assert main(["train", "--method", "cilmp", "--recipe", "reference", *busi, "--out",
                 str(tmp_path / "cilmp"), *FAST, *SMALL_CILMP]) == 0
    _check_run(tmp_path / "cilmp", CILMP_REFERENCE)
    assert main(["train", "--method", "biomedap", "--recipe", "reference", "--shots", "4", *busi,
                 "--out", str(tmp_path / "biomedap"), *FAST]) == 0
    _check_run(tmp_path / "biomedap", BIOMEDAP_REFERENCE, shots=4)
    # eval of the few-shot model: the same draw, the same normalisation, the same numbers
    assert main(["eval", "--checkpoint", str(tmp_path / "biomedap"), "--out",
                 str(tmp_path / "ev"), "--device", "cpu", "--backend", "torch"]) == 0
    ev = json.load(open(tmp_path / "ev" / "metrics.json"))
    tr = json.load(open(tmp_path / "biomedap" / "metrics.json"))
    assert ev["test"] == tr["test"] and ev["config"]["pipeline"] == "clip"
    capsys.readouterr()
    assert main(["train", "--method", "biomedap", "--recipe", "reference", "--shots", "40",
                 *busi, "--out", str(tmp_path / "many"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shots 40: class 'benign' has" in err[0], err   # benign comes first, < 40 in training
