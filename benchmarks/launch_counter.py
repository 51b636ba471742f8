"""The launch counter of ``benchmarks/launches.py`` (whose docstring says what is counted and
how): ``LaunchCounter`` (a TorchDispatchMode over fake CUDA tensors), ``_triton_counted``
(Triton launches counted, nothing compiled), ``fake_copy`` and ``autocast_for``."""
from __future__ import annotations

import bisect
import contextlib
import copy
import math
import os
import types
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Tuple
from unittest import mock

import torch
from torch import nn
from torch._subclasses.fake_tensor import (DataDependentOutputException,
                                           DynamicOutputShapeException, FakeTensorMode)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

SECTIONS = ("blocks", "pim", "pooling", "anatomy", "bank", "heads", "other", "loss", "optimizer")

_NO_KERNEL = {
    aten._unsafe_view.default, aten.empty.memory_format, aten.empty_strided.default,
    aten.empty_like.default, aten.new_empty.default, aten.new_empty_strided.default,
    aten.lift_fresh.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
    aten.sym_storage_offset.default, aten.resize_.default, aten.set_.source_Storage_storage_offset,
}
_SCALAR = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}
_COPIES = {aten._to_copy.default, aten.copy_.default}
# multi_tensor_apply limits (ATen/native/cuda/MultiTensorApply.cuh)
_MTA_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_MTA_BLOCKS, _MTA_CHUNK = 320, 65536
_H100 = types.SimpleNamespace(name="NVIDIA H100 (emulated for counting)", major=9, minor=0,
                              multi_processor_count=132, total_memory=80 * 2**30)


class HostSync(RuntimeError):
    """A data-dependent op (output shape depends on values) was hit: a host sync on a GPU."""


