"""The run configuration: ``DEFAULTS``, YAML files (with named variants) and ``--set key=value``
overrides merged into one plain dict, then validated (``avpt.validate``).

Configs are plain dicts; YAML files under ``configs/`` and ``--set key=value`` override
``DEFAULTS`` (``model.*`` keys go to the method's config dataclass, ``data.*`` to the loader).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Optional

from .backbone import BACKBONE_ALIASES
from .errors import ConfigError
from .recipes import resolve_recipe
from .validate import validate_config

log = logging.getLogger("avpt.train")

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
    # the training recipe (avpt.recipes): avpt-paper | reference (the method's authors'); it
    # fills the recipe keys below that the file, flags and --set leave open
    "recipe": "avpt-paper",
    "optimizer": "adamw",        # adamw | sgd
    "momentum": 0.0,             # SGD's
    "epochs": 50,
    "batch_size": 32,            # 2-D modalities
    "batch_size_mri": 8,
    "eval_batch_size": 64,
    "lr": 1e-4,
    "weight_decay": 1e-4,
    "lr_schedule": "cosine",     # after the warm-up: cosine | constant
    "warmup_epochs": 5,
    "warmup": "linear",          # linear (0 -> lr) | constant (warmup_lr, then lr)
    "warmup_lr": 0.0,            # the constant warm-up's learning rate
    "pipeline": "avpt-paper",    # input pipeline: avpt-paper | clip (avpt.data.transforms)
    "shots": None,               # few-shot: K training images per class (None: all)
    "shots_seed": None,          # the draw of the K-shot images (None: the run's seed)
    "grad_clip": 1.0,
    "amp": "auto",               # auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16
    "compile": "none",           # none | default | reduce-overhead (CUDA graphs): WholeStep
    "compile_backend": "inductor",  # torch.compile backend of compile != none (aot_eager: tests)
    "backend": None,             # the avpt_kernels op backend of the run: auto | torch | triton
                                 # (None: AVPT_BACKEND, default auto); how the ops run, not what
                                 # they compute (avpt.runtime.op_backend applies it)
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
    "metrics": {},               # evaluation: hd95 (monai | medpy), empty_prediction (max | skip),
                                 # groups ([patient, breast]); avpt.metrics.METRIC_DEFAULTS
}



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
    keys = dotted.split(".")
    if keys[0] not in DEFAULTS:
        raise ConfigError(f"unknown config key {keys[0]!r}; known: {', '.join(sorted(DEFAULTS))} "
                          f"(method settings go under model., loader settings under data.)")
    if len(keys) > 1 and keys[0] not in ("model", "data", "metrics"):
        raise ConfigError(f"config key {dotted!r}: {keys[0]} is not a section (sections: model., "
                          f"data., metrics.)")
    if len(keys) > 2 or any(not k for k in keys):
        raise ConfigError(f"config key {dotted!r}: expected KEY, model.KEY, data.KEY or metrics.KEY")
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {dotted!r}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: Optional[str] = None, variant: Optional[str] = None,
                overrides: Optional[Dict] = None, sets: Optional[List[str]] = None,
                shared_model: bool = False) -> Dict:
    """DEFAULTS < YAML file (its ``variants:`` entry ``variant`` on top) < overrides < --set,
    then ``avpt.validate.validate_config`` (one-line ``ConfigError`` for any bad setting): the
    one place a run config is validated, so that a loaded config is a valid one.

    ``shared_model``: the file's ``model:`` section is shared by several methods (the demo's is
    A-VPT's): the method takes the settings of it that its config has; ``model.*`` given by
    ``overrides`` or ``sets`` must still be the method's."""

    cfg = copy.deepcopy(DEFAULTS)
    given = set()  # the keys the user set (file, flags, --set): checked against each other
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
            if not (shared_model and k.startswith("model.")):
                given.add(k)
            try:
                set_key(cfg, k, _number(v) if isinstance(v, str) and k.startswith("model.") else v)
            except ValueError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    for k, v in (overrides or {}).items():
        if v is not None:
            given.add(k)
            set_key(cfg, k, v)
    for k in ("lr", "weight_decay", "grad_clip", "rotation", "momentum",
              "warmup_lr"):  # YAML 1.1 reads 1e-4 as text
        cfg[k] = _number(cfg[k])
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        given.add(k.strip())
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
    if shared_model:
        _keep_method_settings(cfg, given)
    _apply_recipe(cfg, given)
    validate_config(cfg)
    _check_schedule(cfg, given, path)
    return cfg


def _keep_method_settings(cfg: Dict, given: set) -> None:
    """Drop the file's ``model.*`` settings that the method's config lacks (a ``model:``
    section shared by several methods); an unknown method is left to ``validate_config``."""
    from .methods import get_config_class, method_names

    if cfg["method"] not in method_names() or not isinstance(cfg["model"], dict):
        return
    fields = get_config_class(cfg["method"]).__dataclass_fields__
    cfg["model"] = {k: v for k, v in cfg["model"].items()
                    if k in fields or f"model.{k}" in given}


def _check_schedule(cfg: Dict, given: set, path: Optional[str]) -> None:
    """Schedule settings against each other. A warm-up the user set that is longer than the run
    is refused (the default, 5 epochs, is shortened to epochs - 1 for short runs, so that some
    cosine decay remains); a stop_after_epoch past the end is refused."""
    epochs = cfg["epochs"]
    if "warmup_epochs" in given and cfg["warmup_epochs"] > epochs:
        src = f" (from {path})" if path else ""
        raise ConfigError(f"warmup_epochs {cfg['warmup_epochs']}{src} is longer than the run's "
                          f"{epochs} epochs: the learning rate would never reach lr; give "
                          f"--set warmup_epochs=N with N < {epochs}, or more --epochs")
    stop = cfg["stop_after_epoch"]
    if stop is not None and stop > epochs:
        raise ConfigError(f"stop_after_epoch {stop} is past the run's last epoch ({epochs}); give "
                          f"--set stop_after_epoch=N with N < {epochs}, or drop it")


def read_yaml(path: str) -> Dict:
    """A YAML config file as a dict; a missing file, a syntax error (with its line) or a file
    that is not a mapping is a one-line ``ConfigError``."""
    import yaml

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


def _apply_recipe(cfg: Dict, given: set) -> None:
    """Fill ``cfg``'s recipe keys that the user did not set (``given``) from its recipe; an
    unknown method is left to ``avpt.validate``."""
    from .methods import get_method_class, method_names

    if cfg["method"] not in method_names():
        return
    recipe = resolve_recipe(cfg["recipe"], get_method_class(cfg["method"]))
    for key, value in recipe.settings().items():
        if key not in given:
            cfg[key] = value
