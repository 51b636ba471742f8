"""Issue 27: drop-in models round-trip in their own ecosystem. A Hugging Face model with PIM
refuses a plain ``save_pretrained`` (its ``from_pretrained`` would rebuild it without the PIM)
and round-trips through ``save_pim_pretrained`` / ``load_pim_pretrained`` (real ``transformers``
when installed); an open_clip/timm full ``state_dict`` loads into a freshly injected model; an
original state dict is one line (strict) or loads the base (strict=False); ``remove_pim`` undoes
``freeze_base``; bad argument types, a layout mismatch and a ``t2p_reduce`` mismatch are refused;
``pim_state_dict(path)`` never replaces a non-regular file and a failed write names the path
and leaves no temporary file."""
import copy
import errno
import os

import pytest
import torch
from torch import nn

import avpt_kernels as ak

from .test_inject import FAMILIES, PIM_KW, _images, _loss, _open_clip, _timm


def _stepped(model, run):
    """One SGD step on the added weights, so they differ from a fresh injection's."""
    params = dict(model.named_parameters())
    opt = torch.optim.SGD([params[k] for k in ak.pim_state_dict(model)], lr=1.0)
    _loss(run(model, _images())).backward()
    opt.step()
    return model


def test_hugging_face_save_pretrained_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")  # installed in the dev venv
    build, run, _, _ = FAMILIES["hf-vit"]
    base = build().eval()
    x = _images()
    with torch.no_grad():
        plain_out = run(base, x)
    model = _stepped(ak.inject_pim(copy.deepcopy(base), layers=[0, 1], backend="torch", **PIM_KW),
                     run)
    with torch.no_grad():
        expected = run(model, x)
    with pytest.raises(ValueError, match="save_pretrained would drop the PIM blocks.*"
                                         "save_pim_pretrained"):
        model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()

    ak.save_pim_pretrained(model, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(run(model, x), expected)  # the model is as it was after saving
    loaded = ak.load_pim_pretrained(transformers.ViTModel, tmp_path / "saved", backend="torch")
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, x), expected, rtol=0, atol=0)
        # the folder's own files are the model without PIM: from_pretrained gives the base
        torch.testing.assert_close(run(transformers.ViTModel.from_pretrained(tmp_path / "saved")
                                       .eval(), x), plain_out, rtol=0, atol=0)
    ak.remove_pim(loaded)
    loaded.save_pretrained(tmp_path / "after_remove")  # the guard went with the PIM
    assert (tmp_path / "after_remove" / "config.json").is_file()


@pytest.mark.parametrize("family", ["open_clip", "timm"])
def test_full_state_dict_loads_into_a_freshly_injected_model(family):
    build, run, _, _ = FAMILIES[family]
    base = build().eval()
    model = _stepped(ak.inject_pim(copy.deepcopy(base), layers=[1], backend="torch", **PIM_KW), run)
    fresh = ak.inject_pim(copy.deepcopy(base), layers=[1], backend="torch", **PIM_KW)
    fresh.load_state_dict(model.state_dict())   # strict
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, _images()), run(model.eval(), _images()),
                                   rtol=0, atol=0)


