"""Training and evaluation of any method (A-VPT and the baselines) on any data set.

``run(config) -> metrics dict``: builds the method on the frozen backbone, the data (phantom or a
real-format loader, a patient-level fold or a cross-modal split), trains with AdamW + cosine
schedule with linear warm-up (per step), gradient clipping, optional mixed precision (bf16, or fp16
with a GradScaler), writes a checkpoint atomically after every epoch and resumes from it exactly
(same data order, augmentation, optimizer/scheduler/loss-queue state and RNG), logs to CSV and
TensorBoard, evaluates (AUC, F1, Dice, IoU, HD95), saves the trainable weights
(``avpt.checkpoint``, with what rebuilds the frozen backbone: weights sha256 or random-init
seed) and writes ``OUT/metrics.json``. One run per OUT (a lock file); the resume fingerprint
covers every setting that changes results, ``epochs`` included (a changed total is refused).

Multi-process: launched by ``torchrun`` (WORLD_SIZE > 1) it joins a process group (gloo on CPU,
nccl on GPU), wraps the training step in DistributedDataParallel, gives each rank every
world_size-th batch, and rank 0 evaluates and writes. Resume is exact for a fixed world size.

Configs are plain dicts (``DEFAULTS`` below); YAML files under ``configs/`` and ``--set key=value``
override them (``model.*`` keys go to the method's config dataclass, ``data.*`` to the loader).
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import random
import time
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from . import metrics as M

log = logging.getLogger("avpt.train")

# The progress bar shows the loss every LOG_EVERY steps (one host sync each time); the epoch's
# mean loss terms are accumulated on the device and read once per epoch.
LOG_EVERY = 25

BACKBONE_ALIASES = {"tiny": "avpt-tiny", "vit-b-16": "ViT-B-16", "vit-b/16": "ViT-B-16"}

DEFAULTS: Dict[str, Any] = {
    "dataset": "phantom",        # phantom | busi | inbreast | duke
    "data_root": None,
    "modality": None,            # phantom: list of MG/US/MRI (None: all three)
    "test_dataset": None,        # cross-modal transfer: another data set / modality to test on
    "test_data_root": None,
    "test_modality": None,
    "method": "avpt",
    "backbone": "ViT-B-16",      # or "tiny" (avpt-tiny) or any open_clip config name
    "pretrained": None,          # local open_clip checkpoint; None: random weights (warned)
    "epochs": 50,
    "batch_size": 32,            # 2-D modalities
    "batch_size_mri": 8,
    "eval_batch_size": 64,
    "lr": 1e-4,
    "weight_decay": 1e-4,
    "warmup_epochs": 5,
    "grad_clip": 1.0,
    "amp": "auto",               # auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16
    "compile": "none",           # none | default | reduce-overhead (CUDA graphs): WholeStep
    "compile_backend": "inductor",  # torch.compile backend of compile != none (aot_eager: tests)
    "seed": 0,
    "deterministic": True,
    "device": "auto",
    "threads": 0,                # torch CPU threads (0: torch's default)
    "folds": 5,                  # patient-level stratified k-fold
    "fold": 0,                   # which fold is the test set (None: no split, test on train)
    "folds_file": None,          # default OUT/folds.json
    "skip_bad": False,
    "clahe": True,
    "rotation": 10.0,
    "flip": True,
    "eval_every": 1,
    "progress": True,
    "tensorboard": True,
    "report": True,              # figures + report.html at the end
    "resume": True,              # resume from OUT/checkpoint.pt when it exists
    "rcl_positives": "cross_modal",  # Eq. 12 positives: cross_modal (queues of other modalities
                                 # too) | within_modality (in-batch only; the ablation)
    "stop_after_epoch": None,    # testing aid: exit after this epoch's checkpoint (simulated kill)
    "out": "runs/avpt",
    "model": {},                 # method config overrides (e.g. schedule, num_prompts, rank, lambda_*)
    "data": {},                  # loader options (phantom: num_patients, views; busi: normal; ...)
}


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def parse_value(text: str):
    """A --set value: YAML scalars/lists, plus numbers such as 1e-3 that YAML 1.1 reads as text."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except Exception:
        return text
    return _number(value)


def _number(value):
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value
    return value


