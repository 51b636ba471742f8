"""Training and evaluation of any method (A-VPT and the baselines) on any data set.

``run(config) -> metrics dict``: builds the method on the frozen backbone, the data (phantom or a
real-format loader, a patient-level fold or a cross-modal split; ``avpt.run_data``), trains
(``avpt.engine``: the recipe's optimizer, AdamW or SGD, and its warm-up and schedule per step,
``avpt.recipes``; gradient clipping, optional mixed precision, or the compiled ``WholeStep``), writes a checkpoint atomically after every epoch and resumes from
it exactly (same data order, augmentation, optimizer/scheduler/loss-state and RNG), logs to CSV
and TensorBoard, evaluates (AUC, F1, Dice, IoU, HD95), saves the trainable weights
(``avpt.checkpoint``, with what rebuilds the frozen backbone: weights sha256 or random-init
seed) and writes ``OUT/metrics.json``. A method with an epoch averager
(``Method.make_epoch_averager``, e.g. CILMP's Gaussian prompt averaging) has it updated after
every epoch and kept in the checkpoint; its average is what is evaluated, saved and reported
(log.csv's per-epoch test metrics are of each epoch's own weights). Before training, at every
start (fresh or resumed, every rank), the method's ``prepare`` hook reads the un-augmented
training set (BiomedAP: its visual prototypes). The data's classes
(``avpt.validate.data_classes``; BUSI with ``data.normal=class``: normal, benign, malignant) set
the method's ``num_classes`` and, for text-prompt methods, ``class_names``. The run's op backend
(``backend``) holds for the whole run (``avpt.runtime.op_backend``). One run per OUT (a lock file); the resume fingerprint
covers every setting that changes results, ``epochs`` included (a changed total is refused).

Multi-process: launched by ``torchrun`` (WORLD_SIZE > 1) it joins a process group
(``avpt.runtime.Dist``), wraps the training step in DistributedDataParallel, gives each rank every
world_size-th batch, and rank 0 evaluates and writes. Resume is exact for a fixed world size.

Where the parts live: ``avpt.config`` (DEFAULTS, YAML, --set; the one validation),
``avpt.recipes`` (training recipes), ``avpt.run_data`` (the data of a run), ``avpt.runtime`` (seeds,
devices, process group), ``avpt.engine`` (``train_one_epoch``, ``evaluate``, ``score``),
``avpt.compiled_step`` (``WholeStep``), ``avpt.run_io`` (checkpoints, log.csv, JSON).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .checkpoint import load_trainable_state
from .compiled_step import WholeStep, check_compile_mode
from .engine import (Optimization, TrainStep, evaluate, grouped_record, lr_lambda, make_loader,
                     make_optimizer, score, train_one_epoch, undefined_metrics)
from .errors import ConfigError
from .frozen_weights import restore_frozen_weights, store_frozen_weights
from .run_data import build_data, class_settings, classes_record, unaugmented
from .run_io import (_comparable, atomic_save, backbone_record, check_resume, read_checkpoint,
                     rng_state, set_rng_state, signals_deferred, write_csv, write_json)
from .runtime import Dist, amp_dtype, op_backend, resolve_device, seed_everything

log = logging.getLogger("avpt.train")


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
def build_model(cfg: Dict):
    from .methods import build_method

    """The method of a loaded (validated: ``avpt.config.load_config``) config on its backbone:
    ``model.*``, the data's classes (``class_settings``) and ``backbone``/``pretrained``."""
    overrides = dict(cfg["model"], model_name=cfg["backbone"])
    overrides.update(class_settings(cfg, overrides))
    if cfg["pretrained"] is not None:
        overrides["pretrained"] = cfg["pretrained"]
    try:
        return build_method(cfg["method"], **overrides)
    except RuntimeError as exc:
        if cfg["pretrained"] is None or "state_dict" not in str(exc):
            raise
        from .backbone import state_dict_mismatch

        raise ConfigError(f"--pretrained {cfg['pretrained']!r} does not fit backbone "
                          f"{cfg['backbone']!r}: {state_dict_mismatch(str(exc))}; give the "
                          f"open_clip weights file of that backbone, or the --backbone the file "
                          f"was made for") from None


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def run(cfg: Dict, kind: str = "train", overwrite: bool = False) -> Dict:
    """Train and evaluate per ``cfg`` (see DEFAULTS); returns the metrics dict (also written to
    OUT/metrics.json by rank 0). Process-wide torch settings (threads, deterministic mode) are
    restored afterwards, so a run inside a larger program leaves it as it was.

    ``cfg`` is a loaded config (``avpt.config.load_config``, which validates it). Before anything
    is built or loaded: its paths are checked (``avpt.validate.check_paths``), and an existing OUT/checkpoint.pt must be of this run (same settings,
    ``epochs`` included, same backbone weights), else a one-line ``ConfigError`` and nothing is
    written. Rank 0 holds ``OUT/.avpt.lock`` for the whole run: a second run on OUT fails.

    ``kind`` ("train", "transfer"): what OUT is recorded as (``avpt.owner``); a folder of
    another kind, or of another run (unless ``resume`` is false: this run starts over), or one
    avpt did not make is refused unless ``overwrite``."""
    from .owner import check_owner, claim, identity
    from .validate import check_paths, run_lock

    check_paths(cfg)
    backbone = backbone_record(cfg)
    ckpt_path = os.path.join(cfg["out"], "checkpoint.pt")
    resuming = cfg["resume"] and os.path.isfile(ckpt_path)
    if resuming:  # before the lock: nothing written on refusal
        check_resume(read_checkpoint(ckpt_path, "cpu"), cfg, ckpt_path, backbone)
    ident = identity(_comparable(cfg))
    # the checkpoint, when there is one to resume, says whether OUT is this run (check_resume);
    # without one, the owner record does; resume=false starts the run over by request
    if int(os.environ.get("RANK", 0)) == 0:  # rank 0 claims OUT (other ranks write nothing)
        check_owner(cfg["out"], kind, ident if cfg["resume"] and not resuming else None,
                    overwrite)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with op_backend(cfg):
            if int(os.environ.get("RANK", 0)) == 0:  # one run per --out (rank 0 holds it for all)
                with run_lock(cfg["out"], "train"):
                    claim(cfg["out"], kind, ident, f"{cfg['method']} on {cfg['dataset']}, "
                                                   f"{cfg['epochs']} epochs, seed {cfg['seed']}")
                    return _run(cfg, backbone)
            return _run(cfg, backbone)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _open_checkpoint(cfg: Dict, path: str, device, backbone: Dict, dist: Dist) -> Optional[Dict]:
    """The checkpoint to resume from (checked), or None for a fresh run, whose folder then loses
    the rows and logs of an earlier run (rank 0)."""
    if cfg["resume"] and os.path.isfile(path):  # checked before anything is built or loaded
        ckpt = read_checkpoint(path, device)
        check_resume(ckpt, cfg, path, backbone)
        return ckpt
    if dist.main:
        out = cfg["out"]
        stale = [name for name in ("log.csv", "metrics.json", "tensorboard")
                 if os.path.exists(os.path.join(out, name))]
        if stale:
            log.warning("new run in %s (%s): replacing the earlier run's %s", out,
                        "resume=false" if os.path.isfile(path) else "no checkpoint.pt",
                        ", ".join(stale))
        for name in stale:
            stale_path = os.path.join(out, name)
            if os.path.isdir(stale_path):
                shutil.rmtree(stale_path)
            else:
                os.remove(stale_path)
    return None


