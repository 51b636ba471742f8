"""Trainer: exact resume after a stop at an epoch boundary, metrics.json/logs, mixed precision,
schedule, configs, a baseline method, and a two-process torchrun (gloo) run on CPU."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from avpt.config import load_config
from avpt.engine import lr_lambda
from avpt.train import run
from tests.determinism import assert_same_run, watch_determinism

TINY = ["backend=torch", "model.queue_size=16", "data.num_patients=3", "data.views=1",
        "batch_size=4", "batch_size_mri=2", "eval_batch_size=8", "progress=false", "report=false",
        "lr=1e-3", "warmup_epochs=1", "threads=1", "fold=null"]


def tiny_cfg(out, epochs=2, **kw):
    sets = TINY + [f"{k}={v}" for k, v in kw.pop("sets", {}).items()]
    return load_config(overrides=dict(backbone="tiny", epochs=epochs, out=str(out),
                                      modality=["MG", "US"], **kw), sets=sets)


def _trainable(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "model", "trainable.safetensors"))


def test_resume_after_stop_matches_uninterrupted(tmp_path):
    """Bit for bit where the run's ops are deterministic (the CPU; on a GPU the trainer's
    deterministic mode with the cuBLAS workspace tests/conftest.py sets), else, where an op
    alerted (e.g. a CUDA backward that adds with atomics), to fp32 rounding: the same steps."""
    with watch_determinism() as runs:
        full = run(tiny_cfg(tmp_path / "full", epochs=3))
        stopped = run(tiny_cfg(tmp_path / "killed", epochs=3, stop_after_epoch=1))
        assert stopped == {"stopped_after_epoch": 1}
        assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)["epoch"] == 1
        assert not (tmp_path / "killed" / "metrics.json").exists()
        resumed = run(tiny_cfg(tmp_path / "killed", epochs=3))  # a fresh process would do the same
    a, b = _trainable(tmp_path / "full"), _trainable(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert_same_run(b[k], a[k], runs.reproducible, name=f"trainable {k} after resume")
    rows = list(csv.DictReader(open(tmp_path / "killed" / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    losses = [torch.tensor([h["train_loss"] for h in r["history"]]) for r in (resumed, full)]
    assert_same_run(*losses, runs.reproducible, name="train losses after resume")
    if runs.reproducible:
        assert resumed["test"] == full["test"]
    else:  # metrics of nearly equal models: equal up to the rounding that reached the scores
        assert resumed["test"].keys() == full["test"].keys()
        assert resumed["test"] == pytest.approx(full["test"], rel=1e-4, abs=1e-6, nan_ok=True)
    # a checkpoint of another config is refused, not silently resumed
    with pytest.raises(ValueError, match="another config"):
        run(tiny_cfg(tmp_path / "killed", epochs=3, sets={"lr": 5e-4}))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_metrics_json_logs_and_mixed_precision(tmp_path, amp):
    res = run(tiny_cfg(tmp_path, epochs=1, amp=amp))
    saved = json.load(open(tmp_path / "metrics.json"))
    for key in ("auc", "f1", "dice", "iou", "hd95"):
        assert key in saved["test"]
    name = {"bf16": "bfloat16", "fp16": "float16"}[amp]
    assert saved["amp"] == name and res["amp"] == name
    scaler = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["scaler"]
    assert (amp == "fp16") == bool(scaler)          # fp16 keeps a loss scale, bf16 needs none
    assert saved["config"]["backbone"] == "avpt-tiny" and saved["config"]["backend"] == "torch"
    assert saved["data"]["train_samples"] == 6 and saved["params"]["trainable"] > 0
    assert 0.0 <= saved["test"]["dice"] <= 1.0
    assert (tmp_path / "log.csv").exists()
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
    assert (tmp_path / "model" / "avpt_config.json").exists()


def test_baseline_method_trains(tmp_path):
    res = run(tiny_cfg(tmp_path, epochs=1, method="lora", sets={"model": {}}))
    assert res["config"]["method"] == "lora" and res["test"]["n"] == 6


def test_warmup_then_cosine():
    f = lr_lambda(warmup_steps=4, total_steps=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(4, 12))


def test_config_file_variant_and_overrides(tmp_path):
    cfg = load_config("configs/ablations/table8_injection.yaml", "late", {"backbone": "tiny"},
                      ["model.rank=4", "amp=off", "data.num_patients=7"])
    assert cfg["model"] == {"schedule": "late", "rank": 4} and cfg["backbone"] == "avpt-tiny"
    assert cfg["amp"] == "off" and cfg["data"]["num_patients"] == 7 and cfg["epochs"] == 50
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(sets=["lrate=1"])
    with pytest.raises(ValueError, match="no variant"):
        load_config("configs/ablations/table8_injection.yaml", "deep")
    paper = load_config("configs/paper.yaml")
    assert (paper["lr"], paper["weight_decay"], paper["warmup_epochs"], paper["epochs"]) == (1e-4, 1e-4, 5, 50)
    assert (paper["batch_size"], paper["batch_size_mri"]) == (32, 8)
    with pytest.raises(ValueError, match="has no setting"):
        run(tiny_cfg(tmp_path, epochs=1, sets={"model.not_a_field": 1}))


def test_checkpoint_of_an_older_version_still_resumes(tmp_path):
    """Checkpoints written before issue 13 kept numpy's RNG state as an array (pickled):
    still loaded with weights_only=True (numpy arrays allowed, nothing else) and resumed."""
    import numpy as np

    from avpt.run_io import read_checkpoint

    run(tiny_cfg(tmp_path / "a", epochs=2, stop_after_epoch=1))
    path = tmp_path / "a" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    name, keys, pos, has_gauss, cached = ckpt["rng"]["numpy"]
    ckpt["rng"]["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    cfg = dict(ckpt["config"])
    del cfg["rcl_positives"]  # and the older config had no such key (its behaviour: within)
    ckpt["config"] = cfg
    # and the loss state sat under "inner." (the trainer's wrapper before issue 12)
    ckpt["loss_state"] = {f"inner.{k}": v for k, v in ckpt["loss_state"].items()}
    torch.save(ckpt, path)
    assert isinstance(read_checkpoint(str(path), "cpu")["rng"]["numpy"][1], np.ndarray)
    with pytest.raises(ValueError, match=r"differs in \['rcl_positives'\]"):
        run(tiny_cfg(tmp_path / "a", epochs=2))
    res = run(tiny_cfg(tmp_path / "a", epochs=2, sets={"rcl_positives": "within_modality"}))
    assert len(res["history"]) == 2


def test_every_shipped_config_and_variant_validates():
    import glob

    from avpt.config import read_yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(root, "configs", "**", "*.yaml"), recursive=True))
    assert len(files) >= 5
    for path in files:
        for variant in [None, *(read_yaml(path).get("variants") or {})]:
            load_config(path, variant)  # raises ConfigError on any bad setting


def test_changed_epochs_rerun_is_refused_and_resume_false_starts_over(tmp_path):
    """A finished 2-epoch run rerun with epochs=1 would report the 2-epoch model as a 1-epoch
    one: refused, nothing written. resume=false starts over with fresh logs."""
    from avpt.errors import ConfigError

    run(tiny_cfg(tmp_path, epochs=2))
    before = {f: os.path.getmtime(tmp_path / f) for f in ("checkpoint.pt", "metrics.json", "log.csv")}
    with pytest.raises(ConfigError, match=r"is a run of 2 epochs \(finished\); --epochs 1"):
        run(tiny_cfg(tmp_path, epochs=1))
    assert before == {f: os.path.getmtime(tmp_path / f) for f in before}
    res = run(tiny_cfg(tmp_path, epochs=1, sets={"resume": "false"}))
    assert len(res["history"]) == 1 and res["config"]["epochs"] == 1
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1"]           # the old run's rows are gone
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.cpu_only  # pinned to --device cpu / device=cpu: not in the GPU tier
def test_torchrun_two_cpu_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "avpt.cli", "train", "--dataset", "phantom", "--backbone", "tiny", "--epochs", "2",
           "--modality", "MG", "US", "--out", str(tmp_path), "--device", "cpu"]
    for s in TINY:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.load(open(tmp_path / "metrics.json"))
    assert saved["world_size"] == 2 and len(saved["history"]) == 2
    assert "auc" in saved["test"]


@pytest.mark.cpu_only  # pinned to --device cpu / device=cpu: not in the GPU tier
def test_sigkill_mid_training_then_resume_gives_the_same_result(tmp_path):
    """A real kill: SIGKILL the training process once its first checkpoint exists (during a
    later epoch), then rerun the same command; the result equals an uninterrupted run's."""
    import signal
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    sets = [s for s in TINY if not s.startswith("data.num_patients")] + ["data.num_patients=6"]

    def cmd(out):
        c = [sys.executable, "-m", "avpt.cli", "train", "--dataset", "phantom", "--backbone", "tiny",
             "--epochs", "6", "--modality", "MG", "US", "--out", str(out), "--device", "cpu"]
        for s in sets:
            c += ["--set", s]
        return c

    ckpt = tmp_path / "killed" / "checkpoint.pt"
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed_at = torch.load(ckpt, weights_only=False)["epoch"] if ckpt.exists() else None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_at is not None and killed_at < 6, proc.stderr.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "metrics.json").exists()
    for out in ("killed", "full"):
        done = subprocess.run(cmd(tmp_path / out), env=env, cwd=root, capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, done.stderr[-2000:]
    a = json.load(open(tmp_path / "killed" / "metrics.json"))
    b = json.load(open(tmp_path / "full" / "metrics.json"))
    assert a["test"] == b["test"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_epoch_averager_is_used_and_resumes_exactly(tmp_path):
    """A method's ``make_epoch_averager`` (CILMP's Gaussian averaging): updated after every
    epoch, kept in the checkpoint, its average is the saved model; a resume is exact."""
    from avpt.methods.cilmp import PromptAveraging

    sets = {"model": {}, "model.knowledge_length": 4, "model.prefix_length": 2, "model.suffix_length": 2,
            "model.averaging_mean": 2, "model.averaging_std": 1}
    cfg = dict(method="cilmp", sets=sets)
    full = run(tiny_cfg(tmp_path / "full", epochs=3, **cfg))
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    avg = PromptAveraging(3, 2, 1)
    avg.load_state_dict(ckpt["averager"])
    assert avg.total == pytest.approx(sum(avg.weight(e) for e in (1, 2, 3)))
    saved, latest = _trainable(tmp_path / "full"), ckpt["trainable"]
    expected = avg.state()
    assert all(torch.equal(saved[k], expected[k]) for k in expected if k in saved)
    assert any(not torch.equal(saved[k], latest[k]) for k in expected if k in saved)
    assert run(tiny_cfg(tmp_path / "k", epochs=3, stop_after_epoch=1, **cfg)) == {"stopped_after_epoch": 1}
    resumed = run(tiny_cfg(tmp_path / "k", epochs=3, **cfg))
    assert resumed["test"] == full["test"]
    b = _trainable(tmp_path / "k")
    assert saved.keys() == b.keys() and all(torch.equal(saved[k], b[k]) for k in saved)


def test_three_busi_classes_through_the_cli(tmp_path, capsys):
    """BUSI with data.normal=class: normal / benign / malignant; the method gets 3 classes (and
    CoOp the class names), metrics.json has macro AUC/F1; eval refuses two-class data."""
    from avpt.cli import main

    from .test_data import write_busi

    write_busi(str(tmp_path), n_per_class=3, size=32)
    common = ["--dataset", "busi", "--data-root", str(tmp_path), "--backbone", "tiny",
              "--set", "fold=null", "--set", "batch_size=4", "--set", "eval_batch_size=8",
              "--set", "progress=false", "--set", "threads=1", "--set", "report=false"]
    out = tmp_path / "out"
    assert main(["train", "--method", "coop", "--epochs", "1", "--out", str(out),
                 "--set", "data.normal=class"] + common) == 0
    saved = json.load(open(out / "metrics.json"))
    assert saved["classes"]["names"] == ["normal", "benign", "malignant"]
    assert "one-vs-rest macro" in saved["classes"]["metrics"]
    assert 0 <= saved["test"]["auc"] <= 1 and saved["test"]["n"] == 9
    model_cfg = json.load(open(out / "model" / "avpt_config.json"))["config"]
    assert model_cfg["num_classes"] == 3 and model_cfg["class_names"] == ["normal", "benign", "malignant"]
    assert main(["eval", "--checkpoint", str(out), "--out", str(tmp_path / "ev"),
                 "--set", "data.normal=benign"] + common) == 2
    assert "tells 3 classes apart" in capsys.readouterr().err
    assert main(["train", "--method", "linear", "--epochs", "1", "--out", str(tmp_path / "bad"),
                 "--set", "data.normal=class", "--set", "model.num_classes=2"] + common) == 2
    assert "model.num_classes must be 3" in capsys.readouterr().err