def set_key(cfg: Dict, dotted: str, value) -> None:
    from .validate import ConfigError

    keys = dotted.split(".")
    if keys[0] not in DEFAULTS:
        raise ConfigError(f"unknown config key {keys[0]!r}; known: {', '.join(sorted(DEFAULTS))} "
                          f"(method settings go under model., loader settings under data.)")
    if len(keys) > 1 and keys[0] not in ("model", "data"):
        raise ConfigError(f"config key {dotted!r}: {keys[0]} is not a section (sections: model., data.)")
    if len(keys) > 2 or any(not k for k in keys):
        raise ConfigError(f"config key {dotted!r}: expected KEY, model.KEY or data.KEY")
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {dotted!r}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: Optional[str] = None, variant: Optional[str] = None,
                overrides: Optional[Dict] = None, sets: Optional[List[str]] = None,
                validate: bool = True) -> Dict:
    """DEFAULTS < YAML file (its ``variants:`` entry ``variant`` on top) < overrides < --set,
    then ``avpt.validate.validate_config`` (one-line ``ConfigError`` for any bad setting)."""
    from .validate import ConfigError, validate_config

    cfg = copy.deepcopy(DEFAULTS)
    if path:
        data = read_yaml(path)
        variants = data.pop("variants", {}) or {}
        data.pop("description", None)
        if not isinstance(variants, dict):
            raise ConfigError(f"{path}: 'variants' must be a mapping of name -> settings")
        if variant is not None:
            if variant not in variants:
                raise ConfigError(f"{path}: no variant {variant!r}; has {sorted(variants)}")
            data = _merge(data, variants[variant])
        elif variants:
            log.info("%s has variants %s; using the base settings", path, sorted(variants))
        for k, v in _flatten(data).items():
            try:
                set_key(cfg, k, _number(v) if isinstance(v, str) and k.startswith("model.") else v)
            except ValueError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    for k, v in (overrides or {}).items():
        if v is not None:
            set_key(cfg, k, v)
    for k in ("lr", "weight_decay", "grad_clip", "rotation"):  # YAML 1.1 reads 1e-4 as text
        cfg[k] = _number(cfg[k])
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        set_key(cfg, k.strip(), parse_value(v))
    if isinstance(cfg["backbone"], str):
        cfg["backbone"] = BACKBONE_ALIASES.get(cfg["backbone"].lower(), cfg["backbone"])
    if isinstance(cfg["modality"], str):
        cfg["modality"] = [cfg["modality"]]
    if isinstance(cfg["test_modality"], str):
        cfg["test_modality"] = [cfg["test_modality"]]
    if cfg["amp"] is False:  # YAML reads a bare off as false
        cfg["amp"] = "off"
    if cfg["compile"] is False:  # YAML reads a bare off as false
        cfg["compile"] = "none"
    if validate:
        validate_config(cfg)
    return cfg


def read_yaml(path: str) -> Dict:
    """A YAML config file as a dict; a missing file, a syntax error (with its line) or a file
    that is not a mapping is a one-line ``ConfigError``."""
    import yaml

    from .validate import ConfigError

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path!r}: no such file (see configs/)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path!r} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--config {path!r}: YAML syntax error at{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must be a mapping of settings (key: value), got "
                          f"a {type(data).__name__}")
    return data


COMPILE_MODES = ("none", "default", "reduce-overhead")


def check_compile_mode(mode) -> str:
    """The ``compile`` setting, or a one-line ValueError naming the option."""
    if mode not in COMPILE_MODES:
        from .validate import ConfigError

        raise ConfigError(f"compile must be none|default|reduce-overhead, got {mode!r}")
    return mode


