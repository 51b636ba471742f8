"""The shared text tower on embedded prompts equals open_clip's encode_text, and the cut after
the longest end-of-text position is exact (also with deep prompts overwritten per block)."""
import open_clip
import pytest
import torch

from avpt.backbone import TINY_MODEL
from avpt.text_tower import encode_embedded, eot_positions, prompt_length

# The GPU tier leaves these out: not a device path (the text tower against open_clip, on the CPU).
pytestmark = pytest.mark.cpu_only

PROMPTS = ["a photo of a benign lesion.", "malignant", "a b c d e f g"]


@pytest.fixture(scope="module")
def clip_and_tokens():
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_MODEL).eval().double()
    return clip, open_clip.get_tokenizer(TINY_MODEL)(PROMPTS)


def test_matches_encode_text_and_the_cut_is_exact(clip_and_tokens):
    clip, tokens = clip_and_tokens
    length = prompt_length(tokens)
    assert length < tokens.shape[1]  # the cut really drops columns
    embedded = clip.token_embedding(tokens)
    full = encode_embedded(clip, embedded, eot_positions(tokens))
    cut = encode_embedded(clip, embedded, eot_positions(tokens), length)
    torch.testing.assert_close(full, clip.encode_text(tokens), rtol=0, atol=1e-12)
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-12)


def test_the_cut_is_exact_with_deep_prompts(clip_and_tokens):
    clip, tokens = clip_and_tokens
    deep = torch.randn(len(clip.transformer.resblocks), 2, clip.transformer.width,
                       dtype=torch.float64)

    def hook(i, x):
        return torch.cat([x[:, :1], deep[i].expand(x.shape[0], -1, -1), x[:, 3:]], dim=1)

    embedded = clip.token_embedding(tokens)
    eot = eot_positions(tokens)
    full, tok_full = encode_embedded(clip, embedded, eot, layer_hook=hook, return_tokens=True)
    cut, tok_cut = encode_embedded(clip, embedded, eot, prompt_length(tokens), layer_hook=hook,
                                   return_tokens=True)
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-12)
    torch.testing.assert_close(tok_cut, tok_full[:, :tok_cut.shape[1]], rtol=0, atol=1e-12)
    # The hook is applied: without it the features differ.
    assert (encode_embedded(clip, embedded, eot) - full).abs().max() > 1e-3


def test_bad_length_is_one_line_error(clip_and_tokens):
    clip, tokens = clip_and_tokens
    with pytest.raises(ValueError, match="length must be in"):
        encode_embedded(clip, clip.token_embedding(tokens), eot_positions(tokens), length=0)
