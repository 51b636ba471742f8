"""avpt pretrain: the weights load back into open_clip and pretraining helps a linear probe."""
import argparse
import os

import pytest
import torch

from avpt.backbone import TINY_MODEL, load_backbone
from avpt.pretrain import (DEFAULT_WEIGHTS, add_parser, main, make_pretrain_data, pretrain,
                           probe_auc, read_meta, save_weights)


def test_tiny_pretrain_roundtrip_and_determinism(tmp_path):
    data = make_pretrain_data(seed=5000, num_patients=6, views=1)
    assert data["images"].shape == (18, 3, 64, 64) and len(data["captions"]) == 18
    m1, hist = pretrain(data, epochs=2, batch_size=8, seed=3, progress=False)
    m2, _ = pretrain(data, epochs=2, batch_size=8, seed=3, progress=False)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k  # deterministic
    path = save_weights(m1, str(tmp_path / "w.safetensors"), fp16=True, meta={"seed": 5000})
    assert read_meta(path)["seed"] == 5000 and len(read_meta(path)["sha256"]) == 64
    loaded = load_backbone(TINY_MODEL, pretrained=path)
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float(), atol=0, rtol=0)


def test_cli_entry_point_refuses_bad_args_before_work(tmp_path):
    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["pretrain", "--seed", "3", "--out", str(tmp_path / "w.safetensors")])
    with pytest.raises(ValueError, match="--seed"):
        main(args)
    args = ap.parse_args(["pretrain", "--out", str(tmp_path / "w.bin")])
    with pytest.raises(ValueError, match="--out"):
        main(args)
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(not os.path.isfile(DEFAULT_WEIGHTS), reason="shipped weights absent")
def test_shipped_weights_beat_random_on_held_out_phantom():
    """Held-out phantom seed (neither the pretraining seed nor an evaluation seed)."""
    held_out = make_pretrain_data(seed=4242, num_patients=40, views=1)
    torch.manual_seed(0)
    random_auc = probe_auc(load_backbone(TINY_MODEL, pretrained=None), held_out)
    pretrained_auc = probe_auc(load_backbone(TINY_MODEL, pretrained=DEFAULT_WEIGHTS), held_out)
    # measured with the shipped file: random 0.471, pretrained 0.540 (a weak but real gain)
    assert pretrained_auc > random_auc + 0.05, (random_auc, pretrained_auc)