def _merge(a: Dict, b: Dict) -> Dict:
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flatten(d: Dict, prefix: str = "") -> Dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k in ("model", "data") and not prefix:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------------------------
# Environment: seeds, determinism, devices, distributed
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
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


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def build_data(cfg: Dict, image_size: int, out: str, main: bool = True):
    """(train dataset, test dataset, info) per the config: a fold of the patient-level k-fold
    split, or a cross-modal/cross-dataset transfer (train on one, test on another)."""
    from .data import BreastDataset, Subset, load_records
    from .data.folds import load_or_make_folds, split_indices
    from .data.transforms import modality_stats

    recs = load_records(cfg["dataset"], cfg["data_root"], cfg["modality"], cfg["seed"], image_size,
                        cfg["data"])
    common = dict(seed=cfg["seed"], clahe=cfg["clahe"], rotation=cfg["rotation"], flip=cfg["flip"],
                  skip_bad=cfg["skip_bad"])
    transfer = cfg["test_dataset"] is not None or cfg["test_modality"] is not None
    info: Dict[str, Any] = {}
    if transfer:
        train = BreastDataset(recs, image_size, train=True, **common)
        test_recs = load_records(cfg["test_dataset"] or cfg["dataset"],
                                 cfg["test_data_root"] or cfg["data_root"], cfg["test_modality"],
                                 cfg["seed"], image_size, cfg["data"])
        test = BreastDataset(test_recs, image_size, train=False, stats=train.stats, **common)
        info.update(split="transfer", skipped=len(train.skipped) + len(test.skipped),
                    train_modalities=sorted(set(train.modalities)),
                    test_modalities=sorted(set(test.modalities)))
        return train, test, info
    full = BreastDataset(recs, image_size, train=False, **common)
    if cfg["fold"] is None:
        return Subset(full, range(len(full)), True), Subset(full, range(len(full)), False), \
            dict(split="none (test = train)", skipped=len(full.skipped))
    folds_file = cfg["folds_file"] or os.path.join(out, "folds.json")
    if main:
        folds = load_or_make_folds(folds_file, full.records, cfg["folds"], cfg["seed"])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if not main:
        folds = load_or_make_folds(folds_file, full.records, cfg["folds"], cfg["seed"])
    if not 0 <= int(cfg["fold"]) < len(folds):
        raise ValueError(f"fold must be in [0, {len(folds)}), got {cfg['fold']}")
    idx = split_indices(full.records, folds[int(cfg["fold"])])
    # normalisation statistics from the training images only
    by_mod: Dict[str, list] = {}
    for i in idx["train"]:
        by_mod.setdefault(full.records[i].modality, []).append(full.images[i])
    full.stats.update(modality_stats(by_mod))
    info.update(split=f"fold {cfg['fold']} of {len(folds)}", folds_file=folds_file,
                skipped=len(full.skipped))
    return Subset(full, idx["train"], True), Subset(full, idx["test"], False), info


def _loader(dataset, batch_sizes, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
    from torch.utils.data import DataLoader

    from .data import ModalityBatchSampler

    sampler = ModalityBatchSampler(dataset.modalities, batch_sizes, shuffle=shuffle, seed=seed,
                                   rank=rank, world_size=world)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=0), sampler


# ----------------------------------------------------------------------------------------------
# Model and loss
# ----------------------------------------------------------------------------------------------
def build_model(cfg: Dict):
    from .methods import build_method, get_config_class

    overrides = dict(cfg["model"])
    overrides.setdefault("model_name", cfg["backbone"])
    if cfg["pretrained"] is not None:
        overrides["pretrained"] = cfg["pretrained"]
    fields = get_config_class(cfg["method"]).__dataclass_fields__
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"method {cfg['method']!r} has no setting {sorted(unknown)}; its settings: "
                         f"{sorted(fields)}")
    try:
        return build_method(cfg["method"], **overrides)
    except RuntimeError as exc:
        if cfg["pretrained"] is None or "state_dict" not in str(exc):
            raise
        from .validate import ConfigError

        first = str(exc).strip().splitlines()[0][:200]
        raise ConfigError(f"--pretrained {cfg['pretrained']!r} does not fit backbone "
                          f"{cfg['backbone']!r}: {first}") from None


class LossFn(nn.Module):
    """Eq. 17 for A-VPT (``avpt.losses.AVPTLoss``), CLS + SEG for the baselines."""

    def __init__(self, model, rcl_positives: str = "cross_modal"):
        super().__init__()
        from .losses import AVPTLoss

        self.avpt = getattr(model, "name", "") == "avpt"
        self.inner = AVPTLoss(model, rcl_positives=rcl_positives) if self.avpt else None
        self.model_ref = [model]

    def forward(self, out, labels, masks, modality, update_state: bool):
        from .losses import method_loss

        if self.avpt:
            return self.inner(out, labels=labels, masks=masks, modality=modality,
                              update_state=update_state)
        return method_loss(self.model_ref[0], out, labels=labels, masks=masks)


