"""``avpt knowledge`` (issue 26 item 4): CILMP's knowledge states from a local causal LM folder
(a tiny random GPT-2 built in tests/tiny_causal_lm.py; nothing downloaded), read back by CILMP,
whose run rows name the knowledge source."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from avpt.cli import main
from avpt.methods.cilmp.descriptions import descriptions_for
from avpt.llm_knowledge import load_causal_lm
from tests.test_cli import FAST, _without_avpt_settings
from tests.test_data import write_busi
from tests.tiny_causal_lm import make_causal_lm_folder

CLASSES = ["benign", "malignant"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return make_causal_lm_folder(tmp_path_factory.mktemp("lm") / "tiny-gpt2")


pytestmark = pytest.mark.usefixtures("hf_offline_env")


def test_states_are_the_last_layer_of_every_description_token_without_bos(lm, tmp_path):
    out = tmp_path / "k"
    assert main(["knowledge", "--model-dir", lm, "--out", str(out), "--class-names", *CLASSES,
                 "--max-tokens", "12"]) == 0
    meta = json.load(open(out / "knowledge.json"))
    assert meta["model"] == "tiny-gpt2" and meta["width"] == 32
    model, tok = load_causal_lm(lm)
    for name in CLASSES:
        states = load_file(str(out / f"{name}.safetensors"))["states"]
        parts = []
        for text in descriptions_for(name):
            ids = tok(text, return_tensors="pt").input_ids
            assert int(ids[0, 0]) == tok.bos_token_id
            with torch.no_grad():  # the final norm's output, through the base model's own API
                parts.append(model.transformer(input_ids=ids).last_hidden_state[0, 1:])
        expected = torch.cat(parts)[:12]
        assert states.shape == (12, 32) and meta["lengths"][name] == 12
        torch.testing.assert_close(states, expected, rtol=0, atol=0)


def test_a_folder_that_is_not_a_model_is_one_line(tmp_path, capsys):
    rc = main(["knowledge", "--model-dir", str(tmp_path), "--out", str(tmp_path / "k")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--model-dir" in err[0]


def test_cilmp_trains_on_lm_knowledge_and_its_rows_name_the_source(lm, tmp_path):
    know = tmp_path / "k"
    names = ["benign lesion", "malignant lesion"]
    assert main(["knowledge", "--model-dir", lm, "--out", str(know), "--class-names", *names,
                 "--max-tokens", "4"]) == 0
    root = tmp_path / "busi"
    write_busi(str(root), n_per_class=5, size=40)
    common = ["--method", "cilmp", "--backbone", "tiny", "--epochs", "1", "--set", "report=false",
              "--dataset", "busi", "--data-root", str(root), *_without_avpt_settings(FAST),
              "--set", "model.prefix_length=2", "--set", "model.suffix_length=2"]
    assert main(["train", *common, "--out", str(tmp_path / "llm"),
                 "--set", f"model.knowledge_dir={know}"]) == 0
    res = json.load(open(tmp_path / "llm" / "metrics.json"))
    assert res["method_label"] == "CILMP, tiny-gpt2 knowledge"
    saved = json.load(open(tmp_path / "llm" / "model" / "avpt_config.json"))["config"]
    assert saved["knowledge_source"] == "tiny-gpt2"
    assert math.isfinite(res["history"][-1]["train_loss"])
    assert main(["train", *common, "--out", str(tmp_path / "clip"),
                 "--set", "model.knowledge_length=4"]) == 0
    res = json.load(open(tmp_path / "clip" / "metrics.json"))
    assert res["method_label"] == "CILMP, CLIP-text knowledge"
