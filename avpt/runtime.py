"""The process a run executes in: seeds and determinism, the device, the autocast dtype, and the
process group of a ``torchrun`` launch (gloo on CPU, nccl on GPU; a no-op for one process)."""
from __future__ import annotations

import contextlib
import os
import random
from typing import ContextManager, Dict, Optional

import numpy as np
import torch

def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def op_backend(cfg: Dict) -> ContextManager:
    """The run's op backend (``cfg["backend"]``: auto, torch or triton; None keeps the
    process-wide one, ``AVPT_BACKEND``) for a ``with`` block, restored afterwards. The one place
    a run's backend is applied: every op and module of the methods reads it."""
    from avpt_kernels.backend import use_backend

    return use_backend(cfg["backend"]) if cfg.get("backend") else contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


# the ``amp`` setting: bf16 on CUDA (fp16 where bf16 is missing) and off on CPU, or as named
AMP_MODES = ("auto", "off", "bf16", "fp16")


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of an ``amp`` setting (``AMP_MODES``) on ``device`` (None: fp32)."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class Dist:
    """The process group of a torchrun launch (a no-op for a single process)."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.active = self.world > 1
        self.device = device  # nccl reduces CUDA tensors only
        if self.active and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
