"""The avpt command line: train on a BUSI-layout folder (the issue's acceptance command) with
metrics.json and report.html, eval and explain of the saved model, corrupt files, transfer,
cross-validation, params, and the demo on a tiny budget."""
import json
import math
import os

import pytest

from avpt.cli import main

from .test_data import write_busi

# The GPU tier leaves these out: not a device path (command-line runs pinned to --device cpu).
pytestmark = pytest.mark.cpu_only

# --device cpu: these tests are about the command line, not the device (on a GPU machine the
# default, auto, picks CUDA; eval must reproduce a run's metrics on the device it was trained on)
FAST = ["--set", "backend=torch", "--set", "batch_size=4", "--set", "eval_batch_size=8",
        "--set", "progress=false", "--set", "threads=1", "--set", "model.queue_size=16",
        "--device", "cpu"]
TINY_PHANTOM = ["--dataset", "phantom", "--backbone", "tiny", "--set", "data.num_patients=3",
                "--set", "data.views=1"]


@pytest.fixture(scope="module")
def busi_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("busi")
    write_busi(str(root), n_per_class=3, size=48)
    out = root / "out"
    rc = main(["train", "--dataset", "busi", "--data-root", str(root), "--backbone", "tiny",
               "--epochs", "1", "--out", str(out)] + FAST)
    assert rc == 0
    return root, out


def test_train_busi_writes_metrics_and_report(busi_run):
    _, out = busi_run
    saved = json.load(open(out / "metrics.json"))
    assert set(saved["test"]) >= {"auc", "f1", "dice", "iou", "hd95"}
    assert saved["config"]["dataset"] == "busi" and saved["config"]["backbone"] == "avpt-tiny"
    assert saved["data"]["train_samples"] + saved["data"]["test_samples"] == 9
    assert (out / "folds.json").exists()
    html = open(out / "report.html").read()
    assert html.count("data:image/png;base64,") >= 4 and "Test metrics" in html
    assert "the frozen backbone has random weights" in html  # no --pretrained in this run
    for name in ("curves.png", "segmentation.png", "rollout.png", "prompt_types.png", "tsne.png"):
        assert (out / "figures" / name).exists(), name


def test_eval_and_explain_saved_model(busi_run, tmp_path, capsys):
    root, out = busi_run
    assert main(["eval", "--checkpoint", str(out), "--dataset", "busi", "--data-root", str(root),
                 "--out", str(tmp_path / "ev")] + FAST) == 0   # reuses the run's folds.json
    ev = json.load(open(tmp_path / "ev" / "metrics.json"))
    tr = json.load(open(out / "metrics.json"))
    assert ev["test"] == tr["test"]                     # same fold, same model, same numbers
    assert main(["explain", "--checkpoint", str(out), "--dataset", "busi", "--data-root", str(root),
                 "--out", str(tmp_path / "ex"), "--num", "2", "--set", "fold=null"] + FAST) == 0
    assert (tmp_path / "ex" / "figures" / "prompt_types.png").exists()
    assert "report:" in capsys.readouterr().out


def test_corrupt_busi_file_stops_with_its_name_or_is_skipped(tmp_path, capsys):
    base = write_busi(str(tmp_path), n_per_class=3, size=32)
    with open(os.path.join(base, "benign", "benign (2).png"), "wb") as f:
        f.write(b"garbage")
    args = ["train", "--dataset", "busi", "--data-root", str(tmp_path), "--backbone", "tiny",
            "--epochs", "1", "--out", str(tmp_path / "o"), "--set", "report=false"] + FAST
    assert main(args) == 2
    assert "benign (2).png" in capsys.readouterr().err
    assert main(args + ["--skip-bad", "--set", "fold=null"]) == 0
    saved = json.load(open(tmp_path / "o" / "metrics.json"))
    assert saved["data"]["skipped"] == 1 and saved["data"]["train_samples"] == 8