class TrainStep(nn.Module):
    """Forward + loss in one module, so DistributedDataParallel sees every trainable parameter
    used by the loss (the A-VPT contrastive projector is used there, not in forward)."""

    def __init__(self, model, loss_fn, amp_dtype=None):
        super().__init__()
        self.model, self.loss_fn, self.amp_dtype = model, loss_fn, amp_dtype

    def forward(self, batch):
        maps = batch["maps"] if getattr(self.model, "name", "") == "avpt" and \
            self.model.config.region_source == "given" else None
        images = batch["image"]
        if self.amp_dtype is not None:
            # A-VPT casts the region maps to the images' dtype and region_pool wants them in the
            # dtype of the (autocast) patch features: feed the images in the autocast dtype.
            images = images.to(self.amp_dtype)
        out = self.model(images, maps=maps, modality=batch["modality"])
        return self.loss_fn(out, batch["label"], batch["mask"], batch["modality"], update_state=True)


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
        if mode is not None and mode != "default":
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


def make_optimizer(params, lr: float, weight_decay: float, compile_mode: str = "none",
                   device=None) -> torch.optim.AdamW:
    """AdamW for the trainer: the eager one, or for a compiled step ``capturable=True`` with the
    learning rate as a 0-d tensor on ``device`` (the scheduler fills it in place)."""
    if check_compile_mode(compile_mode) == "none":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=torch.tensor(float(lr), device=device),
                             weight_decay=weight_decay, capturable=True)


def model_inputs(model, batch, device):
    maps = None
    if getattr(model, "name", "") == "avpt" and model.config.region_source == "given":
        maps = batch["maps"].to(device)
    return batch["image"].to(device), maps, batch["modality"].to(device)


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up to the base rate, then cosine annealing to 0 (per optimizer step)."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model, dataset, cfg: Dict, device, dtype=None) -> Dict[str, np.ndarray]:
    """Malignant probabilities [N], predicted masks [N, H, W] bool, truths, modality names."""
    loader, _ = _loader(dataset, cfg["eval_batch_size"], False, cfg["seed"])
    model.eval()
    probs, preds, gts, labels, order = [], [], [], [], []
    for batch in loader:
        images, maps, modality = model_inputs(model, batch, device)
        if dtype is not None:
            images = images.to(dtype)  # see TrainStep
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(images, maps=maps, modality=modality)
        probs.append(torch.softmax(out.logits.float(), -1)[:, 1].cpu())
        if out.seg_logits is not None:
            preds.append((out.seg_logits.float() > 0).squeeze(1).cpu())
        gts.append(batch["mask"].squeeze(1) > 0.5)
        labels.append(batch["label"])
        order.append(batch["index"])
    order_t = torch.cat(order).argsort()
    res = dict(probs=torch.cat(probs)[order_t].numpy(), labels=torch.cat(labels)[order_t].numpy(),
               gts=torch.cat(gts)[order_t].numpy())
    res["preds"] = torch.cat(preds)[order_t].numpy() if preds else None
    res["modalities"] = np.array(dataset.modalities)
    return res


def score(pred: Dict[str, np.ndarray]) -> Dict[str, float]:
    out = M.classification_metrics(pred["labels"], pred["probs"])
    if pred["preds"] is not None:
        out.update(M.segmentation_metrics(pred["preds"], pred["gts"]))
    else:
        out.update(dice=float("nan"), iou=float("nan"), hd95=float("nan"))
    out["n"] = int(len(pred["labels"]))
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def _atomic_save(obj, path: str) -> None:
    """Write to a temporary file, fsync, rename: the file at ``path`` is always a whole
    checkpoint (also when the process is killed or interrupted while saving)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# Settings that do not change a run's results: a resume may change them. Everything else,
# ``epochs`` included (it sets the cosine schedule), must match the checkpoint.
RUN_CONTROL = ("resume", "stop_after_epoch", "progress", "tensorboard", "report", "out",
               "eval_every", "threads", "device")
# Settings of older checkpoints that predate a key: the behaviour they were trained with.
_OLD_DEFAULTS = {"compile": "none", "compile_backend": "inductor", "rcl_positives": "within_modality"}


def _comparable(cfg: Dict) -> Dict:
    """The config fields that must match for a resume (not the run-control ones)."""
    return {k: v for k, v in cfg.items() if k not in RUN_CONTROL}


def _rng_state():
    """RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(cached)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss,
                         cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_KEYS = ("epoch", "config", "trainable", "loss_state", "optimizer", "scheduler", "scaler",
                   "rng", "history")