def _build_method(cfg: Dict, device, dist: Dist):
    """The method on its frozen backbone, drawn from the run's seed."""
    from .local_backbone import has_folder_weights

    seed_everything(cfg["seed"], cfg["deterministic"])  # the backbone is drawn from this seed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        model = build_model(cfg).to(device)
    if cfg["pretrained"] is None and not has_folder_weights(cfg["backbone"]) and dist.main:
        log.warning("backbone %s has random weights (no --pretrained): the numbers only show that "
                    "the pipeline runs", cfg["backbone"])
    return model


def _step_module(model, loss_fn: nn.Module, dtype, dist: Dist, device) -> nn.Module:
    """Forward + loss as one module (``TrainStep``), in DistributedDataParallel when launched by
    torchrun (unused parameters allowed: a loss term may be off)."""
    step_module: nn.Module = TrainStep(model, loss_fn, dtype)
    if dist.active:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True, broadcast_buffers=False)
    return step_module


def _train_loader(cfg: Dict, train_set, dist: Dist):
    """(DataLoader, sampler) of this rank's training batches; no batch at all is a DataError."""
    batch_sizes = {"default": cfg["batch_size"], "MRI": cfg["batch_size_mri"]}
    loader, sampler = make_loader(train_set, batch_sizes, True, cfg["seed"], dist.rank, dist.world)
    if len(sampler) == 0:
        from .data import DataError
        raise DataError(f"no training batch: {len(train_set)} training samples for "
                        f"{dist.world} processes")
    return loader, sampler


