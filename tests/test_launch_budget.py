"""Launch budget and host syncs of issue 11, measured by ``benchmarks/launches.py``: the model on
fake CUDA tensors (FakeTensorMode, no GPU needed), bf16 autocast, the tiny config, batch 2.

Asserted: zero host syncs in the inference forward and in the model + loss part of a training
step (A-VPT's Eq. 17 loss with its queue/centroid updates), on both backends. The launch budgets
(a PIM layer <= 6 launches forward and <= 13 backward: 9 kernels, no atomics, each weight
gradient a fixed-order sum, plus the shared weights' gradient accumulation; pooling + prompt bank + Anatomy MLP <= 15
forward; fused inference <= VPT-deep + 100, step <= VPT-deep + 300) are asserted, and the fused
PIM layer launches fewer kernels than the eager one, forward and backward. The counts are
recorded as test properties (``record_property``) and printed with ``-s``.
"""

import pytest
import torch

from avpt.backbone import TINY_MODEL
from benchmarks import launches as L

pytestmark = pytest.mark.filterwarnings("ignore")

BATCH = 2
PIM_FWD_BUDGET, PIM_BWD_BUDGET, ARE_BUDGET = 6, 13, 15


@pytest.fixture(scope="module")
def counts():
    out = {}
    for backend in ("torch", "triton"):
        out[backend] = L.count_method(f"avpt-{backend}", "avpt", {"backend": backend},
                                      TINY_MODEL, BATCH, torch.bfloat16, loss="avpt")
    out["vpt"] = L.count_method("vpt", "vpt", {}, TINY_MODEL, BATCH, torch.bfloat16)
    out["fused-method-loss"] = L.count_method("avpt-fused", "avpt", {"backend": "triton"},
                                              TINY_MODEL, BATCH, torch.bfloat16)
    for backend in ("torch", "triton"):  # fp32: no autocast
        out[f"{backend}-fp32"] = L.count_method(f"avpt-{backend}", "avpt", {"backend": backend},
                                                TINY_MODEL, BATCH, None, loss="avpt")
    return out


def _injected_layers():
    from avpt.methods import build_method

    return len(build_method("avpt", model_name=TINY_MODEL).layers)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_host_sync_in_forward_or_model_loss_part_of_a_step(counts, backend, record_property):
    r = counts[backend]
    record_property("inference", L.table([r]))
    assert r["inference"]["syncs"] == 0, r["inference"]["sync_ops"]
    assert r["train"]["forward"]["syncs"] == 0, r["train"]["sync_ops"]  # forward + Eq. 17 loss
    assert r["train"]["optimizer"]["syncs"] == 0
    assert r["inference"]["aten"] > 0 and r["train"]["backward"]["aten"] > 0


def test_counter_sees_syncs_and_h2d_copies():
    """The counter itself: .item(), bool() and a list -> CUDA copy are syncs; views are free."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode, L.tensor_ctor_copies_dispatched():
        x = torch.randn(4, 4, device="cuda")
        c = L.LaunchCounter("cuda")
        with L._triton_counted(c), c:
            y = x.t()[1:].unsqueeze(0)     # views: no launch
            x.t().reshape(16)              # not a view (a transposed tensor): clone, 1 launch
            z = (y * 2).sum()              # 2 launches
            z.item()                       # sync
            bool(z > 0)                    # 1 launch + sync
            torch.as_tensor([0, 1], device="cuda")  # host-to-device copy: sync
    assert c.totals()["syncs"] == 3, c.sync_ops
    assert c.totals()["aten"] == 5  # clone, mul, sum, gt, the copy


def test_fused_path_counts_triton_launches(counts, record_property):
    r = counts["triton"]
    layers = _injected_layers()
    per_layer = L.per_pim_layer(r, layers)
    record_property("pim_per_layer", per_layer)
    print(f"\nper PIM layer (tiny, {layers} injected): {per_layer}")
    # PIM forward: projection, t2p heads, prompt rows, p2t heads, output; backward: dO2, p2t
    # heads, prompt rows, t2p heads, dZ, dWz and dW'o (chunks), both reduced in one launch, the
    # prompt-row weight gradients (no zero-fill: every gradient is written once)
    assert per_layer["inference"] == {"aten": 0, "triton": 5}
    assert per_layer["backward"]["triton"] == 9
    sec = r["inference"]["by_section"]
    # Pooling: one launch (pixel-map splits summed by the last ticket's program); the prompt
    # bank: one forward, two backward (rows + inputs kernels).
    assert sec["pooling"]["triton"] == 1 and sec["bank"]["triton"] == 1
    assert r["train"]["backward"]["by_section"]["bank"]["triton"] == 2
    assert counts["torch"]["inference"]["triton"] == 0


def _pim_launches(r, phase):
    layers = _injected_layers()
    per = L.per_pim_layer(r, layers)[phase]
    return per["aten"] + per["triton"]


@pytest.mark.parametrize("precision", ["", "-fp32"], ids=["bf16-autocast", "fp32"])
def test_pim_forward_budget(counts, precision):
    fused, eager = counts["triton" + precision], counts["torch" + precision]
    assert _pim_launches(fused, "inference") <= PIM_FWD_BUDGET
    assert _pim_launches(fused, "inference") < _pim_launches(eager, "inference")


@pytest.mark.parametrize("precision", ["", "-fp32"], ids=["bf16-autocast", "fp32"])
def test_pim_backward_budget(counts, precision):
    fused, eager = counts["triton" + precision], counts["torch" + precision]
    assert _pim_launches(fused, "backward") <= PIM_BWD_BUDGET
    assert _pim_launches(fused, "backward") < _pim_launches(eager, "backward")


def test_region_pool_bank_anatomy_forward_budget(counts):
    sec = counts["triton"]["inference"]["by_section"]
    total = sum(sec.get(s, {}).get(k, 0) for s in ("pooling", "bank", "anatomy")
                for k in ("aten", "triton"))
    assert total <= ARE_BUDGET


def _launches(r, part):
    return r[part]["aten"] + r[part]["triton"]


def test_fused_inference_within_vpt_plus_100(counts):
    assert _launches(counts["fused-method-loss"], "inference") <= \
        _launches(counts["vpt"], "inference") + 100


def test_fused_step_within_vpt_plus_300(counts):
    fused, vpt = counts["fused-method-loss"]["train"], counts["vpt"]["train"]
    assert _launches(fused, "step") <= _launches(vpt, "step") + 300