def foreach_launches(func, args) -> int:
    """Kernel launches of one ``_foreach_*`` op on CUDA: multi_tensor_apply packs chunks of
    65536 elements of up to N tensors (N by the number of tensor lists) into launches of at
    most 320 blocks."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if not lists:
        return 1
    depth = min(len(lists), 5)
    launches = tensors = blocks = 0
    for t in lists[0]:
        if t.numel() == 0:
            continue
        chunks = math.ceil(t.numel() / _MTA_CHUNK)
        tensors += 1
        for c in range(chunks):
            blocks += 1
            last = c == chunks - 1
            if blocks == _MTA_BLOCKS or (last and tensors == _MTA_TENSORS[depth]):
                launches += 1
                blocks = 0
                tensors = 0 if last else 1
    return launches + (1 if blocks else 0)


def _section_of_module(module: nn.Module) -> Optional[str]:
    import avpt_kernels as ak
    from avpt.methods.avpt.anatomy import AnatomyMLP

    name = type(module).__name__
    if isinstance(module, ak.PromptTokenInteraction):
        return "pim"
    if isinstance(module, ak.RegionPool):
        return "pooling"
    if isinstance(module, ak.LowRankPromptBank):
        return "bank"
    if isinstance(module, AnatomyMLP):
        return "anatomy"
    if name in ("ClassificationHead", "SegDecoder"):
        return "heads"
    if name == "ResidualAttentionBlock":
        return "blocks"
    return None


class LaunchCounter(TorchDispatchMode):
    """Counts aten launches, Triton launches, host syncs (and grad-carrying casts) by section.

    Use as a dispatch mode inside a FakeTensorMode; ``attach(model)`` installs forward hooks
    that set the section; ``section(name)`` sets it by hand (loss, optimizer). In ``phase
    "backward"`` the section is the one in which the running autograd node was created."""

    def __init__(self, device_type: str = "cuda"):
        super().__init__()
        self.device_type = device_type
        self.aten: Counter = Counter()
        self.triton: Counter = Counter()
        self.syncs: Counter = Counter()
        self.grad_casts: Counter = Counter()
        self.ops: Counter = Counter()          # (section, op name) -> launches
        self.sync_ops: List[Tuple[str, str]] = []
        self.phase = "forward"
        self._stack: List[str] = ["other"]
        self._timeline: List[Tuple[int, str]] = [(0, "other")]
        self._forward_end: Optional[int] = None
        self._hooks: List[Any] = []

    # -- sections ------------------------------------------------------------------------------
    def _mark(self) -> None:
        self._timeline.append((torch._C._autograd._get_sequence_nr(), self._stack[-1]))

    def push(self, name: str) -> None:
        self._stack.append(name)
        self._mark()

    def pop(self) -> None:
        self._stack.pop()
        self._mark()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    def attach(self, model: nn.Module) -> "LaunchCounter":
        for module in model.modules():
            name = _section_of_module(module)
            if name is None:
                continue
            self._hooks.append(module.register_forward_pre_hook(
                lambda m, a, _n=name: self.push(_n)))
            self._hooks.append(module.register_forward_hook(lambda m, a, o: self.pop()))
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def start_backward(self) -> None:
        self.phase = "backward"
        self._forward_end = torch._C._autograd._get_sequence_nr()

    def current(self) -> str:
        if self.phase != "backward":
            return self._stack[-1]
        node = torch._C._current_autograd_node()
        if node is None:
            return "other"
        seq = node._sequence_nr()
        if self._forward_end is not None and seq >= self._forward_end:
            return "other"  # AccumulateGrad and nodes made after the forward
        starts = [s for s, _ in self._timeline]
        i = bisect.bisect_right(starts, seq) - 1
        return self._timeline[max(i, 0)][1]

    # -- counting ------------------------------------------------------------------------------
    def count_triton(self, kernel_name: str) -> None:
        sec = self.current()
        self.triton[sec] += 1
        self.ops[(sec, f"triton:{kernel_name}")] += 1

    def _sync(self, what: str) -> None:
        sec = self.current()
        self.syncs[sec] += 1
        self.sync_ops.append((sec, what))

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("avpt::"):
            return self._run_custom_op(name, args, kwargs)
        flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        in_devices = {t.device.type for t in flat}
        if func in _SCALAR:
            x = args[0]
            if x.device.type != "cpu":
                self._sync(f"{func} ({x.device.type})")
            if x.dtype == torch.bool:
                return True
            return 1.0 if x.is_floating_point() else 0
        try:
            out = func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException) as exc:
            self._sync(f"{func} (data-dependent)")
            raise HostSync(f"{func} in section {self.current()!r}: a data-dependent op, a host "
                           f"sync on a GPU") from exc
        out_devices = {t.device.type for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
        if func in _COPIES:
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0] if func is aten.copy_.default else out
            if src.device.type == "cpu" and dst.device.type not in ("cpu", "meta"):
                self._sync(f"{func} host-to-device")
            if func is aten._to_copy.default and src.requires_grad and src.is_floating_point() \
                    and out.dtype != src.dtype:
                self.grad_casts[self.current()] += 1
        if func.is_view or func in _NO_KERNEL or name.startswith("prim::"):
            return out
        if (in_devices | out_devices) <= {"cpu", "meta"} and self.device_type != "cpu":
            return out  # host work (e.g. AdamW's CPU step counters)
        n = foreach_launches(func, args) if name.startswith("aten::_foreach_") else 1
        sec = self.current()
        self.aten[sec] += n
        self.ops[(sec, str(func))] += n
        return out

    def _run_custom_op(self, name: str, args, kwargs):
        """Run the custom op's real implementation (its launcher) on the fake tensors: its torch
        ops come back through this mode, its Triton launches through ``count_triton``."""
        from torch._library.custom_ops import OPDEFS

        impl = OPDEFS[name]._init_fn
        with self:
            return impl(*args, **kwargs)

    def totals(self) -> Dict[str, int]:
        return {"aten": sum(self.aten.values()), "triton": sum(self.triton.values()),
                "syncs": sum(self.syncs.values())}

    def by_section(self) -> Dict[str, Dict[str, int]]:
        out = {}
        for sec in SECTIONS:
            row = {"aten": self.aten[sec], "triton": self.triton[sec], "syncs": self.syncs[sec]}
            if any(row.values()):
                out[sec] = row
        return out


# ----------------------------------------------------------------------------------------------
# Triton launches and device queries while counting
# ----------------------------------------------------------------------------------------------
_ACTIVE: List[LaunchCounter] = []


@contextlib.contextmanager
def _triton_counted(counter: LaunchCounter) -> Iterator[None]:
    """Replace the Triton launch entry points by a counter; answer CUDA device queries as an
    H100 would when no GPU is present."""
    import triton.runtime.jit as jit

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass

    def run(self, *args, **kwargs):
        fn = getattr(self, "fn", None)
        counter.count_triton(getattr(fn, "__name__", type(self).__name__))

    saved = [(cls, cls.__dict__.get("run")) for cls in classes]
    saved_cuda = (torch.cuda.get_device_properties, torch.cuda.get_device_capability)
    try:
        for cls in classes:
            cls.run = run
        if not torch.cuda.is_available():
            torch.cuda.get_device_properties = lambda *a, **k: _H100
            torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
        yield
    finally:
        for cls, fn in saved:
            if fn is None:
                del cls.run
            else:
                cls.run = fn
        torch.cuda.get_device_properties, torch.cuda.get_device_capability = saved_cuda


@contextlib.contextmanager
def tensor_ctor_copies_dispatched():
    """torch.tensor/as_tensor(data, device="cuda") build the tensor on the CPU and move it with a
    dispatched copy that the counter sees. FakeTensorMode sets this only where no GPU is present
    (``avoid_device_init``): on a GPU machine the ctor's host-to-device copy is made on the real
    device below the dispatcher and only ``lift_fresh`` reaches the modes (no sync, no launch)."""
    prev = torch._C._only_lift_cpu_tensors()
    torch._C._set_only_lift_cpu_tensors(True)
    try:
        yield
    finally:
        torch._C._set_only_lift_cpu_tensors(prev)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    with mock.patch.dict(os.environ, values):
        yield


def autocast_for(device_type: str, dtype: Optional[torch.dtype]):
    """``torch.autocast(device_type, dtype)``, also for CUDA on a machine without one (the
    constructor refuses 'cuda' there; entering sets the same thread-local state)."""
    if dtype is None:
        return contextlib.nullcontext()
    if device_type == "cuda" and not torch.cuda.is_available():
        ctx = torch.autocast("cuda", dtype=dtype, enabled=False)
        ctx._enabled = True
        return ctx
    return torch.autocast(device_type, dtype=dtype)


def fake_copy(objects, mode: FakeTensorMode, device: str):
    """A deep copy of ``objects`` (modules, ...) whose parameters and buffers are fake tensors
    on ``device`` (no storage); the originals are untouched."""
    memo: Dict[int, Any] = {}
    roots = objects if isinstance(objects, (tuple, list)) else (objects,)
    for root in roots:
        for module in root.modules():
            for k, p in module._parameters.items():
                if p is not None and id(p) not in memo:
                    fake = mode.from_tensor(p.detach())
                    with mode:
                        fake = fake.to(device)
                    memo[id(p)] = nn.Parameter(fake, requires_grad=p.requires_grad)
            for k, b in module._buffers.items():
                if b is not None and id(b) not in memo:
                    fake = mode.from_tensor(b)
                    with mode:
                        memo[id(b)] = fake.to(device)
    return copy.deepcopy(objects, memo)
