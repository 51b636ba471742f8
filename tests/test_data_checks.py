"""Issue 27: data read right or refused before training. Lesion masks are decoded by their
image mode (palette, alpha, 16-bit, grey, binary, RGB) or refused naming the file; an empty class
folder, two files with one sample id, a training split with one class and a warm-up longer than
the run are refused by name before anything trains."""
import logging
import os

import numpy as np
import pytest
from PIL import Image

from avpt.data import load_records
from avpt.data.checks import check_split_classes
from avpt.data.records import DataError, read_mask

from .test_data import write_busi

LESION = (slice(3, 9), slice(4, 12))


def _truth(shape=(16, 20)):
    m = np.zeros(shape, bool)
    m[LESION] = True
    return m


def _palette(path):
    """VOC style: index 0 black, index 1 = (128, 0, 0) the lesion (grey value 38 < 128)."""
    idx = _truth().astype(np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 254)
    im.save(path)


def _alpha(path, mode):
    """A uniformly white image whose alpha channel holds the lesion (opaque) on transparent."""
    chans = 2 if mode == "LA" else 4
    arr = np.full(_truth().shape + (chans,), 255, np.uint8)
    arr[..., -1] = np.where(_truth(), 255, 0)
    Image.fromarray(arr, mode=mode).save(path)


def _sixteen(path, top):
    Image.fromarray((_truth() * top).astype(np.uint16)).save(path)   # mode I;16


def _binary(path):
    Image.fromarray(_truth()).convert("1").save(path)


def _red(path):
    arr = np.zeros(_truth().shape + (3,), np.uint8)
    arr[_truth()] = (128, 0, 0)
    Image.fromarray(arr).save(path)


@pytest.mark.parametrize("name, write", [
    ("palette", _palette), ("LA alpha", lambda p: _alpha(p, "LA")),
    ("RGBA alpha", lambda p: _alpha(p, "RGBA")), ("16-bit 0/65535", lambda p: _sixteen(p, 65535)),
    ("16-bit 0/1", lambda p: _sixteen(p, 1)), ("binary", _binary), ("dark red RGB", _red),
    ("grey 0/1", lambda p: Image.fromarray(_truth().astype(np.uint8)).save(p)),
    ("grey 0/255", lambda p: Image.fromarray(_truth().astype(np.uint8) * 255).save(p)),
])
def test_masks_are_decoded_by_their_mode(tmp_path, name, write):
    path = str(tmp_path / "m.png")
    write(path)
    got = read_mask(path)
    assert got.dtype == bool and np.array_equal(got, _truth()), name


def test_a_mask_mode_that_cannot_be_decoded_is_refused_naming_the_file(tmp_path):
    path = str(tmp_path / "cmyk_mask.jpg")
    Image.fromarray(_truth().astype(np.uint8) * 255).convert("CMYK").save(path)
    with pytest.raises(DataError, match=r"cmyk_mask\.jpg.*mode 'CMYK'.*8-bit grey PNG"):
        read_mask(path)


def test_busi_palette_mask_has_its_lesion(tmp_path):
    """The bug: a palette mask went through convert('L') > 127 and came back empty."""
    base = write_busi(str(tmp_path), n_per_class=2, size=16)
    os.remove(os.path.join(base, "malignant", "malignant (1)_mask.png"))
    img = Image.open(os.path.join(base, "malignant", "malignant (1).png"))
    idx = np.zeros((img.height, img.width), np.uint8)
    idx[2:6, 2:7] = 1
    im = Image.fromarray(idx, mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 254)
    im.save(os.path.join(base, "malignant", "malignant (1)_mask.png"))
    rec = next(r for r in load_records("busi", str(tmp_path)) if r.sample_id == "busi-malignant-1")
    assert rec.load().mask.sum() == 20


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    base = write_busi(str(tmp_path), n_per_class=2, size=16)
    for f in os.listdir(os.path.join(base, "malignant")):
        os.remove(os.path.join(base, "malignant", f))
    with pytest.raises(DataError, match=r"malignant.*class folder 'malignant' has no image"):
        load_records("busi", str(tmp_path))


def test_foreign_names_get_their_own_sample_id_and_duplicates_are_refused(tmp_path):
    from avpt.data.records import Record, check_unique_ids

    base = write_busi(str(tmp_path), n_per_class=2, size=16)
    for suffix in ("", "_mask"):
        src = os.path.join(base, "benign", f"benign (1){suffix}.png")
        Image.open(src).save(os.path.join(base, "benign", f"other (1){suffix}.png"))
    ids = [r.sample_id for r in load_records("busi", str(tmp_path))]
    assert len(ids) == len(set(ids)) and {"busi-benign-1", "busi-benign-other-1"} <= set(ids)
    same = [Record("x-1", "p", 0, "US", loader=lambda: None, source=s) for s in ("a.png", "b.png")]
    with pytest.raises(DataError, match=r"a\.png and b\.png have the same sample id 'x-1'"):
        check_unique_ids(same)


def test_a_training_split_with_one_class_is_refused_and_a_test_split_warned(caplog):
    classes = ("benign", "malignant")
    with pytest.raises(DataError, match=r"training samples of fold 1 of 5 have no 'malignant'.*"
                                        r"3 benign, 0 malignant"):
        check_split_classes([0, 0, 0], [0, 1], classes, "fold 1 of 5")
    with caplog.at_level(logging.WARNING, logger="avpt.data"):
        check_split_classes([0, 1], [1, 1], classes, "fold 2 of 5")
    assert "test samples of fold 2 of 5 have no 'benign'" in caplog.text


def test_the_cli_refuses_a_one_class_data_set_before_training(tmp_path, capsys):
    from avpt.cli import main

    rc = main(["train", "--dataset", "phantom", "--backbone", "tiny", "--modality", "MG",
               "--set", "data.num_patients=1", "--set", "data.views=2", "--set", "fold=null",
               "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run"),
               "--set", "progress=false", "--set", "report=false", "--set", "tensorboard=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no 'malignant' sample" in err[0], err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("sets, message", [
    (["warmup_epochs=4"], "warmup_epochs 4 is longer than the run's 3 epochs"),
    (["stop_after_epoch=5"], "stop_after_epoch 5 is past the run's last epoch (3)"),
])
def test_schedule_settings_are_checked_against_each_other(sets, message):
    from avpt.config import load_config
    from avpt.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, None, {"epochs": 3, "backbone": "tiny"}, sets)
    # the default warm-up (5 epochs) is shortened for a short run, not refused
    assert load_config(None, None, {"epochs": 2, "backbone": "tiny"}, [])["warmup_epochs"] == 5
