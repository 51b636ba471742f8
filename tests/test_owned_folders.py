"""Issue 27: output folders with an owner. Every folder the CLI writes records what made it
(``.avpt-owner.json``); a command refuses a folder of another kind, of another run, or one avpt
did not make, in one line saying how to proceed (a new --out, or --overwrite), leaving the folder
byte for byte as it was; ``pretrain`` writes under the working directory by default and never
inside the package (the shipped weights stay as they are)."""
import json
import os

import pytest

from avpt.cli import main
from avpt.owner import MARKER
from avpt.pretrain import SHIPPED_WEIGHTS

from .test_cli_errors import CPU, FAST, PHANTOM, _snapshot, _train_args


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished 1-epoch training run and an evaluation of it, each in its own folder."""
    base = tmp_path_factory.mktemp("owned")
    assert main(_train_args(base / "run")) == 0
    assert main(["eval", "--checkpoint", str(base / "run"), "--out", str(base / "ev"), *CPU,
                 *FAST[:2]]) == 0
    return base


def test_every_folder_records_what_made_it(made):
    run = json.load(open(made / "run" / MARKER))
    ev = json.load(open(made / "ev" / MARKER))
    assert run["kind"] == "train" and "avpt on phantom" in run["what"] and run["id"]
    assert ev["kind"] == "eval" and str(made / "run" / "model") in ev["what"]


def _refused(argv, capsys, *watched):
    before = {p: _snapshot(p) for p in watched}
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    for p, snap in before.items():
        assert _snapshot(p) == snap, f"{p} changed"
    return err[0]


def test_a_folder_of_another_kind_is_refused(made, capsys):
    msg = _refused(_train_args(made / "ev"), capsys, made / "ev")
    assert "holds an evaluation (avpt eval), which avpt train would overwrite" in msg
    assert "give a new --out, or pass --overwrite" in msg
    msg = _refused(["cv", *PHANTOM, "--backbone", "tiny", "--epochs", "1", "--out",
                    str(made / "run"), *FAST, *CPU], capsys, made / "run")
    assert "holds a training run (avpt train), which avpt cv would overwrite" in msg
    msg = _refused(["demo", "--methods", "linear", "--epochs", "1", "--out", str(made / "run"),
                    *CPU], capsys, made / "run")
    assert "holds a training run (avpt train), which avpt demo would overwrite" in msg


def test_another_evaluation_is_refused_and_the_same_one_reruns(made, capsys):
    again = ["eval", "--checkpoint", str(made / "run"), "--out", str(made / "ev"), *CPU, *FAST[:2]]
    other = again + ["--set", "data.num_patients=4"]
    msg = _refused(other, capsys, made / "ev")
    assert "holds another evaluation: of" in msg and "--overwrite" in msg
    metrics = json.load(open(made / "ev" / "metrics.json"))
    assert main(again) == 0                                   # the same evaluation: rerun
    assert json.load(open(made / "ev" / "metrics.json"))["test"] == metrics["test"]
    assert main(other + ["--overwrite"]) == 0                  # asked for: replaced
    assert json.load(open(made / "ev" / "metrics.json"))["data"]["test_samples"] == 8


def test_a_folder_avpt_did_not_make_is_refused(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own notes")
    msg = _refused(_train_args(tmp_path / "mine"), capsys, tmp_path / "mine")
    assert "is a folder avpt did not make (1 entries, e.g. 'notes.txt')" in msg


def test_pretrain_never_writes_into_the_package_or_a_run(made, tmp_path, capsys, monkeypatch):
    from avpt.pretrain import DEFAULT_OUT, add_parser
    import argparse

    shipped = _snapshot(os.path.dirname(SHIPPED_WEIGHTS))
    small = ["--patients", "4", "--views", "1", "--epochs", "1", "--batch-size", "4",
             "--threads", "1"]
    msg = _refused(["pretrain", "--out", SHIPPED_WEIGHTS, *small], capsys)
    assert "is inside the installed avpt package" in msg
    msg = _refused(["pretrain", "--out", str(made / "run" / "checkpoint.pt"), *small], capsys,
                   made / "run")
    assert "which holds a training run (avpt train)" in msg
    (tmp_path / "w.safetensors").write_bytes(b"someone's file")
    msg = _refused(["pretrain", "--out", str(tmp_path / "w.safetensors"), *small], capsys)
    assert "exists (a file avpt pretrain did not make): give another --out, or pass --overwrite" in msg
    os.mkfifo(tmp_path / "pipe.pt")                          # not a regular file
    msg = _refused(["pretrain", "--out", str(tmp_path / "pipe.pt"), *small], capsys)
    assert "pipe.pt is not a regular file" in msg
    # the default is under the working directory
    monkeypatch.chdir(tmp_path)
    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="command"))
    assert ap.parse_args(["pretrain"]).out == DEFAULT_OUT and not os.path.isabs(DEFAULT_OUT)
    assert main(["pretrain", *small]) == 0
    assert (tmp_path / DEFAULT_OUT).is_file() and (tmp_path / (DEFAULT_OUT + ".json")).is_file()
    assert main(["pretrain", "--out", str(tmp_path / "w.safetensors"), "--overwrite", *small]) == 0
    assert _snapshot(os.path.dirname(SHIPPED_WEIGHTS)) == shipped


def test_no_output_lands_inside_the_package(capsys):
    pkg_folder = os.path.join(os.path.dirname(SHIPPED_WEIGHTS), "run")
    msg = _refused(_train_args(pkg_folder), capsys)
    assert "is inside the installed avpt package" in msg and not os.path.exists(pkg_folder)


# ----------------------------------------------------------------------------------------------
# Messages that name the fix
# ----------------------------------------------------------------------------------------------
def test_a_models_trainable_weights_as_pretrained_name_the_fix(made, capsys):
    msg = _refused(_train_args(made / "new", "--pretrained",
                               str(made / "run" / "model" / "trainable.safetensors")), capsys)
    assert "holds an avpt model's trainable weights (method 'avpt'), not open_clip backbone" in msg
    assert "avpt eval --checkpoint RUN" in msg


def test_a_state_dict_mismatch_is_summed_up_in_one_line():
    import torch
    from torch import nn

    from avpt.backbone import state_dict_mismatch

    with pytest.raises(RuntimeError) as info:
        nn.Linear(3, 2).load_state_dict({"weight": torch.zeros(2, 4), "other": torch.zeros(1)})
    line = state_dict_mismatch(str(info.value))
    assert "\n" not in line and "1 missing keys (e.g. 'bias')" in line
    assert "1 unexpected keys (e.g. 'other')" in line and "1 of another shape" in line


def test_folds_of_other_data_advise_fold_null_not_deleting_the_file(tmp_path):
    from avpt.data import phantom_records
    from avpt.data.folds import load_or_make_folds
    from avpt.data.records import DataError

    path = str(tmp_path / "folds.json")
    load_or_make_folds(path, phantom_records(4, 1, ["MG"], size=8), k=2)
    with pytest.raises(DataError, match=r"made for other data; .*--set fold=null.*"
                                        r"--set folds_file=NEW.json"):
        load_or_make_folds(path, phantom_records(6, 1, ["MG"], size=8), k=2)


def test_a_class_count_mismatch_advises_the_other_setting_not_the_one_given():
    from avpt.saved_eval import _check_saved_classes
    from avpt.errors import ConfigError

    busi = {"dataset": "busi", "data": {"normal": "class"}}
    with pytest.raises(ConfigError) as info:
        _check_saved_classes("RUN/model", {"num_classes": 2}, busi)
    assert "drop data.normal=class" in str(info.value)
    assert "give --set data.normal=class" not in str(info.value)
    with pytest.raises(ConfigError, match=r"give --set data.normal=class"):
        _check_saved_classes("RUN/model", {"num_classes": 3}, dict(busi, data={}))