def test_transfer_cv_and_params(tmp_path, capsys):
    assert main(["transfer", *TINY_PHANTOM, "--train-modality", "MG", "--test-modality", "US",
                 "--epochs", "1", "--out", str(tmp_path / "tr"), "--set", "report=false"] + FAST) == 0
    tr = json.load(open(tmp_path / "tr" / "metrics.json"))
    assert tr["data"]["train_modalities"] == ["MG"] and tr["data"]["test_modalities"] == ["US"]
    assert tr["data"]["test_samples"] == 3
    # eval of a transfer model: --modality picks the unseen modality it is scored on, and a
    # modality it trained on is refused (those images are not a test set)
    ev = ["eval", "--checkpoint", str(tmp_path / "tr"), "--device", "cpu"]
    assert main(ev + ["--modality", "MRI", "--out", str(tmp_path / "ev")]) == 0
    assert json.load(open(tmp_path / "ev" / "metrics.json"))["data"]["test_modalities"] == ["MRI"]
    assert main(ev + ["--modality", "MG", "--out", str(tmp_path / "ev2")]) == 2
    assert "trained on MG, so its images are not a test set" in capsys.readouterr().err
    assert main(["cv", *TINY_PHANTOM, "--modality", "MG", "US", "--epochs", "1",
                 "--out", str(tmp_path / "cv"), "--set", "folds=2", "--set", "report=false",
                 "--set", "eval_every=0", "--set", "metrics.groups=[patient]"] + FAST) == 0
    cv = json.load(open(tmp_path / "cv" / "cv_metrics.json"))
    assert len(cv["runs"]) == 2 and cv["summary"]["auc"]["n"] <= 2
    assert "dice" in cv["summary"] and (tmp_path / "cv" / "folds.json").exists()
    assert cv["summary"]["hd95"]["unit"] == "px"       # the phantom has no pixel spacing
    assert cv["summary_by"]["patient"]["dice"]["n"] <= 2
    cfg = tmp_path / "abl.yaml"
    cfg.write_text("variants:\n  no_lap: {model: {lambda_lap: 0.0}}\n  early: {model: {schedule: early}}\n")
    assert main(["cv", "--config", str(cfg), "--variant", "all", *TINY_PHANTOM, "--modality", "US",
                 "--epochs", "1", "--out", str(tmp_path / "abl"), "--set", "folds=2",
                 "--set", "report=false", "--set", "eval_every=0"] + FAST
                # 4 patients: with 3 (2 benign, 1 malignant) one fold trains on benign only,
                # which is refused (issue 27)
                + ["--set", "data.num_patients=4"]) == 0
    table = json.load(open(tmp_path / "abl" / "ablation.json"))
    assert list(table) == ["no_lap", "early"] and "auc" in table["early"]
    assert json.load(open(tmp_path / "abl" / "early" / "seed0_fold0" / "metrics.json"))["config"]["model"]["schedule"] == "early"
    assert main(["params", "--model", "avpt-tiny", "--methods", "avpt", "lora"]) == 0
    assert "A-VPT trainable breakdown" in capsys.readouterr().out


def test_demo_small_budget(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--device", "cpu", "--methods", "avpt",
                 "--set", "data.num_patients=5", "--set", "data.views=1"] + FAST) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'report.html'}" in out
    html = open(tmp_path / "report.html").read()
    assert "transfer MG -&gt; US" in html and "data:image/png;base64," in html
    assert json.load(open(tmp_path / "avpt" / "metrics.json"))["config"]["backbone"] == "avpt-tiny-p8"
    assert "random weights" not in open(tmp_path / "avpt" / "report.html").read()  # shipped weights


@pytest.mark.parametrize("method,extra", [
    ("cilmp", ["--set", "model.prefix_length=2", "--set", "model.suffix_length=2",
               "--set", "model.knowledge_length=4"]),
    ("biomedap", [])])
def test_new_methods_train_and_eval_on_a_three_class_busi_folder(tmp_path, method, extra):
    """CILMP and BiomedAP (paper anchor: class prototypes of the training images) through the
    CLI on a BUSI-layout folder, normal / benign / malignant as three classes; eval of the saved
    model reproduces the run's test numbers."""
    root = tmp_path / "busi"
    write_busi(str(root), n_per_class=5, size=40)  # 5 folds need 5 a class
    out = tmp_path / "run"
    three = ["--dataset", "busi", "--data-root", str(root), "--set", "data.normal=class"]
    assert main(["train", "--method", method, "--backbone", "tiny", "--epochs", "1", "--out",
                 str(out), "--set", "report=false", *three, *_without_avpt_settings(FAST),
                 *extra]) == 0
    res = json.load(open(out / "metrics.json"))
    saved = json.load(open(out / "model" / "avpt_config.json"))["config"]
    assert res["config"]["method"] == method and saved["num_classes"] == 3
    assert list(saved["class_names"]) == ["normal", "benign", "malignant"]
    assert res["test"]["n"] > 0 and math.isfinite(res["history"][-1]["train_loss"])
    assert main(["eval", "--checkpoint", str(out), "--out", str(tmp_path / "ev"), *three,
                 "--device", "cpu"]) == 0
    again = json.load(open(tmp_path / "ev" / "metrics.json"))["test"]
    assert all(again[k] == res["test"][k] for k in ("auc", "f1", "n"))


def _without_avpt_settings(args):
    """FAST minus the A-VPT model settings (--set pairs whose key starts with model.)."""
    out, i = [], 0
    while i < len(args):
        if args[i] == "--set" and args[i + 1].startswith("model."):
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


@pytest.mark.parametrize("command", ["train", "transfer", "cv", "eval", "explain"])
def test_method_help_names_every_registered_method(command, capsys):
    """``--method``'s help is read from the registry: a method added there shows up here."""
    from avpt.methods import method_names

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    help_line = text.rsplit("--method METHOD", 1)[1].split("--", 1)[0]  # the options list
    for name in method_names():
        assert name in help_line.replace(",", " ").split(), (command, name)


def test_cli_choices_come_from_their_owners():
    """No literal lists in the CLI: --dataset/--modality/--backend/--amp/--compile offer what the
    owners define."""
    from avpt_kernels.backend import BACKENDS

    from avpt.cli import build_parser
    from avpt.compiled_step import COMPILE_MODES
    from avpt.recipes import RECIPE_NAMES
    from avpt.data import DATASETS, MODALITIES
    from avpt.runtime import AMP_MODES

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {a.dest: tuple(a.choices) for a in train._actions if a.choices}
    assert choices == {"dataset": DATASETS, "modality": MODALITIES, "backend": BACKENDS,
                       "amp": AMP_MODES, "compile": COMPILE_MODES, "recipe": RECIPE_NAMES}
