"""Frozen backbone weights stored in bf16 for bf16-autocast runs.

Under autocast, ``F.linear``/``F.conv2d`` cast an fp32 weight to bf16 on every call; autocast's
cast cache keeps only casts of weights that require grad, so the frozen tower's weights are
re-cast every forward (on an H200, ViT-B/16: ~100 cast kernels, 4.5 ms of host time a
forward). Storing those weights in bf16 once gives the same bits without the casts: autocast
casts a bf16 tensor to bf16 as a no-op, and its fp32 -> bf16 cast rounds exactly as ``.to``
does. So the stored-bf16 model's outputs and gradients are bit-identical to the fp32-weight
model's under bf16 autocast (``tests/test_frozen_weights.py`` checks it with CPU autocast).

What is stored in bf16: weight and bias of every frozen ``nn.Linear`` and ``nn.Conv*d`` of
the visual tower (``method.visual``) and the in-projection of its ``nn.MultiheadAttention``
(``in_proj_weight``/``in_proj_bias`` are Parameters of the attention module itself, not of a
Linear; ``F.multi_head_attention_forward`` feeds them to ``linear``, which autocast casts like
any other; the out-projection is an ``nn.Linear``). What stays fp32: LayerNorms, class and
positional embeddings, ``visual.proj`` (also read outside autocast-cast ops, e.g. A-VPT's
region embeddings), every trainable parameter (fp32 master weights for AdamW), the text
tower, and the subtree of any module with ``reads_frozen_weights = True`` (a wrapper that does
arithmetic on the frozen weights itself, e.g. LoRA's ``W + B A`` in fp32, which a bf16 ``W``
would change).

When: only under bf16 autocast on a CUDA device (``store_frozen_weights(method, dtype,
device)``; ``force=True`` for other devices, which the tests use on the CPU). Never for fp32 or
fp16 runs. Called where a run prepares its model (``avpt.train``, ``avpt eval``, the
benchmarks), for every method and the backbone row alike.

The fp32 values are kept on the host (``method._frozen_fp32``), so the checkpoint's frozen
fingerprint (``avpt.checkpoint.frozen_fingerprint``) is taken from the same fp32 bytes as
without the cast, and ``restore_frozen_weights`` puts them back exactly (before code that runs
the model outside autocast, e.g. the run report).
"""
from __future__ import annotations

import logging
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

log = logging.getLogger("avpt.train")

STORED_DTYPE = torch.bfloat16
# attribute of a method holding {parameter name in the method: fp32 CPU copy} once cast
MASTERS_ATTR = "_frozen_fp32"
# the in-projection Parameters of nn.MultiheadAttention (its out_proj is an nn.Linear)
_MHA_NAMES = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
              "v_proj_weight")


def _castable_names(module: nn.Module) -> Tuple[str, ...]:
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return ("weight", "bias")
    if isinstance(module, nn.MultiheadAttention):
        return _MHA_NAMES
    return ()


def _walk(module: nn.Module, prefix: str) -> Iterator[Tuple[str, nn.Module]]:
    """(qualified name, module) below ``module``, skipping the subtrees of modules that read
    their frozen weights themselves (``reads_frozen_weights``)."""
    if getattr(module, "reads_frozen_weights", False):
        return
    yield prefix, module
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def castable_parameters(method: nn.Module) -> Dict[str, Tuple[nn.Module, str]]:
    """{name in ``method``: (owning module, attribute)} of the frozen fp32 weights that
    ``store_frozen_weights`` stores in bf16 (see the module docstring for which)."""
    prefix = next(n for n, m in method.named_modules() if m is method.visual)
    out: Dict[str, Tuple[nn.Module, str]] = {}
    for name, module in _walk(method.visual, prefix):
        for attr in _castable_names(module):
            p = module._parameters.get(attr)
            if p is not None and not p.requires_grad and p.dtype == torch.float32:
                out[f"{name}.{attr}"] = (module, attr)
    return out


def store_frozen_weights(method: nn.Module, amp_dtype: Optional[torch.dtype], device,
                         force: bool = False) -> int:
    """Store the frozen visual tower's projection weights in bf16 (in place) when the run uses
    bf16 autocast on a CUDA device (any device with ``force``); returns how many tensors were
    cast (0: nothing to do). The fp32 values go to ``method._frozen_fp32`` on the host."""
    if amp_dtype != STORED_DTYPE or (torch.device(device).type != "cuda" and not force):
        return 0
    masters: Dict[str, torch.Tensor] = getattr(method, MASTERS_ATTR, None) or {}
    params = castable_parameters(method)
    for name, (module, attr) in params.items():
        p = module._parameters[attr]
        masters[name] = p.detach().to("cpu", copy=True)
        p.data = p.data.to(STORED_DTYPE)  # as Module.to(dtype) does: the same Parameter object
    object.__setattr__(method, MASTERS_ATTR, masters)
    if params:
        log.info("frozen backbone: %d weight tensors stored in bf16 (bit-identical under bf16 "
                 "autocast, which would re-cast them every forward)", len(params))
    return len(params)


def restore_frozen_weights(method: nn.Module) -> int:
    """Put back the fp32 frozen weights ``store_frozen_weights`` kept (exactly, on each
    weight's device); returns how many. For code that runs the model outside autocast."""
    masters: Dict[str, torch.Tensor] = getattr(method, MASTERS_ATTR, None) or {}
    modules = dict(method.named_modules())
    for name, value in masters.items():
        owner, attr = name.rsplit(".", 1)
        p = modules[owner]._parameters[attr]
        p.data = value.to(p.device, copy=True)
    object.__setattr__(method, MASTERS_ATTR, {})
    return len(masters)


def fp32_frozen_values(method: nn.Module) -> Dict[str, torch.Tensor]:
    """{parameter name: fp32 host copy} of the weights stored in bf16 (empty when none)."""
    return dict(getattr(method, MASTERS_ATTR, None) or {})
