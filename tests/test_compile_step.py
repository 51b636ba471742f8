"""Whole-step capture (issue 11, item 4): the A-VPT training step — forward, the Eq. 17 losses
(``AVPTLoss``: CLS, SEG, RCL with its queue, TXT, LAP, queue/centroid updates), backward,
gradient clipping and the ``AdamW(capturable=True)`` update — compiles with
``torch.compile(fullgraph=True)`` as ONE graph (``avpt.compiled_step.WholeStep``), on the torch backend
and on the triton backend (the PIM / region-pool / prompt-bank custom ops traced without a graph
break), and a compiled step gives the eager step's loss terms, parameters, Adam moments (the parameter
updates) and loss-state buffers.

Backend ``aot_eager``: dynamo + AOTAutograd, the same capture that inductor and CUDA graphs
(``mode="reduce-overhead"``) start from, without inductor's code generation, which on the two
busy CPU cores of CI takes minutes (C++ compilation of a ~2,000-op graph). The tiny config,
batch 2, 64x64 images. The eager reference is the trainer's eager path (``TrainStep``,
``.backward()``, ``clip_grad_norm_``, ``AdamW.step()``) with ``capturable=False`` and a float
learning rate: eager AdamW refuses ``capturable=True`` on CPU tensors (it is a CUDA feature), and
capturable changes where the step counter lives, not the arithmetic. Tolerances: the fp32 row of
``avpt_kernels.testing``. About 1.5 minutes on 2 cores, most of it dynamo tracing and, on the
triton backend, the interpreter.
"""
import collections
import copy

import pytest
import torch

from avpt.compiled_step import WholeStep, init_adam_state
from avpt.config import load_config
from avpt.engine import TrainStep, make_optimizer
from avpt_kernels.testing import assert_close
from tests.tiny_models import trained_looking_tiny_avpt, triton_device

STEPS, LR, WD, CLIP = 2, 1e-3, 1e-2, 1.0
# Parameters that would be exactly zero-gradient in the math get checked for finiteness only. (The
# PIM key biases, zero by softmax shift invariance, now sit inside each PIM's one packed vector,
# whose moments are compared at the scale of the whole vector, where their noise is negligible.)
ZERO_GRAD = ()
# A gradient that is a sum of much larger terms which cancel in the math is compared at the scale
# of those terms: the prompt LayerNorm bias receives sum_k dL/dP[k], and the Laplacian loss's
# part of dL/dP, 2 L P, sums to exactly zero over the prompts (1^T L = 0), while the same terms
# reach layer_bias uncancelled. So its Adam moments hold rounding noise of layer_bias's size.
CANCELLING = {"prompt_bank.ln_bias": "prompt_bank.layer_bias"}


def _tiny_avpt(backend_name):
    model = trained_looking_tiny_avpt(backend_name, region_types="ema").train()
    return model.to(triton_device(backend_name))


