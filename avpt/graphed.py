"""Graphed inference: a model's forward captured as a CUDA graph once per input shape and
replayed, so that a batch costs one graph launch of host time instead of hundreds of kernel
launches (on an H200 the eager ViT-B/16 forward spent 8.5 ms of wall time on 5.4 ms of GPU
work).

``GraphedInference(forward, device, amp_dtype, batch_size)`` wraps ``forward(*inputs) ->
tuple of outputs``; inputs and outputs are tensors with the batch on dim 0 (or None). Per
input signature (every input's shape after the batch dim, dtype and device) it keeps a graph
per captured batch size ("capacity"): a batch of n rows replays the smallest captured capacity
>= n (a new one is captured at max(n, ``batch_size``) when there is none), its rows copied into
the graph's static input buffers and the rows n.. padded with copies of its last row (a valid
input; rows are independent in inference, so padding never changes the real rows); the outputs'
rows n.. are dropped and the rest copied out of the graph's static outputs (which the next
replay overwrites).

Capture (``cuda_graph_capture``, the recipe of the PyTorch CUDA-graphs notes): a few warm-up
calls on a side stream first (Triton kernels compile, cuBLAS picks its algorithms, lazy state
is made; the last one refuses host syncs), then one call under ``torch.cuda.graph``. The forward runs under ``torch.no_grad()``
and ``torch.autocast(..., cache_enabled=False)``: autocast's cast cache would hand the graph
casts made outside it (of trainable fp32 weights), freed when the autocast region ends.

Where graphs cannot run the wrapper runs the forward eagerly (same no-grad + autocast
context), after one log line per reason and process (logger ``avpt.graphs``): at INFO for a
device other than CUDA or the environment variable ``AVPT_CUDA_GRAPHS=0``, at WARNING for a
capture that failed (e.g. a host sync in the forward).
``capture`` is the seam the CPU tests use: any ``capture(run, warmup) -> (replay, outputs)``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

log = logging.getLogger("avpt.graphs")

ENV_SWITCH = "AVPT_CUDA_GRAPHS"  # "0": every GraphedInference runs eagerly
WARMUP = 3
_logged = set()

Outputs = Tuple[Optional[Tensor], ...]
Capture = Callable[[Callable[[], Outputs], int], Tuple[Callable[[], None], Outputs]]


def _log_once(reason: str, level: int = logging.INFO) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.log(level, "%s", reason)


def cuda_graph_capture(run: Callable[[], Outputs], warmup: int = WARMUP
                       ) -> Tuple[Callable[[], None], Outputs]:
    """Warm ``run`` up on a side stream, capture one call as a CUDA graph: (replay, the
    graph's static outputs). The last warm-up call runs with CUDA's sync debug mode at
    "error": a host sync in the forward (``.item()``, a data-dependent shape, a blocking
    copy), which would invalidate the capture, raises there, outside any capture, so the
    caller's eager fallback starts from a clean state."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(max(1, warmup)):
            if i < warmup - 1:
                run()
                continue
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    return graph.replay, outputs


def graphs_available(device) -> Optional[str]:
    """None when CUDA graphs can run on ``device``, else why not (one line)."""
    device = torch.device(device)
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"CUDA graphs off ({ENV_SWITCH}=0): inference runs eager"
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (here: {device.type}): inference runs eager"
    return None


@dataclass
class _Graph:
    inputs: Tuple[Optional[Tensor], ...]    # static input buffers [capacity, ...]
    outputs: Outputs                        # static outputs [capacity, ...]
    replay: Callable[[], None]
    capacity: int


class GraphedInference:
    """``forward`` (inputs -> tuple of outputs, batch on dim 0) replayed from CUDA graphs, one
    per input signature and batch capacity (see the module docstring). ``batch_size``: the
    smallest capacity to capture (the loader's batch size, so that a short first batch does
    not cost a graph of its own); ``capture``: the capture function (default CUDA graphs where
    they can run, else eager)."""

    def __init__(self, forward: Callable[..., Sequence[Optional[Tensor]]], device,
                 amp_dtype: Optional[torch.dtype] = None, batch_size: int = 0,
                 capture: Optional[Capture] = None, warmup: int = WARMUP):
        self.forward, self.device = forward, torch.device(device)
        self.amp_dtype, self.batch_size, self.warmup = amp_dtype, int(batch_size or 0), warmup
        if capture is None:
            why_not = graphs_available(self.device)
            if why_not is not None:
                _log_once(why_not)
            capture = None if why_not else cuda_graph_capture
        self.capture = capture
        self.graphs: Dict[tuple, Dict[int, _Graph]] = {}

    @property
    def enabled(self) -> bool:
        return self.capture is not None

    def _run(self, inputs) -> Outputs:
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                             enabled=self.amp_dtype is not None,
                                             cache_enabled=False):
            return tuple(self.forward(*inputs))

    def __call__(self, *inputs: Optional[Tensor]) -> Outputs:
        n = _batch_rows(inputs)
        if self.capture is None:
            return self._run(inputs)
        key = tuple(None if x is None else (tuple(x.shape[1:]), x.dtype, x.device) for x in inputs)
        by_capacity = self.graphs.setdefault(key, {})
        fits = [c for c in by_capacity if c >= n]
        graph = by_capacity[min(fits)] if fits else self._capture(key, inputs, n)
        if graph is None:  # the capture failed: eager from now on
            return self._run(inputs)
        for buf, x in zip(graph.inputs, inputs):
            if buf is not None:
                _fill(buf, x, n)
        graph.replay()
        return tuple(None if o is None else o[:n].clone() for o in graph.outputs)

    def _capture(self, key, inputs, n) -> Optional[_Graph]:
        capacity = max(n, self.batch_size)
        static = tuple(None if x is None else x.new_empty((capacity, *x.shape[1:]))
                       for x in inputs)
        for buf, x in zip(static, inputs):
            if buf is not None:
                _fill(buf, x, n)
        try:
            replay, outputs = self.capture(lambda: self._run(static), self.warmup)
        except Exception as exc:  # noqa: BLE001 - any failure: run eager, say why once
            _log_once(f"CUDA graph capture failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:160] if str(exc) else ''}): inference runs eager",
                      logging.WARNING)  # unexpected on a GPU: said whatever the log level
            self.capture = None
            return None
        for i, o in enumerate(outputs):
            if o is not None and (o.dim() == 0 or o.shape[0] != capacity):
                raise ValueError(f"GraphedInference: output {i} has shape {tuple(o.shape)}; every "
                                 f"output must have the batch ({capacity} rows) on dim 0")
        graph = _Graph(static, tuple(outputs), replay, capacity)
        self.graphs[key][capacity] = graph
        return graph


def _batch_rows(inputs) -> int:
    """The batch size shared by the tensor inputs (one-line errors for anything else)."""
    sizes = set()
    for i, x in enumerate(inputs):
        if x is None:
            continue
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise TypeError(f"GraphedInference: input {i} must be a tensor with the batch on dim "
                            f"0 or None, got {type(x).__name__ if not isinstance(x, Tensor) else 'a 0-d tensor'}")
        sizes.add(x.shape[0])
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"GraphedInference: the inputs must share one non-zero batch size on dim "
                         f"0, got {sorted(sizes)}")
    return sizes.pop()


def _fill(buf: Tensor, x: Tensor, n: int) -> None:
    """Rows 0..n-1 of ``buf`` from ``x``, the rest copies of ``x``'s last row."""
    buf[:n].copy_(x)
    if n < buf.shape[0]:
        buf[n:].copy_(x[n - 1:n].expand(buf.shape[0] - n, *x.shape[1:]))