def _optimization(cfg: Dict, model, steps_per_epoch: int, compile_mode: str, device,
                  dtype) -> Optimization:
    """The recipe's optimizer (AdamW or SGD) over the trainable parameters, its warm-up and
    schedule per step (``avpt.engine.lr_lambda``), the fp16 GradScaler."""
    epochs = int(cfg["epochs"])
    warmup_epochs = min(int(cfg["warmup_epochs"]), max(0, epochs - 1))  # keep some cosine decay
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg["lr"], cfg["weight_decay"], compile_mode, device,
                               cfg["optimizer"], cfg["momentum"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup_epochs * steps_per_epoch, epochs * steps_per_epoch,
                             cfg["warmup"], cfg["warmup_lr"] / cfg["lr"], cfg["lr_schedule"]))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Optimization(optimizer, scheduler, scaler, trainable, cfg["grad_clip"])


def _resume(ckpt: Dict, model, loss_fn: nn.Module, opt: Optimization, path: str, averager=None):
    """Load every state of the checkpoint (the epoch averager's too); returns (history, epochs
    done)."""
    load_trainable_state(model, ckpt["trainable"], path)
    if averager is not None:
        if "averager" not in ckpt:
            raise ConfigError(f"{path} has no epoch-averaging state (written before the trainer "
                              f"kept it); start afresh with resume=false")
        averager.load_state_dict(ckpt["averager"])
    # loss state written before the loss was the method's own module sat under "inner."
    loss_fn.load_state_dict({k[len("inner."):] if k.startswith("inner.") else k: v
                             for k, v in ckpt["loss_state"].items()})
    opt.optimizer.load_state_dict(ckpt["optimizer"])
    opt.scheduler.load_state_dict(ckpt["scheduler"])
    opt.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return list(ckpt["history"]), int(ckpt["epoch"])


def _tensorboard(cfg: Dict, dist: Dist):
    if not (cfg["tensorboard"] and dist.main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard logs (CSV only)")
        return None
    return SummaryWriter(os.path.join(cfg["out"], "tensorboard"))


def _compile_mode(cfg: Dict, dtype, dist: Dist) -> str:
    """The ``compile`` setting, refused with fp16 (GradScaler) or several processes (DDP)."""
    mode = check_compile_mode(cfg["compile"])
    if mode != "none" and (dtype == torch.float16 or dist.active):
        raise ValueError(f"compile={mode} needs amp off or bf16 (no fp16 GradScaler) and one "
                         f"process (no DistributedDataParallel); use compile=none")
    return mode


def _epoch_row(cfg: Dict, epoch: int, sums: Dict[str, float], seen: int, elapsed: float,
               opt: Optimization, dist: Dist, model, test_set, device, dtype) -> Dict:
    """The epoch's log row: learning rate, throughput, mean loss terms (over all processes) and,
    on rank 0 every ``eval_every`` epochs and after the last, the test metrics."""
    epochs = int(cfg["epochs"])
    row = {"epoch": epoch + 1, "lr": float(opt.scheduler.get_last_lr()[0]),
           "images_per_s": dist.mean(seen / max(elapsed, 1e-9)) * dist.world, "time_s": elapsed}
    row.update({f"train_{k}": dist.mean(v / max(seen, 1)) for k, v in sums.items()})
    if dist.main and cfg["eval_every"] and ((epoch + 1) % int(cfg["eval_every"]) == 0
                                            or epoch + 1 == epochs):
        metrics = score(evaluate(model, test_set, cfg, device, dtype), cfg.get("metrics"))
        row.update({f"test_{k}": v for k, v in metrics.items()
                    if k in ("auc", "f1", "dice", "iou", "hd95")})
    return row


def _log_epoch(history: List[Dict], epochs: int, out: str, writer) -> None:
    """After the epoch's checkpoint: log.csv rewritten from the history the checkpoint holds
    (never ahead of it, whatever kills the run), the last row to TensorBoard and the log."""
    row = history[-1]
    epoch = row["epoch"]
    write_csv(os.path.join(out, "log.csv"), history)
    if writer is not None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, float) and math.isfinite(v):
                writer.add_scalar(k.replace("_", "/", 1), v, epoch)
        writer.flush()
    log.info("epoch %d/%d %s", epoch, epochs,
             " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))


def _run(cfg: Dict, backbone: Dict) -> Dict:
    t_start = time.time()
    out = cfg["out"]
    os.makedirs(out, exist_ok=True)
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    device = resolve_device(cfg["device"])
    dist = Dist(device)
    dtype = amp_dtype(cfg["amp"], device)
    compile_mode = _compile_mode(cfg, dtype, dist)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    ckpt = _open_checkpoint(cfg, ckpt_path, device, backbone, dist)
    dist.barrier()
    model = _build_method(cfg, device, dist)
    train_set, test_set, info = build_data(cfg, int(model.visual.image_size[0]), out, dist.main)
    # every start, every rank, before a resume restores the RNG: state from the training data
    model.prepare(unaugmented(train_set), device, dtype, int(cfg["eval_batch_size"]))
    # bf16 autocast on CUDA: the frozen tower's weights in bf16 (bit-identical, no re-casts)
    store_frozen_weights(model, dtype, device)
    loss_fn = model.make_loss(rcl_positives=cfg["rcl_positives"]).to(device)
    step_module = _step_module(model, loss_fn, dtype, dist, device)
    loader, sampler = _train_loader(cfg, train_set, dist)
    steps_per_epoch = len(sampler)
    epochs = int(cfg["epochs"])
    opt = _optimization(cfg, model, steps_per_epoch, compile_mode, device, dtype)
    history: List[Dict] = []
    start_epoch = 0
    averager = model.make_epoch_averager(epochs)
    if ckpt is not None:
        history, start_epoch = _resume(ckpt, model, loss_fn, opt, ckpt_path, averager)
        ckpt = None
        if dist.main:
            if history:  # a kill between checkpoint and log: log.csv is the checkpoint's again
                write_csv(os.path.join(out, "log.csv"), history)
            log.info("resumed from %s after epoch %d", ckpt_path, start_epoch)
    if compile_mode != "none":  # after a resume: the step reads the loaded optimizer state
        opt.whole_step = WholeStep(step_module, opt.optimizer, device, dtype, cfg["grad_clip"],
                                   compile_mode, cfg["compile_backend"])
    writer = _tensorboard(cfg, dist)

    for epoch in range(start_epoch, epochs):
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch)
        model.train()
        sums, seen, elapsed = train_one_epoch(
            step_module, opt, loader, steps_per_epoch, device, dtype,
            desc=f"epoch {epoch + 1}/{epochs}", progress=cfg["progress"] and dist.main)
        if averager is not None:
            averager.update(model, epoch + 1)
        row = _epoch_row(cfg, epoch, sums, seen, elapsed, opt, dist, model, test_set, device, dtype)
        history.append(row)
        if dist.main:
            state = {"epoch": epoch + 1, "config": cfg, "backbone": backbone,
                     "trainable": {k: v.cpu() for k, v in model.trainable_state_dict().items()},
                     "loss_state": loss_fn.state_dict(), "optimizer": opt.optimizer.state_dict(),
                     "scheduler": opt.scheduler.state_dict(), "scaler": opt.scaler.state_dict(),
                     "rng": rng_state(), "history": history}
            if averager is not None:
                state["averager"] = averager.state_dict()
            with signals_deferred():  # Ctrl-C / SIGTERM: after both, so that they agree
                atomic_save(state, ckpt_path)  # first the checkpoint, then the log it holds
                _log_epoch(history, epochs, out, writer)
        dist.barrier()
        if cfg["stop_after_epoch"] is not None and epoch + 1 >= int(cfg["stop_after_epoch"]) \
                and epoch + 1 < epochs:
            if writer is not None:
                writer.close()
            dist.close()
            return {"stopped_after_epoch": epoch + 1}

    if writer is not None:
        writer.close()
    if averager is not None:  # the averaged weights are the run's result
        averager.load_into(model)
    result: Dict[str, Any] = {}
    if dist.main:
        result = _finish(cfg, model, train_set, test_set, info, history, backbone, device, dtype,
                         dist, t_start)
    dist.barrier()
    dist.close()
    return result