def _batches(size=64, device="cpu"):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(STEPS):
        out.append(dict(image=torch.randn(2, 3, size, size, generator=g),
                        maps=torch.rand(2, 3, size, size, generator=g),
                        label=torch.tensor([0, 1]),
                        mask=(torch.rand(2, 1, size, size, generator=g) > 0.5).float(),
                        modality=torch.tensor([0, 1])))
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _eager_steps(model, batches):
    loss_fn = model.make_loss().to(next(model.parameters()).device)
    step_module, params = TrainStep(model, loss_fn), _trainable(model)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    terms = []
    for batch in batches:
        t = step_module(batch)
        opt.zero_grad(set_to_none=True)
        t["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        terms.append({k: v.detach() for k, v in t.items()})
    return terms, loss_fn, opt


def _compiled_steps(model, batches):
    from torch._dynamo.testing import CompileCounterWithBackend

    device = next(model.parameters()).device
    loss_fn = model.make_loss().to(device)
    opt = torch.optim.AdamW(_trainable(model), lr=torch.tensor(LR, device=device), weight_decay=WD,
                            capturable=True)
    counter, graphs = CompileCounterWithBackend("aot_eager"), []

    def backend(gm, example_inputs):  # the counter, keeping the graphs for the test to read
        graphs.append(gm)
        return counter(gm, example_inputs)

    step = WholeStep(TrainStep(model, loss_fn), opt, device, grad_clip=CLIP, mode=None,
                     backend=backend)
    return [step(batch) for batch in batches], loss_fn, opt, counter, graphs


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_whole_training_step_compiles_fullgraph_and_matches_eager(backend_name):
    torch._dynamo.reset()
    eager_model = _tiny_avpt(backend_name)
    model = copy.deepcopy(eager_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batches = _batches(device=triton_device(backend_name))

    terms, loss_fn, opt, counter, graphs = _compiled_steps(model, batches)
    e_terms, e_loss_fn, e_opt = _eager_steps(eager_model, batches)

    # one frame, one graph, no graph break (fullgraph=True would have raised on one); the second
    # step reuses the graph (the learning rate is a tensor input, not a guarded constant)
    assert counter.frame_count == 1, counter.frame_count
    # forward, backward and update are all in it: the fused ops of the forward (Triton backend),
    # torch.autograd.grad, and AdamW's update of every trainable tensor (one lerp_ each)
    targets = collections.Counter(str(n.target) for g in graphs for n in g.graph.nodes)
    if backend_name == "triton":
        assert targets["avpt.pim_forward.default"] == len(model.layers) and \
            targets["avpt.prompt_bank.default"] == 1, targets
    assert sum(v for k, v in targets.items() if k.startswith("<function grad")) == 1, targets
    assert targets["lerp_"] == len(_trainable(model)), targets
    for a, e in zip(terms, e_terms):
        assert set(a) == set(e) == {"cls", "seg", "rcl", "txt", "lap", "loss"}
        for k in e:
            assert_close(a[k], e[k], torch.float32, f"{k} ({backend_name})")
    assert all(p.grad is None for p in _trainable(model))  # the step never sets .grad

    eager = dict(eager_model.named_parameters())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, eager[name]), name  # the frozen backbone stays frozen
            continue
        assert torch.isfinite(p).all(), name
        if name.endswith(ZERO_GRAD):
            continue
        assert (eager[name] != before[name]).any() and (p != before[name]).any(), name
        # The update itself (p - p_before, ~lr) is known only to the rounding of p and to Adam's
        # per-element normalisation m/sqrt(v), which turns the fp32 noise of a tiny gradient
        # element into O(1e-4) relative noise of its update: so the parameters are compared at
        # the scale of all trainable parameters (below), and what determines the update, the
        # clipped gradients' Adam moments, per tensor at the fp32 tolerance.
        st, e_st = opt.state[p], e_opt.state[eager[name]]
        assert float(st["step"]) == float(e_st["step"]) == STEPS, name
        for key in ("exp_avg", "exp_avg_sq"):
            scale_of = e_opt.state[eager[CANCELLING.get(name, name)]][key]
            assert_close(st[key], e_st[key], torch.float32, f"{key} of {name} ({backend_name})",
                         scale=scale_of.abs().max())
    names = [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(ZERO_GRAD)]
    flat = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])
    e_flat = torch.cat([eager[n].detach().reshape(-1) for n in names])
    assert_close(flat, e_flat, torch.float32, f"trainable parameters ({backend_name})")
    # loss state: the RCL queue and the EMA centroids updated inside the graph
    for (k, v), (_, e_v) in zip(loss_fn.state_dict().items(), e_loss_fn.state_dict().items()):
        if v.is_floating_point():
            assert_close(v, e_v, torch.float32, k)
        else:
            assert torch.equal(v, e_v), k


def test_compile_option_is_validated_and_wired():
    assert load_config(overrides=dict(compile="reduce-overhead"))["compile"] == "reduce-overhead"
    assert load_config(sets=["compile=off"])["compile"] == "none"  # YAML reads off as false
    with pytest.raises(ValueError, match=r"^compile must be none\|default\|reduce-overhead, "
                                         r"got 'fast'$"):
        load_config(sets=["compile=fast"])
    params = [torch.nn.Parameter(torch.randn(3))]
    eager = make_optimizer(params, 1e-3, 0.0, "none")
    assert not eager.param_groups[0]["capturable"] and isinstance(eager.param_groups[0]["lr"], float)
    opt = make_optimizer(params, 1e-3, 0.0, "default", "cpu")
    assert opt.param_groups[0]["capturable"] and isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    init_adam_state(opt)
    assert set(opt.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    with pytest.raises(ValueError, match="capturable"):
        WholeStep(torch.nn.Identity(), torch.optim.AdamW(params), "cpu")