def test_an_original_state_dict_is_one_line_or_loads_the_base():
    base, other = _timm().eval(), _timm().eval()
    model = ak.inject_pim(copy.deepcopy(base), layers=[0], backend="torch", **PIM_KW)
    with pytest.raises(ValueError) as info:
        model.load_state_dict(other.state_dict())
    msg = str(info.value)
    assert "\n" not in msg and "the model without PIM" in msg and "strict=False" in msg, msg
    pim_before = {k: v.clone() for k, v in ak.pim_state_dict(model).items()}
    result = model.load_state_dict(other.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == ["blocks.0.pim.packed", "blocks.0.pim_settings",
                                           "blocks.0.prompts"]
    assert torch.equal(model.blocks[0].block.attn.qkv.weight, other.blocks[0].attn.qkv.weight)
    assert all(torch.equal(v, pim_before[k]) for k, v in ak.pim_state_dict(model).items())


def test_remove_pim_after_freeze_base_restores_trainability():
    model = _timm()
    model.pos_embed.requires_grad_(False)           # the user's own choice, kept
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    ak.inject_pim(model, layers=[0], freeze_base=True, backend="torch", **PIM_KW)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "blocks.0.pim.packed", "blocks.0.prompts"}
    ak.remove_pim(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=True), "num_heads must be a positive int, got True"),
    (dict(head_dim=1.5), "head_dim must be a positive int, got 1.5"),
    (dict(num_prompts=False), "num_prompts must be a positive int, got False"),
    (dict(gate_hidden=0), "gate_hidden must be a positive int, got 0"),
    (dict(freeze_base="yes"), "freeze_base must be True or False"),
    (dict(t2p_reduce="max"), "t2p_reduce must be 'mean' or 'sum'"),
])
def test_bad_argument_types_are_refused_at_inject_time(kwargs, message):
    model = _timm()
    blocks = list(model.blocks)
    with pytest.raises((ValueError, TypeError), match=message):
        ak.inject_pim(model, layers=[0], **{**PIM_KW, **kwargs})
    assert list(model.blocks) == blocks   # nothing installed


def test_a_layout_that_contradicts_the_block_is_refused():
    seq_first = nn.TransformerEncoderLayer(64, 2, 128, batch_first=False)
    with pytest.raises(ValueError, match=r"batch_first=True but the block's attention is "
                                         r"sequence-first \[T, B, D\]: give batch_first=False"):
        ak.PIMBlock(seq_first, 64, batch_first=True)
    ak.PIMBlock(seq_first, 64, batch_first=False)
    with pytest.raises(ValueError, match="batch_first=False but the block's attention is batch-first"):
        ak.PIMBlock(nn.TransformerEncoderLayer(64, 2, 128, batch_first=True), 64, batch_first=False)
    with pytest.raises(ValueError, match="block's attention is sequence-first"):  # open_clip
        ak.make_pim_blocks(_open_clip(True), [0]) and None
        m = _open_clip(True)
        m.transformer.resblocks[0].attn.batch_first = False
        ak.inject_pim(m, layers=[0])


def test_a_t2p_reduce_mismatch_on_load_is_refused():
    base = _timm()
    mean = ak.inject_pim(copy.deepcopy(base), layers=[0], t2p_reduce="mean", **PIM_KW)
    total = ak.inject_pim(copy.deepcopy(base), layers=[0], t2p_reduce="sum", **PIM_KW)
    with pytest.raises(ValueError, match=r"blocks.0: the state dict's PIM was made with .*"
                                         r"t2p_reduce='mean', this model's with .*t2p_reduce='sum'"):
        total.load_state_dict(mean.state_dict())
    older = {k: v for k, v in mean.state_dict().items() if not k.endswith("pim_settings")}
    ak.inject_pim(copy.deepcopy(base), layers=[0], **PIM_KW).load_state_dict(older)  # loads


def test_pim_state_dict_never_replaces_a_non_regular_file(tmp_path):
    model = ak.inject_pim(_timm(), layers=[0], **PIM_KW)
    with pytest.raises(OSError, match="/dev/null is not a regular file"):
        ak.pim_state_dict(model, "/dev/null")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError, match="folder is a folder"):
        ak.pim_state_dict(model, tmp_path / "folder")


def test_pim_state_dict_disk_full_names_the_path_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import builtins

    model = ak.inject_pim(_timm(), layers=[0], **PIM_KW)
    target = tmp_path / "pim.safetensors"
    target.write_bytes(b"the earlier file")
    real_open = builtins.open

    def full_disk_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and str(file).endswith(".tmp"):
            def write(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f

    monkeypatch.setattr(builtins, "open", full_disk_open)
    with pytest.raises(OSError) as info:
        ak.pim_state_dict(model, target)
    monkeypatch.undo()
    msg = str(info.value)
    assert msg.startswith(f"cannot write {target}: No space left on device") and ".tmp" not in msg
    assert os.listdir(tmp_path) == ["pim.safetensors"]
    assert target.read_bytes() == b"the earlier file"
