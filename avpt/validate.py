"""Up-front checks of a run's settings: every problem a user can cause is found here, before any
data is loaded or anything trained, and reported as one ``ConfigError`` line naming the setting
and what it accepts (the CLI prints it and exits with code 2).

``validate_config(cfg)``: types and ranges of every setting, unknown keys in ``data.`` and
``model.``, data sets, modalities, folds, device availability. ``check_paths(cfg)``: the output
folder, ``--pretrained`` (readable as safetensors or with ``torch.load(weights_only=True)``),
``--data-root``. ``run_lock(out)``: one run per output folder.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import socket
import time
from typing import Dict, Iterator, Optional

from avpt_kernels.backend import BACKENDS

from .data.modalities import DATASET_MODALITY, DATASETS, MODALITIES
from .errors import ConfigError


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``PROG: error: MESSAGE (see PROG
    --help)``, exit code 2."""

    def error(self, message):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


RCL_POSITIVES = ("cross_modal", "within_modality")

# data.* options per loader: name -> (check, what is accepted)
_POS_INT = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
_NONNEG_INT = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
_PHASE = (lambda v: v in ("pre", "post"), "'pre' or 'post'")
DATA_OPTIONS: Dict[str, Dict[str, tuple]] = {
    "phantom": {"num_patients": _POS_INT, "views": _POS_INT, "phase": _PHASE,
                "lesion_scale": (lambda v: _is_num(v) and 0 < v <= 10, "a number in (0, 10]")},
    "busi": {"normal": (lambda v: v in ("benign", "exclude", "class"),
                        "'benign', 'exclude' or 'class' (three classes: normal, benign, malignant)")},
    "inbreast": {"birads_threshold": (lambda v: str(v).strip().lower().replace(" ", "") in
                                      ("1", "2", "3", "4", "4a", "4b", "4c", "5", "6"),
                                      "a BI-RADS category: 1, 2, 3, 4a, 4b, 4c, 5 or 6"),
                 "window": (lambda v: isinstance(v, bool),
                            "true (the DICOM display window) or false (full range)")},
    "duke": {"phase": _PHASE, "negatives_per_patient": _NONNEG_INT,
             "slices_per_lesion": _POS_INT,
             "annotations": (lambda v: v is None or isinstance(v, str), "a file path"),
             "index_base": (lambda v: v in (0, 1), "0 or 1"),
             "unresolved": (lambda v: v in ("skip", "error"), "'skip' or 'error'"),
             "slice_order": (lambda v: v in ("instance", "position"), "'instance' or 'position'"),
             "negative_gap": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
             "edge_margin": (lambda v: _is_num(v) and 0 <= v < 0.5, "a number in [0, 0.5)")},
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _bad(key: str, value, accepted: str) -> ConfigError:
    return ConfigError(f"{key} must be {accepted}, got {value!r}")


def _int(cfg, key, lo, hi=None, optional=False):
    v = cfg[key]
    if optional and v is None:
        return
    ok = _is_int(v) and v >= lo and (hi is None or v <= hi)
    if not ok:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _bad(key, v, f"an integer {rng}" + (" or null" if optional else ""))


def _num(cfg, key, lo, hi=None, lo_open=False):
    v = cfg[key]
    ok = _is_num(v) and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
    if not ok:
        rng = (f"> {lo}" if lo_open else f">= {lo}") + ("" if hi is None else f" and <= {hi}")
        raise _bad(key, v, f"a finite number {rng}")


def _modalities(key: str, value, dataset: Optional[str]) -> None:
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not value:
        raise _bad(key, value, f"a non-empty list of {'/'.join(MODALITIES)}")
    bad = [m for m in value if m not in MODALITIES]
    if bad:
        raise _bad(key, value, f"a list of {'/'.join(MODALITIES)} (unknown {bad})")
    if len(set(value)) != len(value):
        raise _bad(key, value, "a list without repeats")
    if dataset in DATASET_MODALITY and list(value) != [DATASET_MODALITY[dataset]]:
        raise ConfigError(f"{key}: dataset {dataset!r} has {DATASET_MODALITY[dataset]} images only, "
                          f"got {list(value)}")


def check_device(name) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` that this machine has."""
    import torch

    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise _bad("device", name, "auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise _bad("device", name, "auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA GPU is available on this machine; "
                          f"use --device cpu or auto")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")


def check_backbone(name) -> None:
    import open_clip

    from . import backbone  # noqa: F401  registers avpt-tiny
    from .local_backbone import check_local_dir, is_local_dir

    if is_local_dir(name):  # open_clip's folder layout (BiomedCLIP)
        try:
            check_local_dir(name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return
    if not isinstance(name, str) or name not in open_clip.list_models():
        raise ConfigError(f"backbone must be tiny, ViT-B-16, another open_clip config name "
                          f"(open_clip.list_models()) or local-dir:PATH (an open_clip model "
                          f"folder), got {name!r}")


# method settings that are run settings: the top-level key (or flag) that sets them
_RUN_OWNED = {"model_name": "--backbone (backbone)", "pretrained": "--pretrained (pretrained)",
              "backend": "--set backend=auto|torch|triton (the op backend of the whole run)"}
_MODEL_INT_ZERO_OK = {"queue_size"}            # 0 switches the memory queues off
_MODEL_POSITIVE = {"tau", "tau_txt", "alpha"}   # temperatures, LoRA scale
_MODEL_UNIT = {"ema_momentum", "prompt_dropout"}


def _model_settings(cfg: Dict) -> None:
    from .methods import get_config_class, method_names

    if cfg["method"] not in method_names():
        raise _bad("method", cfg["method"], f"one of {', '.join(method_names())}")
    if not isinstance(cfg["model"], dict):
        raise _bad("model", cfg["model"], "a section of method settings (model.KEY=VALUE)")
    fields = {f.name: f for f in dataclasses.fields(get_config_class(cfg["method"]))}
    unknown = sorted(set(cfg["model"]) - set(fields))
    if unknown:
        raise ConfigError(f"method {cfg['method']!r} has no setting {', '.join('model.' + k for k in unknown)}; "
                          f"its settings: {', '.join(sorted(fields))}")
    for k, v in cfg["model"].items():
        f = fields[k]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        key = f"model.{k}"
        if k in _RUN_OWNED:
            raise ConfigError(f"{key} is a run setting: use {_RUN_OWNED[k]}")
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise _bad(key, v, "true or false")
        elif isinstance(default, int):
            lo = 0 if k in _MODEL_INT_ZERO_OK else (2 if k == "num_classes" else 1)
            if not _is_int(v) or v < lo:
                raise _bad(key, v, f"an integer >= {lo}")
        elif isinstance(default, float):
            if k in _MODEL_POSITIVE:
                if not _is_num(v) or v <= 0:
                    raise _bad(key, v, "a finite number > 0")
            elif k in _MODEL_UNIT:
                if not _is_num(v) or not 0 <= v <= 1:
                    raise _bad(key, v, "a number in [0, 1]")
            elif not _is_num(v) or v < 0:
                raise _bad(key, v, "a finite number >= 0")
        elif k == "preset":
            from .methods.base import preset_names
            if v not in preset_names(get_config_class(cfg["method"])):
                raise _bad(key, v, f"one of {', '.join(preset_names(get_config_class(cfg['method'])))}")
        elif isinstance(default, str):
            if not isinstance(v, str):
                raise _bad(key, v, "a string")
        elif isinstance(default, (tuple, list)):
            if not isinstance(v, (tuple, list)):
                raise _bad(key, v, "a list")


def _data_settings(cfg: Dict) -> None:
    data = cfg["data"]
    if not isinstance(data, dict):
        raise _bad("data", data, "a section of loader settings (data.KEY=VALUE)")
    sets = {cfg["dataset"]} | ({cfg["test_dataset"]} if cfg["test_dataset"] else set())
    known: Dict[str, tuple] = {}
    for ds in sorted(sets):
        known.update(DATA_OPTIONS[ds])
    unknown = sorted(set(data) - set(known))
    if unknown:
        listed = ", ".join(f"data.{k}" for k in sorted(known)) or "none"
        raise ConfigError(f"unknown loader setting {', '.join('data.' + k for k in unknown)} for "
                          f"dataset {'/'.join(sorted(sets))}; its settings: {listed}")
    for k, v in data.items():
        check, accepted = known[k]
        if not check(v):
            raise _bad(f"data.{k}", v, accepted)


def _metric_settings(cfg: Dict) -> None:
    """The ``metrics.`` section (``avpt.metrics.metric_settings``); per-breast scores need
    mammograms of known laterality (INbreast's file names)."""
    from .metrics import metric_settings

    if not isinstance(cfg["metrics"], dict):
        raise _bad("metrics", cfg["metrics"], "a section of evaluation settings (metrics.KEY=VALUE)")
    try:
        settings = metric_settings(cfg["metrics"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    tested = cfg["test_dataset"] or cfg["dataset"]
    if "breast" in settings["groups"] and tested != "inbreast":
        raise ConfigError(f"metrics.groups: breast needs mammograms of known laterality (dataset "
                          f"inbreast), the test set is {tested!r}; use patient")


BINARY_CLASSES = ("benign", "malignant")


def data_classes(dataset: str, data: Dict) -> tuple:
    """The class names of a data set's labels 0..C-1 under its loader settings ``data``: BUSI
    with ``normal: class`` has ("normal", "benign", "malignant"), every other setting the two
    classes ("benign", "malignant")."""
    if dataset == "busi" and data.get("normal") == "class":
        from .data.busi import THREE_CLASSES
        return tuple(THREE_CLASSES)
    return BINARY_CLASSES


def _classes(cfg: Dict) -> None:
    """The method takes the data's classes: model.num_classes / model.class_names, when given,
    must agree with them, a transfer test set must have the same classes, and a method that only
    does two classes (``Method.max_classes``) refuses more."""
    from .methods import get_method_class

    classes = data_classes(cfg["dataset"], cfg["data"])
    if cfg["test_dataset"] is not None:
        test = data_classes(cfg["test_dataset"], cfg["data"])
        if test != classes:
            raise ConfigError(f"test_dataset {cfg['test_dataset']!r} has classes {list(test)}, the "
                              f"training data {list(classes)}: a transfer needs the same classes")
    given = cfg["model"].get("num_classes")
    if given is not None and given != len(classes):
        raise ConfigError(f"model.num_classes must be {len(classes)} (the classes of dataset "
                          f"{cfg['dataset']!r}: {', '.join(classes)}), got {given!r}")
    names = cfg["model"].get("class_names")
    if names is not None and len(names) != len(classes):
        raise ConfigError(f"model.class_names must have {len(classes)} names (the classes of "
                          f"dataset {cfg['dataset']!r}: {', '.join(classes)}), got {list(names)}")
    limit = get_method_class(cfg["method"]).max_classes
    if limit is not None and len(classes) > limit:
        raise ConfigError(f"method {cfg['method']!r} takes at most {limit} classes; dataset "
                          f"{cfg['dataset']!r} with these data settings has {len(classes)} "
                          f"({', '.join(classes)})")


def _recipe_settings(cfg: Dict) -> None:
    """The recipe keys (``avpt.recipes``): optimizer, schedule, warm-up, pipeline, few-shot."""
    from .recipes import LR_SCHEDULES, OPTIMIZERS, PIPELINES, RECIPE_NAMES, WARMUPS

    for key, names in (("recipe", RECIPE_NAMES), ("optimizer", OPTIMIZERS),
                       ("lr_schedule", LR_SCHEDULES), ("warmup", WARMUPS), ("pipeline", PIPELINES)):
        if cfg[key] not in names:
            raise _bad(key, cfg[key], " or ".join(names))
    _num(cfg, "momentum", 0.0, 0.999)
    if cfg["warmup"] == "constant":
        _num(cfg, "warmup_lr", 0.0, 10.0, lo_open=True)
    else:
        _num(cfg, "warmup_lr", 0.0, 10.0)
    if cfg["optimizer"] != "adamw" and cfg["compile"] != "none":
        raise ConfigError(f"compile={cfg['compile']} compiles the AdamW update; optimizer "
                          f"{cfg['optimizer']!r} needs compile=none")
    _int(cfg, "shots", 1, optional=True)
    _int(cfg, "shots_seed", 0, 2**32 - 1, optional=True)


def validate_config(cfg: Dict) -> Dict:
    """Every setting of a resolved config (``avpt.config.load_config``'s, which has only
    ``DEFAULTS``' keys): type, range, consistency; raises ``ConfigError`` with one line. Pure:
    reads no data. Called once, by ``load_config``: a loaded config is a valid one."""
    from .compiled_step import check_compile_mode
    from .runtime import AMP_MODES

    for key in ("dataset", "test_dataset"):
        if cfg[key] is not None and cfg[key] not in DATASETS:
            raise _bad(key, cfg[key], f"one of {', '.join(DATASETS)}")
    if cfg["dataset"] is None:
        raise _bad("dataset", None, f"one of {', '.join(DATASETS)}")
    _modalities("modality", cfg["modality"], cfg["dataset"])
    _modalities("test_modality", cfg["test_modality"], cfg["test_dataset"] or cfg["dataset"])
    if cfg["dataset"] == "phantom" and cfg["data_root"] is not None:
        raise ConfigError("--data-root is not used with dataset 'phantom' (it is generated); "
                          "drop --data-root or give --dataset busi|inbreast|duke")
    if cfg["dataset"] != "phantom" and not cfg["data_root"]:
        raise ConfigError(f"dataset {cfg['dataset']!r} needs --data-root (the folder of the data set)")
    tds = cfg["test_dataset"]
    if tds == "phantom" and cfg["test_data_root"] is not None:
        raise ConfigError("--test-data-root is not used with test dataset 'phantom'")
    if cfg["test_data_root"] is not None and tds is None:
        raise ConfigError("--test-data-root needs --test-dataset")
    if tds not in (None, "phantom") and tds != cfg["dataset"] and not cfg["test_data_root"]:
        raise ConfigError(f"test dataset {tds!r} needs --test-data-root")
    for key in ("data_root", "test_data_root", "pretrained", "folds_file"):
        if cfg[key] is not None and not isinstance(cfg[key], str):
            raise _bad(key, cfg[key], "a path")
    check_backbone(cfg["backbone"])
    _model_settings(cfg)
    _data_settings(cfg)
    _metric_settings(cfg)
    _classes(cfg)
    _recipe_settings(cfg)
    _int(cfg, "epochs", 1)
    for key in ("batch_size", "batch_size_mri", "eval_batch_size"):
        _int(cfg, key, 1)
    _num(cfg, "lr", 0.0, 10.0, lo_open=True)
    _num(cfg, "weight_decay", 0.0)
    _int(cfg, "warmup_epochs", 0)
    _num(cfg, "grad_clip", 0.0)
    _num(cfg, "rotation", 0.0, 180.0)
    _int(cfg, "seed", 0, 2**32 - 1)
    _int(cfg, "threads", 0)
    _int(cfg, "folds", 2)
    _int(cfg, "fold", 0, cfg["folds"] - 1, optional=True)
    _int(cfg, "eval_every", 0)
    _int(cfg, "stop_after_epoch", 1, optional=True)
    for key in ("deterministic", "skip_bad", "clahe", "flip", "progress", "tensorboard", "report",
                "resume"):
        if not isinstance(cfg[key], bool):
            raise _bad(key, cfg[key], "true or false")
    if cfg["amp"] not in AMP_MODES:
        raise _bad("amp", cfg["amp"], f"{', '.join(AMP_MODES[:-1])} or {AMP_MODES[-1]}")
    check_compile_mode(cfg["compile"])
    if cfg["backend"] is not None and cfg["backend"] not in BACKENDS:
        raise _bad("backend", cfg["backend"], f"one of {', '.join(BACKENDS)} (or null: AVPT_BACKEND)")
    if not isinstance(cfg["compile_backend"], str):
        raise _bad("compile_backend", cfg["compile_backend"], "a torch.compile backend name")
    if cfg["rcl_positives"] not in RCL_POSITIVES:
        raise _bad("rcl_positives", cfg["rcl_positives"], " or ".join(RCL_POSITIVES))
    if not isinstance(cfg["out"], str) or not cfg["out"]:
        raise _bad("out", cfg["out"], "a folder path")
    check_device(cfg["device"])
    return cfg


def check_out(out: str, what: str = "--out") -> None:
    """An output folder that is a folder (or can be made one) and can be written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{what} {out!r} is an existing file, not a folder; give a folder path")
    parent = out
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent.rstrip(os.sep)) or "."
    if not os.path.isdir(parent):
        raise ConfigError(f"{what} {out!r}: {parent!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {out!r}: no permission to write in {parent!r}")


def check_pretrained(path: Optional[str]) -> None:
    """A local open_clip checkpoint that loads safely: safetensors (its header is read) or a
    torch file loadable with ``weights_only=True`` (no pickled code)."""
    if path is None:
        return
    from .backbone import _WEIGHT_SUFFIXES

    if not os.path.isfile(path):
        raise ConfigError(f"--pretrained {path!r} is not a file; give a local open_clip checkpoint "
                          f"({', '.join(_WEIGHT_SUFFIXES)}); nothing is downloaded")
    if not path.endswith(_WEIGHT_SUFFIXES):
        raise ConfigError(f"--pretrained {path!r}: expected a file ending in {', '.join(_WEIGHT_SUFFIXES)}")
    import warnings

    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                if not list(f.keys()):
                    raise ValueError("no tensors")
                meta = f.metadata() or {}
            if meta.get("method") or meta.get("format") == "avpt-pim":
                what = (f"an avpt model's trainable weights (method {meta['method']!r})"
                        if meta.get("method") else "PIM weights (avpt_kernels.pim_state_dict)")
                raise ConfigError(f"--pretrained {path!r} holds {what}, not open_clip backbone "
                                  f"weights: evaluate a run with avpt eval --checkpoint RUN, and "
                                  f"give --pretrained the backbone file it was trained on")
        else:
            import torch

            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": we say it
                warnings.simplefilter("ignore")
                try:
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
                    obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise ValueError(f"holds a {type(obj).__name__}, not a state dict")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means: not a usable weights file
        import pickle

        if isinstance(exc, pickle.UnpicklingError):  # torch's text would advise the unsafe load
            first = ("not a tensors-only file (garbage, or pickled objects that a safe load "
                     "refuses)")
        else:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ConfigError(f"--pretrained {path!r} is not a readable open_clip checkpoint "
                          f"(safetensors, or a torch state dict that loads with weights_only=True): "
                          f"{type(exc).__name__}: {first}") from None


def check_paths(cfg: Dict) -> None:
    """Files and folders of a config: output folder, --pretrained, data roots."""
    check_out(cfg["out"])
    check_pretrained(cfg["pretrained"])
    for key, flag in (("data_root", "--data-root"), ("test_data_root", "--test-data-root")):
        if cfg[key] is not None and not os.path.isdir(cfg[key]):
            raise ConfigError(f"{flag} {cfg[key]!r} is not a folder")


LOCK_FILE = ".avpt.lock"


@contextlib.contextmanager
def run_lock(out: str, command: str = "run") -> Iterator[None]:
    """Hold ``OUT/.avpt.lock`` (``fcntl.flock``, released by the kernel when the process ends,
    even on SIGKILL) for the life of a run: a second run on the same folder fails at once,
    naming the holder (pid, host, command, start time)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                with open(path) as f:
                    holder = json.load(f)
                who = (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}, "
                       f"since {holder.get('started')})")
            except Exception:  # noqa: BLE001 - the holder has not written its note yet
                who = "another process"
            raise ConfigError(f"--out {out!r} is in use by another avpt run: {who}; wait for it to "
                              f"finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": command,
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
        os.fsync(fd)
        yield
    finally:
        os.close(fd)  # releases the lock


def is_run_folder(path: str) -> bool:
    """A folder that holds a training run (checkpoint or saved model)."""
    return os.path.isfile(os.path.join(path, "checkpoint.pt")) or \
        os.path.isfile(os.path.join(path, "model", "trainable.safetensors"))

