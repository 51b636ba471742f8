"""What every op shares: the references' compute dtype, the layers' stages and their index.

The references (``ops/<op>/reference.py``, literal PyTorch of the A-VPT equations: the ground
truth every backend is tested against) compute in fp32 (fp64 stays fp64) whatever the input
dtype and cast the outputs back to the input dtype, so that the low-precision backends are
compared with the exact answer rather than with another rounding of it. Autocast is switched
off inside (``no_autocast``): an enclosing ``torch.autocast`` region does not turn the fp32 math
into bf16/fp16 math, and the outputs have the documented dtypes whatever the caller's autocast
state. (Autograd replays the backward outside this guard: take the backward outside the
autocast region, as PyTorch recommends.) No argument checking happens in a reference: the
public entry points (``avpt_kernels.region_pool`` / ``prompt_bank`` / ``pim`` /
``low_rank_project``) validate before dispatching.

Notation: B batch, T = N+1 tokens (class token at index 0), N patch tokens, D hidden size,
K prompt tokens, R regions, H heads, dh head width, A = H*dh, L layers, S stages, r rank.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: fp64 stays fp64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def contiguous_stages(num_layers: int, num_stages: int) -> list:
    """Stage of each layer when ``num_layers`` are split into ``num_stages`` contiguous groups."""
    return [layer * num_stages // num_layers for layer in range(num_layers)]


_STAGE_INDEX: Dict[Tuple[Tuple[int, ...], torch.device, torch.dtype], Tensor] = {}


def stage_index(layer_stage: Sequence[int], device: torch.device,
                dtype: torch.dtype = torch.long) -> Tensor:
    """``layer_stage`` as a tensor on ``device``, cached per (stages, device, dtype): building it
    from the Python list on every call (``torch.as_tensor(list, device="cuda")``) would be a
    blocking host-to-device copy, a host sync, per forward. Made outside inference mode (the
    index is saved for the backward). Under a FakeTensorMode (launch counting, export) the cache
    lives on that mode; while torch.compile traces, no cache (the graph holds the constant)."""
    key = (tuple(int(s) for s in layer_stage), torch.device(device), dtype)
    if torch.compiler.is_compiling():
        return torch.tensor(key[0], dtype=dtype, device=device)
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode()
    cache = _STAGE_INDEX if fake_mode is None else fake_mode.__dict__.setdefault(
        "_avpt_stage_index", {})
    cached = cache.get(key)
    if cached is None:
        with torch.inference_mode(False):
            cached = cache[key] = torch.tensor(key[0], dtype=dtype, device=device)
    return cached
