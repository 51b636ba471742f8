"""Issue 13: the CLI never mislabels, mixes or silently accepts.

Every bad input below gives ONE line on stderr (``avpt CMD: error: ...``, no traceback) naming
the setting or file, exit code 2, before any data loading or training, and leaves an existing
run's folder byte-for-byte unchanged. Then: a concurrent second run on the same --out fails at
once naming the holder; Ctrl-C is one line, exit 130, checkpoint intact; a changed-epochs
re-run and a contradicting eval are refused; eval reproduces the training run's test metrics
with a non-default seed and random backbone weights."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from avpt.cli import main

# The GPU tier leaves these out: not a device path (command-line error messages, runs pinned to --device cpu).
pytestmark = pytest.mark.cpu_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--set", "backend=torch", "--set", "eval_batch_size=8",
        "--set", "progress=false", "--set", "threads=1", "--set", "model.queue_size=16",
        "--set", "report=false", "--set", "tensorboard=false"]
# The device is not what these tests are about: runs and evals are pinned to the CPU (on a GPU
# machine --device auto picks CUDA, with bf16 autocast; eval must reproduce a run's metrics on the
# device it was trained on).
CPU = ["--device", "cpu"]
PHANTOM = ["--dataset", "phantom", "--backbone", "tiny", "--modality", "MG", "US",
           "--set", "data.num_patients=3", "--set", "data.views=1", "--set", "fold=null"]


def _train_args(out, *extra):
    return ["train", *PHANTOM, "--epochs", "1", "--batch-size", "4", "--out", str(out), *FAST,
            *CPU, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 1-epoch run (seed 3), a copy of it with a truncated checkpoint.pt, and one
    with a truncated model/trainable.safetensors; plus files for the bad inputs."""
    import shutil

    base = tmp_path_factory.mktemp("runs")
    run = base / "run"
    assert main(_train_args(run, "--seed", "3")) == 0
    broken_ckpt = base / "broken_ckpt"
    shutil.copytree(run, broken_ckpt)
    data = (broken_ckpt / "checkpoint.pt").read_bytes()
    (broken_ckpt / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    broken_model = base / "broken_model"
    shutil.copytree(run, broken_model)
    st = broken_model / "model" / "trainable.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    (base / "garbage.pt").write_bytes(b"\x80\x04garbage, not a checkpoint" * 10)
    (base / "a_file").write_text("not a folder")
    (base / "bad.yaml").write_text("epochs: 2\nlr: [1e-4\nbatch_size: 4\n")
    (base / "list.yaml").write_text("- epochs\n- 2\n")
    return base


def _snapshot(folder):
    """Every file under ``folder`` with its size, mtime and sha256."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns,
                                               hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


# (id, argv with {run}/{base} placeholders, text the one-line message must contain)
CASES = [
    ("lr text", ["train", "--set", "lr=fast"], "lr must be a finite number > 0"),
    ("lr negative", ["train", "--set", "lr=-1"], "lr must be a finite number > 0"),
    ("epochs zero", ["train", "--epochs", "0"], "epochs must be an integer >= 1"),
    ("epochs negative", ["train", "--epochs", "-3"], "epochs must be an integer >= 1"),
    ("batch zero", ["train", "--batch-size", "0"], "batch_size must be an integer >= 1"),
    ("batch negative", ["train", "--batch-size", "-4"], "batch_size must be an integer >= 1"),
    ("epochs text", ["train", "--epochs", "three"], "argument --epochs: invalid int value"),
    ("unknown data key", ["train", "--set", "data.normall=exclude"], "unknown loader setting data.normall"),
    ("busi key on phantom", ["train", "--set", "data.normal=exclude"], "unknown loader setting data.normal"),
    ("data-root with phantom", ["train", "--data-root", "{base}"], "--data-root is not used with dataset 'phantom'"),
    ("out is a file", ["train", "--out", "{base}/a_file"], "is an existing file, not a folder"),
    ("pretrained garbage", ["train", "--pretrained", "{base}/garbage.pt"], "is not a readable open_clip checkpoint"),
    ("pretrained missing", ["train", "--pretrained", "{base}/nope.safetensors"], "is not a file"),
    ("pretrained suffix", ["train", "--pretrained", "{base}/a_file"], "expected a file ending in"),
    ("device cuda", ["train", "--device", "cuda"], "no CUDA GPU is available"),
    ("device name", ["train", "--device", "gpu0"], "device must be auto, cpu, cuda or cuda:N"),
    ("yaml syntax", ["train", "--config", "{base}/bad.yaml"], "YAML syntax error at line"),
    ("yaml not mapping", ["train", "--config", "{base}/list.yaml"], "must be a mapping of settings"),
    ("config missing", ["train", "--config", "{base}/none.yaml"], "no such file"),
    ("unknown model key", ["train", "--set", "model.not_a_field=1"], "has no setting model.not_a_field"),
    ("model value", ["train", "--set", "model.lambda_rcl=-1"], "model.lambda_rcl must be a finite number >= 0"),
    ("unknown key", ["train", "--set", "lrate=1"], "unknown config key 'lrate'"),
    ("set without =", ["train", "--set", "lr"], "--set expects KEY=VALUE"),
    ("fold range", ["train", "--set", "fold=7"], "fold must be an integer in [0, 4]"),
    ("folds one", ["train", "--set", "folds=1", "--set", "fold=0"], "folds must be an integer >= 2"),
    ("amp", ["train", "--set", "amp=fp8"], "amp must be auto, off, bf16 or fp16"),
    ("compile", ["train", "--set", "compile=fast"], "compile must be none|default|reduce-overhead, got 'fast'"),
    ("rcl positives", ["train", "--set", "rcl_positives=both"], "rcl_positives must be cross_modal or within_modality"),
    ("bool setting", ["train", "--set", "flip=maybe"], "flip must be true or false"),
    ("warmup", ["train", "--set", "warmup_epochs=-1"], "warmup_epochs must be an integer >= 0"),
    ("seed", ["train", "--seed", "-1"], "seed must be an integer in [0, 4294967295]"),
    ("num_patients", ["train", "--set", "data.num_patients=0"], "data.num_patients must be an integer >= 1"),
    ("modality choice", ["train", "--modality", "CT"], "argument --modality: invalid choice: 'CT'"),
    ("busi without root", ["train", "--dataset", "busi"], "dataset 'busi' needs --data-root"),
    ("busi normal", ["train", "--dataset", "busi", "--data-root", "{base}", "--set", "data.normal=three"], "data.normal must be 'benign', 'exclude' or 'class'"),
    ("classes vs num_classes", ["train", "--set", "model.num_classes=3"], "model.num_classes must be 2 (the classes of dataset 'phantom'"),
    ("three-class transfer", ["transfer", "--dataset", "busi", "--data-root", "{base}", "--set", "data.normal=class", "--test-dataset", "phantom"], "a transfer needs the same classes"),
    ("preset", ["train", "--set", "model.preset=table10"], "model.preset must be one of default, got 'table10'"),
    ("busi modality", ["train", "--dataset", "busi", "--data-root", "{base}", "--modality", "MG"], "has US images only"),
    ("backbone", ["train", "--backbone", "vit-z"], "backbone must be tiny, ViT-B-16"),
    ("method", ["train", "--method", "nope"], "method must be one of"),
    ("changed epochs", ["train", "--out", "{run}", "--epochs", "3"], "is a run of 1 epochs (finished); --epochs 3"),
    ("changed config", ["train", "--out", "{run}", "--set", "lr=5e-4"], "was written with another config (differs in ['lr'])"),
    ("truncated checkpoint", ["train", "--out", "{base}/broken_ckpt"], "checkpoint.pt is not a readable avpt checkpoint"),
    ("eval method", ["eval", "--checkpoint", "{run}", "--method", "lora"], "--method lora contradicts the checkpoint"),
    ("eval backbone", ["eval", "--checkpoint", "{run}", "--backbone", "ViT-B-16"], "--backbone ViT-B-16 contradicts the checkpoint"),
    ("eval model setting", ["eval", "--checkpoint", "{run}", "--set", "model.queue_size=3"], "contradicts the checkpoint"),
    ("eval pretrained", ["eval", "--checkpoint", "{run}", "--pretrained", "{base}/garbage.pt"], "is not a readable open_clip checkpoint"),
    ("eval into the run", ["eval", "--checkpoint", "{run}", "--out", "{run}"], "holds a training run"),
    ("eval no checkpoint", ["eval", "--checkpoint", "{base}/nowhere"], "is not a folder"),
    ("eval truncated weights", ["eval", "--checkpoint", "{base}/broken_model", "--out", "{base}/ev"], "trainable.safetensors is not readable safetensors"),
    ("explain num", ["explain", "--checkpoint", "{run}", "--num", "0"], "--num must be an integer >= 1"),
    ("transfer no target", ["transfer", "--train-modality", "MG"], "give --test-modality and/or --test-dataset"),
    ("demo transfer choice", ["demo", "--transfer", "XX", "US"], "argument --transfer: invalid choice: 'XX'"),
    ("demo transfer same", ["demo", "--transfer", "MG", "MG"], "two different modalities"),
    ("cv seeds", ["cv", "--seeds", "-1"], "--seeds must be distinct integers >= 0"),
    ("params model", ["params", "--model", "tinyy"], "--model: backbone must be tiny, ViT-B-16"),
    ("params methods", ["params", "--methods", "nope"], "--methods must name methods among"),
    ("compare batch", ["compare", "--batch", "-1"], "--batch must be an integer >= 1"),
    ("compare prompts", ["compare", "--prompts", "0"], "--prompts must be an integer >= 1"),
    ("compare device", ["compare", "--device", "cuda"], "no CUDA GPU is available"),
    ("compare option", ["compare", "--tokenz", "3"], "unrecognized arguments: --tokenz 3"),
]


@pytest.mark.parametrize("argv,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_no_run(runs, argv, message, capsys, monkeypatch,
                                                         tmp_path):
    monkeypatch.delenv("AVPT_TRACEBACK", raising=False)
    run, base = runs / "run", runs
    argv = [a.replace("{run}", str(run)).replace("{base}", str(base)) for a in argv]
    fresh = tmp_path / "fresh_out"
    if argv[0] in ("train", "eval", "explain", "transfer", "cv", "demo") and "--out" not in argv:
        argv += ["--out", str(fresh)]
    if argv[0] in ("train", "eval", "explain", "transfer", "cv", "demo") and "--device" not in argv:
        argv += CPU
    if "--device" in argv and argv[argv.index("--device") + 1] == "cuda":
        # the refusal of a machine without a GPU: on a GPU machine --device cuda is valid input
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if argv[0] in ("train", "transfer", "cv"):  # a tiny run, should a check be missing
        if argv[argv.index("--out") + 1] == str(run):  # the run's own command, one change
            argv += ["--seed", "3", *PHANTOM]
        for flag, value in (("--epochs", "1"), ("--batch-size", "4"), ("--dataset", "phantom"),
                            ("--backbone", "tiny")):
            if flag not in argv:
                argv += [flag, value]
        argv += FAST
    watched = {p: _snapshot(p) for p in (run, base / "broken_ckpt", base / "broken_model")}
    t0 = time.time()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    elapsed = time.time() - t0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"avpt {argv[0]}: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err and "weights_only=False" not in err
    for p, before in watched.items():
        assert _snapshot(p) == before, f"{p} changed"
    assert not fresh.exists() or not os.listdir(fresh)
    assert elapsed < 30, f"refused only after {elapsed:.0f} s"


def test_there_are_at_least_thirty_distinct_bad_inputs():
    assert len({c[0] for c in CASES}) >= 30
    assert len({tuple(c[1]) for c in CASES}) == len(CASES)


def test_subcommand_help_names_itself(capsys):
    for cmd in ("train", "eval", "transfer", "cv", "explain", "demo", "params", "compare"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert f"usage: avpt {cmd}" in capsys.readouterr().out, cmd


def test_python_m_avpt_params_bad_method_is_one_line_exit_2():
    """``python -m avpt.params`` (not only ``avpt params``): a bad method name is one line on
    stderr and exit code 2, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "AVPT_TRACEBACK"}
    res = subprocess.run([sys.executable, "-m", "avpt.params", "--methods", "nope"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--methods must name methods among" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_params_takes_the_backbone_names_of_train(capsys):
    assert main(["params", "--model", "tiny", "--methods", "linear"]) == 0
    assert main(["params", "--backbone", "avpt-tiny", "--methods", "linear"]) == 0
    assert "linear" in capsys.readouterr().out


# Far more epochs than the test waits for (an epoch of the tiny run takes ~0.1 s): the run must
# still be going when the second run is refused and SIGINT arrives, however slow the machine.
EPOCHS_UNTIL_INTERRUPTED = 100000


def _cmd(out, epochs):
    c = [sys.executable, "-m", "avpt.cli", *_train_args(out)]
    c[c.index("--epochs") + 1] = str(epochs)
    return c


def test_concurrent_run_is_refused_and_ctrl_c_is_one_line_exit_130(tmp_path, capsys):
    """A real training process holds --out; a second run on it fails at once naming the
    holder's pid and writes nothing; then SIGINT stops the first with one line, exit 130, a
    whole checkpoint that resumes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("AVPT_TRACEBACK", None)
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out, EPOCHS_UNTIL_INTERRUPTED), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            # a terminal's Ctrl-C: a shell that started the test suite in the
                            # background passes SIGINT down ignored, and Python then keeps it so
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stderr=subprocess.PIPE, text=True)
    try:
        ckpt = out / "checkpoint.pt"
        deadline = time.time() + 180
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ckpt.exists(), proc.stderr.read()[-2000:] if proc.poll() is not None else "timeout"
        t0 = time.time()
        rc = main(_cmd(out, EPOCHS_UNTIL_INTERRUPTED)[3:])  # the same command, in this process
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert f"is in use by another avpt run: pid {proc.pid}" in err[0], err
        assert time.time() - t0 < 30
        assert proc.poll() is None, "the first run must still be running"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("avpt train: interrupted;") and "checkpoint.pt" in last, last
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)   # whole, and safe to load
    assert 1 <= ckpt["epoch"] < EPOCHS_UNTIL_INTERRUPTED
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    # nothing of the refused second run: log.csv rows are the first run's epochs, in order
    import csv
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    assert len(rows) >= ckpt["epoch"]


def test_eval_reproduces_training_with_seed_and_random_backbone(runs, tmp_path):
    """The run of the ``runs`` fixture: seed 3, random backbone weights. eval without --seed
    (its own default is 0) rebuilds the backbone from the recorded seed and the run's data
    settings: the training run's test metrics exactly, and metrics.json says what was
    evaluated."""
    run = runs / "run"
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "ev"),
                 "--set", "progress=false", *CPU]) == 0
    ev = json.load(open(tmp_path / "ev" / "metrics.json"))
    tr = json.load(open(run / "metrics.json"))
    assert ev["test"] == tr["test"]
    assert ev["method"] == "avpt" and ev["config"]["backbone"] == "avpt-tiny"
    assert ev["config"]["model"]["queue_size"] == 16 and ev["config"]["seed"] == 3
    assert ev["backbone"]["init_seed"] == 3 and ev["backbone"]["frozen_sha256"]
    assert tr["backbone"]["init_seed"] == 3
    # another data seed: other phantom images, the same (recorded) backbone: the load checks
    # the frozen weights' fingerprint, so this only runs if the backbone is the trained one
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "ev5"),
                 "--seed", "5", *CPU]) == 0
    ev5 = json.load(open(tmp_path / "ev5" / "metrics.json"))
    assert ev5["config"]["seed"] == 5 and ev5["backbone"]["init_seed"] == 3


def test_tampered_backbone_record_is_refused(runs, tmp_path, capsys):
    """A model whose recorded random-init seed no longer rebuilds its backbone: refused, not
    evaluated on another backbone."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(runs / "run" / "model", model)
    cfg = json.load(open(model / "avpt_config.json"))
    cfg["backbone"]["init_seed"] = 4
    json.dump(cfg, open(model / "avpt_config.json", "w"))
    assert main(["eval", "--checkpoint", str(model), "--out", str(tmp_path / "ev"), *CPU]) == 2
    assert "rebuilt frozen backbone differs" in capsys.readouterr().err


def test_undefined_metric_is_warned_and_recorded(caplog):
    import numpy as np

    from avpt.engine import score, undefined_metrics

    pred = dict(probs=np.array([0.2, 0.7, 0.4]), labels=np.array([0, 0, 0]),
                gts=np.zeros((3, 4, 4), bool), preds=np.zeros((3, 4, 4), bool),
                modalities=np.array(["MG"] * 3))
    metrics = score(pred)
    with caplog.at_level("WARNING", logger="avpt.train"):
        why = undefined_metrics(pred, metrics)
    assert "auc" in why and "one class only (benign" in why["auc"]
    assert "test auc is undefined" in caplog.text
    pred["labels"] = np.array([0, 1, 0])
    assert "auc" not in undefined_metrics(pred, score(pred))


def test_eval_with_pretrained_weights_checks_their_sha256(tmp_path, capsys):
    """A run on a local weights file (safetensors): eval reproduces it; eval with another
    weights file (a .pt state dict, loadable with weights_only=True) is refused by sha256."""
    import warnings

    from safetensors.torch import save_file

    from avpt import backbone as bb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = bb.load_backbone(bb.TINY_MODEL).state_dict()
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    other = tmp_path / "other.pt"
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, other)
    run = tmp_path / "run"
    assert main(_train_args(run, "--pretrained", str(weights))) == 0
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "ev"), *CPU]) == 0
    ev = json.load(open(tmp_path / "ev" / "metrics.json"))
    assert ev["test"] == json.load(open(run / "metrics.json"))["test"]
    assert ev["backbone"]["sha256"] and ev["backbone"]["init_seed"] is None
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "ev2"),
                 "--pretrained", str(other), *CPU]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the backbone the model was trained on" in err[0], err
    # and a resume of the run with the other weights is refused before anything is written
    before = _snapshot(run)
    assert main(_train_args(run, "--pretrained", str(other))) == 2
    assert "another config" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_a_two_class_method_refuses_three_classes(monkeypatch, tmp_path, capsys):
    """``Method.max_classes``: a method that only tells two classes apart is refused up front."""
    from avpt.methods import base
    from avpt.methods.linear import LinearProbe

    class TwoOnly(LinearProbe):
        max_classes = 2

    monkeypatch.setitem(base._REGISTRY, "two_only", TwoOnly)
    os.makedirs(tmp_path / "data")
    rc = main(["train", "--method", "two_only", "--dataset", "busi", "--data-root",
               str(tmp_path / "data"), "--set", "data.normal=class", "--backbone", "tiny",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "method 'two_only' takes at most 2 classes" in err[0] and "(normal, benign, malignant)" in err[0]
    from avpt.config import load_config
    from avpt.errors import ConfigError

    busi = dict(dataset="busi", data_root=str(tmp_path / "data"), backbone="tiny")
    with pytest.raises(ConfigError, match=r"model.class_names must have 3 names .*got \['a', 'b'\]"):
        load_config(overrides=dict(busi, method="coop"),
                    sets=["data.normal=class", "model.class_names=[a,b]"])
    with pytest.raises(ConfigError, match="model.preset must be one of default, table10, got 'table9'"):
        load_config(overrides=dict(busi, method="vpt"), sets=["model.preset=table9"])
