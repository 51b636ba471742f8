"""Backbones from local open_clip folders (``--backbone local-dir:PATH``, issue 26 item 5): a
BiomedCLIP-layout folder (tiny timm ViT trunk, tiny BERT text tower with its tokenizer files,
random weights; tests/biomedclip_folder.py) loads offline, its towers run piece by piece exactly
as open_clip runs them whole, and A-VPT, VPT, LoRA, CILMP and BiomedAP train one epoch and
evaluate on it through the CLI."""
import json
import math
import warnings

import pytest
import torch

from avpt import vit
from avpt.backbone import RandomWeightsWarning, load_backbone
from avpt.cli import main
from avpt.local_backbone import TimmViTTower, get_tokenizer
from avpt.text_tower import encode_embedded, eot_positions, prompt_length, token_embedding
from tests.biomedclip_folder import make_biomedclip_folder
from tests.test_cli import FAST, _without_avpt_settings
from tests.test_data import write_busi


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_biomedclip_folder(tmp_path_factory.mktemp("biomedclip") / "model")


pytestmark = pytest.mark.usefixtures("hf_offline_env")


def test_the_folder_loads_with_its_weights_and_both_towers_run_piece_by_piece_exactly(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # the folder's weights are used
        clip = load_backbone(folder)
    assert isinstance(clip.visual, TimmViTTower)
    assert not any(p.requires_grad for p in clip.parameters()) and not clip.training
    saved = torch.load(folder[len("local-dir:"):] + "/open_clip_pytorch_model.bin")
    assert set(clip.state_dict()) == set(saved)
    assert all(torch.equal(clip.state_dict()[k], v) for k, v in saved.items())
    torch.manual_seed(0)
    images = torch.randn(2, 3, *clip.visual.image_size)
    v = clip.visual
    z = vit.embed(v, vit.patch_embed(v, images))
    for i in range(vit.num_layers(v)):
        z = vit.block(v, i, z)
    assert torch.equal(vit.pool(v, z)[2], clip.encode_image(images))
    tokens = get_tokenizer(folder)(["a benign lesion", "an irregular malignant mass shadow"])
    assert tokens[0, 0] == 2 and tokens[0, int(eot_positions(tokens)[0])] == 3  # [CLS] .. [SEP]
    eot = eot_positions(tokens)
    features = encode_embedded(clip, token_embedding(clip)(tokens), eot, prompt_length(tokens))
    assert torch.equal(features, clip.encode_text(tokens))


def test_a_bad_folder_is_one_line_naming_backbone(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    rc = main(["train", "--backbone", f"local-dir:{tmp_path / 'm'}", "--out", str(tmp_path / "o"),
               "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--backbone" in err[0]
    assert "open_clip_config.json" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("method,extra", [
    ("avpt", ["--set", "model.queue_size=16"]),
    ("vpt", []),
    ("lora", []),
    ("cilmp", ["--set", "model.prefix_length=2", "--set", "model.suffix_length=2",
               "--set", "model.knowledge_length=4"]),
    ("biomedap", []), ("linear", []), ("full", []), ("adapter", []), ("coop", [])])
def test_every_method_trains_and_evaluates_on_a_biomedclip_layout_folder(
        folder, tmp_path, method, extra):
    root = tmp_path / "busi"
    write_busi(str(root), n_per_class=5, size=40)
    out = tmp_path / "run"
    data = ["--dataset", "busi", "--data-root", str(root)]
    assert main(["train", "--method", method, "--backbone", folder, "--epochs", "1",
                 "--out", str(out), "--set", "report=false", *data,
                 *_without_avpt_settings(FAST), *extra]) == 0
    res = json.load(open(out / "metrics.json"))
    assert res["config"]["backbone"] == folder and res["test"]["n"] > 0
    assert math.isfinite(res["history"][-1]["train_loss"])
    assert main(["eval", "--checkpoint", str(out), "--out", str(tmp_path / "ev"), *data,
                 "--device", "cpu"]) == 0
    again = json.load(open(tmp_path / "ev" / "metrics.json"))["test"]
    assert all(again[k] == res["test"][k] for k in ("auc", "f1", "n"))