def _finish(cfg: Dict, model, train_set, test_set, info: Dict, history: List[Dict],
            backbone: Dict, device, dtype, dist: Dist, t_start: float) -> Dict:
    """Rank 0 after the last epoch: test metrics, OUT/model, report, OUT/metrics.json."""
    from .checkpoint import save_trainable
    from .params import parameter_report

    out = cfg["out"]
    pred = evaluate(model, test_set, cfg, device, dtype)
    test_metrics = score(pred, cfg.get("metrics"))
    save_trainable(model, os.path.join(out, "model"), backbone=backbone, run_config=cfg)
    rep = parameter_report(model)
    result = {
        "test": test_metrics,
        "undefined": undefined_metrics(pred, test_metrics),
        **grouped_record(pred, cfg.get("metrics")),
        "classes": classes_record(cfg),
        "config": cfg,
        "backbone": backbone,
        "data": dict(info, train_samples=len(train_set), test_samples=len(test_set)),
        "params": {"trainable": rep.trainable, "visual": rep.visual,
                   "percent_of_visual": rep.percent_of_visual},
        "method_label": model.row_label(),
        "history": history,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "world_size": dist.world,
        "amp": str(dtype).replace("torch.", "") if dtype else "off",
        "time_s": time.time() - t_start,
    }
    if cfg["report"]:
        from .report import write_run_report
        restore_frozen_weights(model)  # the report's forwards run without autocast
        result["figures"], result["report"] = write_run_report(model, train_set, test_set, pred,
                                                               result, out, device)
    write_json(os.path.join(out, "metrics.json"), result)
    return result
