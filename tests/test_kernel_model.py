"""The kernel model (benchmarks/kernel_model.py) of the fused A-VPT path at ViT-B/16, B=32: the
structure a GPU would call latency-bound is absent. Every Triton launch of the forward and the
training step is recorded (not run) at the model's shape and costed from its grid, occupancy,
serial iterations, bytes and FLOPs."""
import pytest

from benchmarks import kernel_model as km


@pytest.fixture(scope="module")
def launches():
    return km.model_launches()


def test_every_launch_fills_the_gpu_or_is_short(launches):
    """No launch of the fused path runs fewer programs than the GPU has SMs (132) unless its
    estimated time is under 5 us."""
    thin = [(l.phase, l.kernel, l.grid, round(l.est_us, 1)) for l in launches
            if l.programs < km.SMS and l.est_us >= 5.0]
    assert not thin, f"launches with < {km.SMS} programs and >= 5 us: {thin}"


def test_no_atomics_in_the_backward(launches):
    """Every gradient is a fixed-order sum: no backward kernel uses an atomic."""
    assert {l.kernel for l in launches if "backward" in l.phase and l.atomics} == set()


def _per_layer(launches, phase):
    layer = [l for l in launches if l.phase == phase]
    return layer, sum(l.est_us for l in layer) / km.MODEL["L"]


def test_pim_layer_forward_within_the_issue_target(launches):
    """The model's estimate of one PIM layer's forward at B=32: <= 40 us of GPU time (the GPU
    target), 5 launches (AOT registers of the GPU machines' Triton where recorded)."""
    fwd, us = _per_layer(launches, "pim forward")
    assert len(fwd) == 5 * km.MODEL["L"]
    assert us <= 40.0, f"PIM forward estimated at {us:.1f} us a layer"


def test_pim_layer_backward_within_the_issue_target(launches):
    """The model's estimate of one PIM layer's backward at B=32: <= 80 us of GPU time, 9
    launches."""
    bwd, us = _per_layer(launches, "pim backward")
    assert len(bwd) == 9 * km.MODEL["L"]
    assert us <= 80.0, f"PIM backward estimated at {us:.1f} us a layer"


def test_launches_are_costed_by_the_compile_they_get(launches):
    """At the model's shape a GPU launch is specialized by its arguments (pointers and sizes that
    are multiples of 16 get divisibility hints, ints equal to 1 become constants): exactly what
    each op's ``aligned`` AOT configurations assume, so the model reads their registers
    (recorded for every launch), not the generic compile's."""
    assert all(km.is_aligned(l) for l in launches), sorted(
        {(l.kernel, tuple(sorted(km.launch_specialization(l)[0])),
          tuple(sorted(km.launch_specialization(l)[1]))) for l in launches
         if not km.is_aligned(l)})
    assert all(l.registers for l in launches), sorted({l.kernel for l in launches
                                                       if not l.registers})


@pytest.mark.parametrize("op,map_side,count", [("low_rank_project", 0, 3),
                                               ("region_pool", 224, 2)])
def test_other_launches_are_costed_by_the_compile_they_get(op, map_side, count):
    """The same where the A-VPT path above does not go: the low-rank projection (CILMP's) and
    region pooling on 224x224 pixel maps, forward and backward at the ops' model ``Shape``."""
    import torch

    from avpt_kernels.ops import OPS
    from avpt_kernels.ops.opspec import Shape

    spec = OPS[op].SPEC
    shape = Shape(B=32, T=197, D=768, map_side=map_side)
    gen = torch.Generator().manual_seed(0)
    inputs = spec.make(shape, lambda *s, **_: torch.rand(*s, generator=gen).requires_grad_(True),
                       None)
    log = []
    with km.record_launches(log):
        out = spec.op(shape)(*inputs, backend="triton")
        torch.autograd.grad(out, inputs, torch.ones_like(out))
    assert len(log) == count and all(km.is_aligned(l) for l in log), [
        (l.kernel, km.launch_specialization(l)) for l in log]


def test_grids_are_the_launchers_own(launches):
    """The recorded grids are the launchers' (e.g. the projection over all B*T token rows in
    BM-row tiles, the three weights from one read of Z, plus the prompt rows; the output over
    (BM, BN) tiles)."""
    from avpt_kernels.ops.pim import launch

    grids = {l.kernel: l.grid for l in launches if l.phase == "pim forward"}
    b, t, d, k = (km.MODEL[n] for n in "BTDK")
    pm = launch.PROJ["BM"]
    assert grids["_project_kernel"] == (-(-b * t // pm) + -(-b * k // pm), 1, 1)
    bm, bn = launch.OUTPUT["BM"], launch.OUTPUT["BN"]
    assert grids["_output_kernel"] == (-(-b * t // bm), d // bn, 1)
    assert grids["_p2t_attn_kernel"] == (b, km.MODEL["H"], 1)
