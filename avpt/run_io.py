"""What a run reads and writes: the training checkpoint (atomic save, tensors-only load, the
resume check), RNG states, the backbone record, ``log.csv`` and JSON files.

Every file is written whole or not at all (``avpt_kernels._files.write_atomic``: a temporary
file beside it, fsynced, renamed; removed on any failure, a kill by SIGINT/SIGTERM included); a
full disk or a missing permission is one ``OutputError`` line naming the file. ``log.csv`` is
rewritten from the checkpoint's history after each checkpoint, so it is never ahead of it."""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import signal
import threading
from typing import Dict, Iterator

import numpy as np
import torch

from avpt_kernels._files import write_atomic

from .errors import ConfigError


class _WriteErrors:
    """A file object that remembers the first ``OSError`` of its ``write``: torch's zip writer
    turns a failed write (a full disk, a file size limit) into a RuntimeError about positions;
    this gives back the OSError, which names the cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self):
        return self.f.flush()


def _torch_save(obj, path: str) -> None:
    with open(path, "wb") as f:
        sink = _WriteErrors(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def atomic_save(obj, path: str) -> None:
    """``torch.save`` through a temporary file, fsync, rename: the file at ``path`` is always a
    whole checkpoint (also when the process is killed or interrupted while saving); no
    temporary file is left behind; a full disk is an ``OutputError`` naming ``path``."""
    write_atomic(path, lambda tmp: _torch_save(obj, tmp))


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block take effect when it ends (their handler
    then runs as usual): the checkpoint and the log row of an epoch are written together or not
    at all. Main thread only (elsewhere signals cannot be handled; the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    caught = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in caught}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)      # e.g. KeyboardInterrupt, the CLI's Terminated
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text(path: str, text: str) -> None:
    """``text`` to ``path``, whole or not at all (``write_atomic``)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(text)
    write_atomic(path, write)


# Settings that do not change a run's results: a resume may change them. Everything else,
# ``epochs`` included (it sets the cosine schedule), must match the checkpoint.
RUN_CONTROL = ("resume", "stop_after_epoch", "progress", "tensorboard", "report", "out",
               "eval_every", "threads", "device", "metrics", "backend")
# Settings of older checkpoints that predate a key: the behaviour they were trained with.
_OLD_DEFAULTS = {"compile": "none", "compile_backend": "inductor", "rcl_positives": "within_modality",
                 "recipe": "avpt-paper", "optimizer": "adamw", "momentum": 0.0,
                 "lr_schedule": "cosine", "warmup": "linear", "warmup_lr": 0.0,
                 "pipeline": "avpt-paper", "shots": None, "shots_seed": None}


def _comparable(cfg: Dict) -> Dict:
    """The config fields that must match for a resume (not the run-control ones)."""
    return {k: v for k, v in cfg.items() if k not in RUN_CONTROL}


def rng_state():
    """RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(cached)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state) -> None:
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
    from .local_backbone import is_local_dir, weights_file

    rec = {"model_name": cfg["backbone"], "pretrained": None, "sha256": None, "init_seed": None}
    folder_weights = weights_file(cfg["backbone"]) if is_local_dir(cfg["backbone"]) else None
    if folder_weights is not None:  # local-dir: the weights are the folder's
        rec.update(pretrained=str(folder_weights.resolve()),
                   sha256=file_sha256(str(folder_weights)))
    elif cfg["pretrained"] is not None:
        rec.update(pretrained=os.path.abspath(cfg["pretrained"]),
                   sha256=file_sha256(cfg["pretrained"]))
    else:
        rec["init_seed"] = int(cfg["seed"])
    return rec


def write_csv(path: str, rows) -> None:
    """``rows`` (dicts; the columns in order of first appearance) as one CSV file, atomically:
    ``log.csv`` is rewritten from the checkpoint's history, so that it agrees with it."""
    import io

    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def append_csv(path: str, row: Dict) -> None:
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


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


def write_json(path: str, obj) -> None:
    """``obj`` (made JSON-able: NaN/inf -> null) as indented JSON, atomically."""
    write_text(path, json.dumps(jsonable(obj), indent=2))
