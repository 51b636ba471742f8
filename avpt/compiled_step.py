"""The whole training step compiled as one graph (``WholeStep``): forward, loss, backward,
gradient clipping and the AdamW update under ``torch.compile(fullgraph=True)``."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .errors import ConfigError

# the ``compile`` setting: no compilation, torch.compile's default, or CUDA graphs on a GPU
COMPILE_MODES = ("none", "default", "reduce-overhead")


def check_compile_mode(mode) -> str:
    """The ``compile`` setting, or a one-line ConfigError naming the option."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile must be {'|'.join(COMPILE_MODES)}, got {mode!r}")
    return mode


def adam_update(*args, **kwargs) -> None:
    """``torch.optim.adam.adam``: the functional Adam/AdamW update of ``Adam.step``."""
    from torch.optim.adam import adam

    adam(*args, **kwargs)


def init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the Adam/AdamW state of every parameter now (what ``step`` does lazily on first
    use: step counter, first and second moments, zeros), so that a compiled step finds it and
    ``optimizer.state_dict()`` has the usual layout. Existing state (a resume) is kept; a
    capturable optimizer's step counters go to the parameters' device."""
    from torch.optim.optimizer import _get_scalar_dtype

    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=_get_scalar_dtype(), device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif group["capturable"] and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)


# Inductor settings on top of the mode's: loop reordering after fusion off. In torch 2.11 it
# asserts on the AdamW update's foreach nodes (``ForeachKernelSchedulerNode`` in
# ``reorder_loops_by_dep_pair``; seen on an H200, VPT-deep and A-VPT steps alike).
INDUCTOR_OVERRIDES = {"loop_ordering_after_fusion": False}


def inductor_options(mode: Optional[str]) -> dict:
    """``torch.compile(options=...)`` for ``mode`` (None/"default", "reduce-overhead",
    "max-autotune", ...): the mode's own inductor options plus ``INDUCTOR_OVERRIDES`` (mode and
    options cannot both be given to ``torch.compile``)."""
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode or "default"))
    options.update(INDUCTOR_OVERRIDES)
    return options


class WholeStep:
    """One whole training step as one function: forward and loss under autocast
    (``TrainStep``), backward (``torch.autograd.grad``), gradient clipping by the global norm
    (``clip_grad_norm_``'s arithmetic) and the AdamW update, compiled with
    ``torch.compile(fullgraph=True)``: one graph, no graph break. ``step(batch)`` returns the
    detached loss terms. ``mode``: ``"default"`` or ``"reduce-overhead"`` (inductor's CUDA graphs:
    the whole step replays as one graph on a GPU); ``mode=None`` with another ``backend`` (e.g.
    ``"aot_eager"``, what the CPU tests use) compiles with that backend.

    The optimizer must be ``torch.optim.AdamW(..., capturable=True)`` (or Adam), with a tensor
    learning rate on the parameters' device so that the scheduler's per-step rate is an input of
    the graph, not a constant (``make_optimizer``). Two things of eager PyTorch cannot be in one
    graph with the backward, so the step does them itself with the same arithmetic: dynamo runs
    an optimizer's lazy ``_init_group`` in Python on the real ``.grad`` tensors, and
    ``Optimizer.step`` forces graph breaks around the update; hence the state is created up front
    (``init_adam_state``) and the update calls ``torch.optim.adam.adam`` (the functional AdamW of
    ``optimizer.step``, same hyper-parameters from the param groups) on the gradients from
    ``torch.autograd.grad``. ``.grad`` is never set. Parameters without a gradient are skipped,
    as ``optimizer.step`` skips them. Not with a GradScaler (fp16) or DistributedDataParallel.
    """

    def __init__(self, step_module: nn.Module, optimizer: torch.optim.Optimizer, device,
                 amp_dtype=None, grad_clip: float = 0.0, mode: Optional[str] = "default",
                 backend="inductor"):
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"WholeStep needs torch.optim.AdamW/Adam, got {type(optimizer).__name__}")
        if not all(g["capturable"] for g in optimizer.param_groups):
            raise ValueError("WholeStep needs AdamW(..., capturable=True)")
        if mode is not None:
            check_compile_mode(mode)
        self.step_module, self.optimizer = step_module, optimizer
        self.device, self.amp_dtype = torch.device(device), amp_dtype
        self.grad_clip = float(grad_clip or 0.0)
        self.mode = mode
        init_adam_state(optimizer)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.lists = self._state_lists()
        kwargs = {"fullgraph": True, "backend": backend}
        if backend == "inductor":
            kwargs["options"] = inductor_options(mode)
        elif mode is not None and mode != "default":
            kwargs["mode"] = mode
        self.compiled = torch.compile(self._step, **kwargs)

    def _state_lists(self):
        """Per param group: (group dict, params, exp_avg, exp_avg_sq, max_exp_avg_sq, step)
        as plain lists, read once outside the graph (the optimizer's state dict, keyed by
        tensors, stays out of the trace)."""
        out, opt = [], self.optimizer
        for group in opt.param_groups:
            st = [opt.state[p] for p in group["params"]]
            out.append((group, list(group["params"]), [s["exp_avg"] for s in st],
                        [s["exp_avg_sq"] for s in st],
                        [s["max_exp_avg_sq"] for s in st] if group["amsgrad"] else [],
                        [s["step"] for s in st]))
        return out

    def _step(self, batch):
        with torch.autocast(self.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            terms = self.step_module(batch)
        grads = list(torch.autograd.grad(terms["loss"], self.params, allow_unused=True))
        with torch.no_grad():
            if self.grad_clip:  # clip_grad_norm_: total 2-norm, coefficient clamped at 1
                present = [g for g in grads if g is not None]
                total = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g) for g in present]))
                coef = torch.clamp(self.grad_clip / (total + 1e-6), max=1.0)
                grads = [None if g is None else g * coef for g in grads]
            i = 0
            for group, ps, m1, m2, mmax, steps in self.lists:
                gs, i = grads[i:i + len(ps)], i + len(ps)
                keep = [j for j, g in enumerate(gs) if g is not None]  # step() skips grad None
                if not keep:
                    continue
                adam_update(
                    [ps[j] for j in keep], [gs[j] for j in keep], [m1[j] for j in keep],
                    [m2[j] for j in keep], [mmax[j] for j in keep] if mmax else [],
                    [steps[j] for j in keep], foreach=group["foreach"], capturable=True,
                    differentiable=False, fused=None, grad_scale=None, found_inf=None,
                    has_complex=False,
                    decoupled_weight_decay=group.get("decoupled_weight_decay", False),
                    amsgrad=group["amsgrad"], beta1=group["betas"][0], beta2=group["betas"][1],
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"])
        return {k: v.detach() for k, v in terms.items()}

    def __call__(self, batch) -> Dict[str, torch.Tensor]:
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        # lets dynamo trace the backward (torch.autograd.grad) into the same graph
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return self.compiled(batch)