def _numpy_array_globals() -> list:
    """What a plain numpy array needs under ``weights_only=True`` (checkpoints written before
    issue 13 stored numpy's RNG state as an array): array reconstruction only, no code."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint(path: str, device) -> Dict:
    """OUT/checkpoint.pt, loaded with ``weights_only=True`` (tensors and plain values only); an
    unreadable or foreign file is a one-line ``ConfigError`` that says how to start fresh."""
    from .validate import ConfigError

    fresh = (f"move it away (to keep it) or pass --set resume=false to start this run over, or "
             f"use another --out")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):  # older checkpoints kept
            ckpt = torch.load(path, map_location=device, weights_only=True)  # numpy RNG arrays
    except Exception as exc:  # noqa: BLE001 - truncated, garbage, or pickled code
        import pickle

        first = (str(exc).strip().splitlines() or [""])[0][:120]
        if isinstance(exc, pickle.UnpicklingError):  # torch's text would advise an unsafe load
            first = "not a tensors-only file"
        raise ConfigError(f"{path} is not a readable avpt checkpoint (truncated or corrupt: "
                          f"{type(exc).__name__}: {first}); {fresh}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise ConfigError(f"{path} is not an avpt training checkpoint (missing "
                          f"{[k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]}); {fresh}")
    return ckpt


def check_resume(ckpt: Dict, cfg: Dict, path: str, backbone: Dict) -> None:
    """The checkpoint is of this run: same results-changing settings (``epochs`` included) and
    the same backbone weights; else a one-line ``ConfigError``."""
    from .validate import ConfigError

    saved = {**_OLD_DEFAULTS, **ckpt["config"]}
    hint = "use another --out, or --set resume=false to start this run over (its files are replaced)"
    if saved.get("epochs") != cfg["epochs"]:
        state = "finished" if ckpt["epoch"] >= saved.get("epochs", 0) else f"at epoch {ckpt['epoch']}"
        raise ConfigError(f"{path} is a run of {saved.get('epochs')} epochs ({state}); --epochs "
                          f"{cfg['epochs']} would change its learning-rate schedule and results: "
                          f"give --epochs {saved.get('epochs')} to resume or re-evaluate it, or {hint}")
    if _comparable(saved) != _comparable(cfg):
        diff = sorted(k for k in set(_comparable(cfg)) | set(_comparable(saved))
                      if saved.get(k) != cfg.get(k))
        raise ConfigError(f"{path} was written with another config (differs in {diff}); {hint}")
    old = ckpt.get("backbone") or {}
    if old.get("sha256") and old.get("sha256") != backbone.get("sha256"):
        raise ConfigError(f"{path} was trained on backbone weights with sha256 {old['sha256'][:12]}..., "
                          f"--pretrained now has {str(backbone.get('sha256'))[:12]}...; {hint}")


def backbone_record(cfg: Dict) -> Dict:
    """What rebuilds the frozen backbone exactly: the open_clip config, the weights file and
    its sha256, or (random weights) the seed the backbone was drawn from."""
    from .validate import file_sha256

    rec = {"model_name": cfg["backbone"], "pretrained": None, "sha256": None, "init_seed": None}
    if cfg["pretrained"] is not None:
        rec.update(pretrained=os.path.abspath(cfg["pretrained"]),
                   sha256=file_sha256(cfg["pretrained"]))
    else:
        rec["init_seed"] = int(cfg["seed"])
    return rec


def load_trainable_state(model, state: Dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        raise ValueError(f"checkpoint does not match the model: missing "
                         f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def run(cfg: Dict) -> Dict:
    """Train and evaluate per ``cfg`` (see DEFAULTS); returns the metrics dict (also written to
    OUT/metrics.json by rank 0). Process-wide torch settings (threads, deterministic mode) are
    restored afterwards, so a run inside a larger program leaves it as it was.

    Before anything is built or loaded: the config and its paths are validated
    (``avpt.validate``), and an existing OUT/checkpoint.pt must be of this run (same settings,
    ``epochs`` included, same backbone weights), else a one-line ``ConfigError`` and nothing is
    written. Rank 0 holds ``OUT/.avpt.lock`` for the whole run: a second run on OUT fails."""
    from .validate import check_paths, run_lock, validate_config

    validate_config(cfg)
    check_paths(cfg)
    backbone = backbone_record(cfg)
    ckpt_path = os.path.join(cfg["out"], "checkpoint.pt")
    if cfg["resume"] and os.path.isfile(ckpt_path):  # before the lock: nothing written on refusal
        check_resume(read_checkpoint(ckpt_path, "cpu"), cfg, ckpt_path, backbone)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if int(os.environ.get("RANK", 0)) == 0:  # one run per --out (rank 0 holds it for all)
            with run_lock(cfg["out"], "train"):
                return _run(cfg, backbone)
        return _run(cfg, backbone)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _run(cfg: Dict, backbone: Dict) -> Dict:
    from tqdm import tqdm

    t_start = time.time()
    out = cfg["out"]
    os.makedirs(out, exist_ok=True)
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    device = resolve_device(cfg["device"])
    dist = Dist(device)
    dtype = amp_dtype(cfg["amp"], device)
    compile_mode = check_compile_mode(cfg["compile"])
    if compile_mode != "none" and (dtype == torch.float16 or dist.active):
        raise ValueError(f"compile={compile_mode} needs amp off or bf16 (no fp16 GradScaler) and one "
                         f"process (no DistributedDataParallel); use compile=none")

    ckpt_path = os.path.join(out, "checkpoint.pt")
    ckpt = None
    if cfg["resume"] and os.path.isfile(ckpt_path):  # checked before anything is built or loaded
        ckpt = read_checkpoint(ckpt_path, device)
        check_resume(ckpt, cfg, ckpt_path, backbone)
    elif dist.main:  # a fresh run: no rows or logs of an earlier run in this folder
        stale = [name for name in ("log.csv", "metrics.json", "tensorboard")
                 if os.path.exists(os.path.join(out, name))]
        if stale:
            log.warning("new run in %s (%s): replacing the earlier run's %s", out,
                        "resume=false" if os.path.isfile(ckpt_path) else "no checkpoint.pt",
                        ", ".join(stale))
        for name in stale:
            path = os.path.join(out, name)
            if os.path.isdir(path):
                import shutil
                shutil.rmtree(path)
            else:
                os.remove(path)
    dist.barrier()
    seed_everything(cfg["seed"], cfg["deterministic"])  # the backbone is drawn from this seed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        model = build_model(cfg).to(device)
    if cfg["pretrained"] is None and dist.main:
        log.warning("backbone %s has random weights (no --pretrained): the numbers only show that "
                    "the pipeline runs", cfg["backbone"])
    image_size = int(model.visual.image_size[0])
    train_set, test_set, info = build_data(cfg, image_size, out, dist.main)
    loss_fn = LossFn(model, cfg["rcl_positives"]).to(device)
    step_module: nn.Module = TrainStep(model, loss_fn, dtype)
    if dist.active:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True, broadcast_buffers=False)

    batch_sizes = {"default": cfg["batch_size"], "MRI": cfg["batch_size_mri"]}
    loader, sampler = _loader(train_set, batch_sizes, True, cfg["seed"], dist.rank, dist.world)
    steps_per_epoch = len(sampler)
    if steps_per_epoch == 0:
        from .data import DataError
        raise DataError(f"no training batch: {len(train_set)} training samples for "
                        f"{dist.world} processes")
    epochs = int(cfg["epochs"])
    warmup_epochs = min(int(cfg["warmup_epochs"]), max(0, epochs - 1))  # keep some cosine decay
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg["lr"], cfg["weight_decay"], compile_mode, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup_epochs * steps_per_epoch, epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    history: List[Dict] = []
    start_epoch = 0
    if ckpt is not None:
        load_trainable_state(model, ckpt["trainable"])
        loss_fn.load_state_dict(ckpt["loss_state"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        history, start_epoch = list(ckpt["history"]), int(ckpt["epoch"])
        ckpt = None
        if dist.main:
            log.info("resumed from %s after epoch %d", ckpt_path, start_epoch)

    whole_step = None
    if compile_mode != "none":  # after a resume: the step reads the loaded optimizer state
        whole_step = WholeStep(step_module, optimizer, device, dtype, cfg["grad_clip"],
                               compile_mode, cfg["compile_backend"])

    writer = None
    if cfg["tensorboard"] and dist.main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(out, "tensorboard"))
        except ImportError:
            log.warning("tensorboard is not installed: no TensorBoard logs (CSV only)")
    csv_path = os.path.join(out, "log.csv")

    for epoch in range(start_epoch, epochs):
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch)
        model.train()
        sums: Dict[str, torch.Tensor] = {}  # on the device: no host sync per step
        seen, t0 = 0, time.time()
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not (cfg["progress"] and dist.main), leave=False, dynamic_ncols=True)
        for step_in_epoch, batch in enumerate(bar, 1):
            batch = {k: v.to(device) for k, v in batch.items()}
            if whole_step is not None:  # forward, loss, backward, clipping, AdamW: one graph
                terms = whole_step(batch)
            else:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    terms = step_module(batch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(terms["loss"]).backward()
                if cfg["grad_clip"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, cfg["grad_clip"])
                scaler.step(optimizer)
                scaler.update()
            with warnings.catch_warnings():  # fp16: GradScaler skips steps with inf gradients
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                scheduler.step()
            n = batch["image"].shape[0]
            seen += n
            for k, v in terms.items():
                v = v.detach().float() * n
                sums[k] = sums[k] + v if k in sums else v
            if step_in_epoch % LOG_EVERY == 0 and not bar.disable:  # one sync every LOG_EVERY
                bar.set_postfix(loss=f"{float(terms['loss'].detach()):.4f}",
                                img_s=f"{seen / max(time.time() - t0, 1e-9):.1f}")
        sums_host = {k: float(v) for k, v in sums.items()}  # one sync per term per epoch
        elapsed = time.time() - t0
        row = {"epoch": epoch + 1, "lr": float(scheduler.get_last_lr()[0]),
               "images_per_s": dist.mean(seen / max(elapsed, 1e-9)) * dist.world,
               "time_s": elapsed}
        row.update({f"train_{k}": dist.mean(v / max(seen, 1)) for k, v in sums_host.items()})
        if dist.main and cfg["eval_every"] and ((epoch + 1) % int(cfg["eval_every"]) == 0
                                                or epoch + 1 == epochs):
            row.update({f"test_{k}": v for k, v in score(predict(model, test_set, cfg, device, dtype)).items()
                        if k in ("auc", "f1", "dice", "iou", "hd95")})
        history.append(row)
        if dist.main:
            _append_csv(csv_path, row)
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch" and isinstance(v, float) and math.isfinite(v):
                        writer.add_scalar(k.replace("_", "/", 1), v, epoch + 1)
                writer.flush()
            log.info("epoch %d/%d %s", epoch + 1, epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
            _atomic_save({"epoch": epoch + 1, "config": cfg, "backbone": backbone,
                          "trainable": {k: v.cpu() for k, v in model.trainable_state_dict().items()},
                          "loss_state": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                          "rng": _rng_state(), "history": history}, ckpt_path)
        dist.barrier()
        if cfg["stop_after_epoch"] is not None and epoch + 1 >= int(cfg["stop_after_epoch"]) \
                and epoch + 1 < epochs:
            if writer is not None:
                writer.close()
            dist.close()
            return {"stopped_after_epoch": epoch + 1}

    if writer is not None:
        writer.close()
    result: Dict[str, Any] = {}
    if dist.main:
        from .checkpoint import save_trainable
        from .params import parameter_report

        pred = predict(model, test_set, cfg, device, dtype)
        test_metrics = score(pred)
        save_trainable(model, os.path.join(out, "model"), backbone=backbone, run_config=cfg)
        rep = parameter_report(model)
        result = {
            "test": test_metrics,
            "undefined": undefined_metrics(pred, test_metrics),
            "config": cfg,
            "backbone": backbone,
            "data": dict(info, train_samples=len(train_set), test_samples=len(test_set)),
            "params": {"trainable": rep.trainable, "visual": rep.visual,
                       "percent_of_visual": rep.percent_of_visual},
            "history": history,
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "world_size": dist.world,
            "amp": str(dtype).replace("torch.", "") if dtype else "off",
            "time_s": time.time() - t_start,
        }
        if cfg["report"]:
            from .report import write_run_report
            result["figures"], result["report"] = write_run_report(model, train_set, test_set, pred,
                                                                   result, out, device)
        _write_json(os.path.join(out, "metrics.json"), result)
    dist.barrier()
    dist.close()
    return result


def undefined_metrics(pred: Dict[str, np.ndarray], metrics: Dict) -> Dict[str, str]:
    """Why each undefined (NaN -> null) test metric is undefined; each reason is also warned."""
    reasons: Dict[str, str] = {}
    labels = np.asarray(pred["labels"])
    classes = sorted({int(v) for v in labels})
    if len(classes) < 2:
        names = {0: "benign", 1: "malignant"}
        reasons["auc"] = (f"the test set has one class only ({', '.join(names.get(c, str(c)) for c in classes) or 'no images'}, "
                          f"{len(labels)} images): ROC AUC needs both classes")
    if pred["preds"] is None:
        for k in ("dice", "iou", "hd95"):
            reasons[k] = "the method has no segmentation head"
    elif not np.asarray(pred["gts"]).any():
        for k in ("dice", "iou", "hd95"):
            if not (isinstance(metrics.get(k), float) and math.isfinite(metrics[k])):
                reasons[k] = "no test image has a lesion mask"
    for k, why in reasons.items():
        value = metrics.get(k)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            log.warning("test %s is undefined: %s", k, why)
    return {k: v for k, v in reasons.items()
            if metrics.get(k) is None or (isinstance(metrics.get(k), float) and not math.isfinite(metrics[k]))}


def evaluate_checkpoint(model_dir: str, cfg: Dict) -> Dict:
    """Evaluate a saved model (``OUT/model`` of a run) on the test split given by ``cfg``.

    The frozen backbone is rebuilt exactly as in training (``avpt.checkpoint.load_trainable``:
    the recorded weights file, checked by sha256, or the recorded random-init seed, checked by
    the frozen weights' fingerprint). ``cfg``'s method, backbone and model settings are set to
    the saved model's, so that metrics.json records what was evaluated."""
    from .checkpoint import load_trainable, read_saved
    from .validate import check_paths, run_lock, validate_config

    saved = read_saved(model_dir)
    cfg = dict(cfg, method=saved["method"], backbone=saved["config"]["model_name"])
    validate_config(cfg)
    check_paths(cfg)
    device = resolve_device(cfg["device"])
    if not saved.get("backbone") and saved["config"].get("pretrained") is None \
            and not cfg["pretrained"]:
        log.warning("%s has no backbone record (saved before issue 13): its random backbone is "
                    "drawn from seed %s; the metrics are the training run's only if that was its "
                    "seed", model_dir, cfg["seed"])
    with run_lock(cfg["out"], "eval"):
        seed_everything(cfg["seed"], False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
            kw = {"pretrained": cfg["pretrained"]} if cfg["pretrained"] else {}
            if "backend" in cfg["model"]:  # the op backend that runs the saved model
                kw["backend"] = cfg["model"]["backend"]
            model = load_trainable(model_dir, **kw)
        model.to(device)
        _, test_set, info = build_data(cfg, int(model.visual.image_size[0]), cfg["out"])
        pred = predict(model, test_set, cfg, device, amp_dtype(cfg["amp"], device))
        metrics = score(pred)
        cfg["pretrained"] = model.config.pretrained
        cfg["model"] = {k: v for k, v in model.config.to_dict().items()
                        if k not in ("model_name", "pretrained")}
        result = {"test": metrics, "undefined": undefined_metrics(pred, metrics), "config": cfg,
                  "model": os.path.abspath(model_dir), "method": saved["method"],
                  "backbone": saved.get("backbone"),
                  "data": dict(info, test_samples=len(test_set))}
        _write_json(os.path.join(cfg["out"], "metrics.json"), result)
    return result


def _append_csv(path: str, row: Dict) -> None:
    new = not os.path.isfile(path)
    fields = list(row)
    if not new:
        with open(path) as f:
            header = next(csv.reader(f), [])
        if header != fields:  # a column appeared (e.g. evaluation metrics): rewrite the header
            with open(path) as f:
                old = list(csv.DictReader(f))
            fields = list(dict.fromkeys(header + fields))
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(old)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow(row)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=2)
    os.replace(tmp, path)
