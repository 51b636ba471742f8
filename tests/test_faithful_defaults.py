"""Issue 26 item 3: the authors' code is the default for CILMP and BiomedAP (the abstract-based
readings are named options), BiomedAP's modality word comes from the data, and CILMP's epoch
averaging is scaled to the run's epochs as the authors' N(100, 30) is to their 100."""
import math
import warnings

import open_clip
import pytest
import torch

from avpt import backbone as bb
from avpt.data import modality_word
from avpt.methods import build_method, get_config_class
from avpt.methods.cilmp import PromptAveraging


def _share_of_last(avg: PromptAveraging, epochs: int, last: int) -> float:
    w = [avg.weight(e) for e in range(1, epochs + 1)]
    return sum(w[-last:]) / sum(w)


def test_averaging_is_scaled_to_the_run():
    authors = PromptAveraging(100)
    assert (authors.mean, authors.std) == (100.0, 30.0)   # their vit_b16 run: N(100, 30)
    short = PromptAveraging(50)
    assert (short.mean, short.std) == (50.0, 15.0)
    # the last tenth of the run carries the same weight share as in the authors' run (~26%)
    assert _share_of_last(authors, 100, 10) == pytest.approx(0.26, abs=0.01)
    assert _share_of_last(short, 50, 5) == pytest.approx(_share_of_last(authors, 100, 10), abs=0.01)
    # unscaled N(100, 30) under 50 epochs put 53% on the last 10: what the issue measured
    assert _share_of_last(PromptAveraging(50, 100, 30), 50, 10) == pytest.approx(0.53, abs=0.01)
    given = PromptAveraging(50, mean=2.0, std=1.0)
    assert (given.mean, given.std) == (2.0, 1.0)


def test_code_is_the_default_and_the_readings_are_named():
    cilmp, biomedap = get_config_class("cilmp")(), get_config_class("biomedap")()
    assert cilmp.averaging == "code" and cilmp.averaging_mean is None
    assert (biomedap.fusion_input, biomedap.low_anchor) == ("code", "code")
    assert PromptAveraging(10, mode="paper").mode == "all"   # a config saved before issue 26


@pytest.mark.parametrize("dataset,modalities,word", [
    ("busi", None, "ultrasound"), ("inbreast", None, "mammography"), ("duke", None, "MRI"),
    ("phantom", ["MG"], "mammography"), ("phantom", ["US", "MRI"], "medical"),
    ("phantom", None, "medical")])
def test_modality_word_from_the_data(dataset, modalities, word):
    assert modality_word(dataset, modalities) == word


def test_biomedap_prompts_say_the_data_modality_and_legacy_names_load():
    from avpt.train import class_settings

    cfg = {"dataset": "inbreast", "modality": None, "method": "biomedap", "data": {}}
    assert class_settings(cfg, {}) == {"modality_word": "mammography"}
    assert class_settings(cfg, {"modality_word": "x-ray"}) == {}   # the user's word stays
    assert "modality_word" not in class_settings(dict(cfg, method="coop"), {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        m = build_method("biomedap", model_name=bb.TINY_MODEL, modality_word="mammography",
                         seg=False, fusion_input="paper", low_anchor="paper")
    assert (m.config.fusion_input, m.config.low_anchor) == ("image-tokens", "visual-prototypes")
    tok = open_clip.get_tokenizer(bb.TINY_MODEL)
    want = tok([f"a mammography photo of a {n} in the breast." for n in m.config.class_names])
    assert torch.equal(m.tokens, want)


def test_presets_name_the_authors_busi_run_and_the_readings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        m = build_method("biomedap", model_name=bb.TINY_MODEL, seg=False, preset="authors-busi",
                         modality_word="ultrasound")
    assert (m.config.num_context, m.config.ctx_init) == (5, None) and m.context.shape[0] == 5
    tok = open_clip.get_tokenizer(bb.TINY_MODEL)
    want = tok([f"a ultrasound photo of a {n} in the breast." for n in m.config.class_names])
    # the 5 context vectors overwrite the template's first 5 tokens, as the authors' code does
    assert torch.equal(m.tokens, want) and m.suffix.shape[1] == want.shape[1] - 1 - 5
    reading = get_config_class("biomedap")(preset="abstract-reading")
    assert (reading.fusion_input, reading.low_anchor) == ("image-tokens", "visual-prototypes")
    assert get_config_class("cilmp")(preset="abstract-reading").averaging == "all"
