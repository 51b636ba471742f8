"""``evaluate_checkpoint``: a saved model (OUT/model of a run) evaluated on a data set, its frozen
backbone rebuilt exactly as in training (what ``avpt eval`` runs)."""
from __future__ import annotations

import logging
import os
import warnings
from typing import Dict, Optional

from .engine import evaluate, grouped_record, score, undefined_metrics
from .frozen_weights import store_frozen_weights
from .run_io import write_json
from .runtime import amp_dtype, op_backend, resolve_device, seed_everything

log = logging.getLogger("avpt.train")


def _check_saved_classes(model_dir: str, saved: Dict, cfg: Dict) -> None:
    """A saved model of C classes is evaluated on data of C classes (one-line ConfigError)."""
    from .errors import ConfigError
    from .validate import data_classes

    classes = data_classes(cfg["dataset"], cfg["data"])
    n = int(saved.get("num_classes", 2))
    if n != len(classes):
        fix = "evaluate it on data of its classes"
        if cfg["dataset"] == "busi":  # the one data set whose class count is a setting
            fix += (" (BUSI: give --set data.normal=class for normal/benign/malignant" if n == 3
                    else " (BUSI: drop data.normal=class; data.normal=benign or exclude for "
                         "benign/malignant") + ")"
        raise ConfigError(f"--checkpoint {model_dir!r} tells {n} classes apart, dataset "
                          f"{cfg['dataset']!r} with these data settings has {len(classes)} "
                          f"({', '.join(classes)}); {fix}")


def evaluate_checkpoint(model_dir: str, cfg: Dict, owner: Optional[tuple] = None) -> Dict:
    """Evaluate a saved model (``OUT/model`` of a run) on the test split given by ``cfg``.

    The frozen backbone is rebuilt exactly as in training (``avpt.checkpoint.load_trainable``:
    the recorded weights file, checked by sha256, or the recorded random-init seed, checked by
    the frozen weights' fingerprint). ``cfg`` is a loaded config (``avpt.config.load_config``)
    of the saved model's method and backbone (else a ``ConfigError``); its model settings are set
    to the saved model's, so that metrics.json records what was evaluated. It runs on ``cfg``'s
    op backend (``avpt.runtime.op_backend``). ``owner``: (kind,
    identity, description) recorded as OUT's owner once the lock is held (``avpt.owner``)."""
    from .checkpoint import load_trainable, read_saved
    from .run_data import build_data, classes_record
    from .errors import ConfigError
    from .validate import check_paths, run_lock

    saved = read_saved(model_dir)
    for key, value in (("method", saved["method"]), ("backbone", saved["config"]["model_name"])):
        if cfg[key] != value:
            raise ConfigError(f"{model_dir} is a {key} {value!r} model, the config's {key} is "
                              f"{cfg[key]!r}: load the config with {key}={value}")
    cfg = dict(cfg)
    check_paths(cfg)
    _check_saved_classes(model_dir, saved["config"], cfg)
    device = resolve_device(cfg["device"])
    if not saved.get("backbone") and saved["config"].get("pretrained") is None \
            and not cfg["pretrained"]:
        log.warning("%s has no backbone record (saved before issue 13): its random backbone is "
                    "drawn from seed %s; the metrics are the training run's only if that was its "
                    "seed", model_dir, cfg["seed"])
    with run_lock(cfg["out"], "eval"), op_backend(cfg):
        if owner is not None:
            from .owner import claim
            claim(cfg["out"], *owner)
        seed_everything(cfg["seed"], False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
            kw = {"pretrained": cfg["pretrained"]} if cfg["pretrained"] else {}
            model = load_trainable(model_dir, **kw)
        model.to(device)
        dtype = amp_dtype(cfg["amp"], device)
        store_frozen_weights(model, dtype, device)  # after the fingerprint check of the load
        _, test_set, info = build_data(cfg, int(model.visual.image_size[0]), cfg["out"], training=False)
        pred = evaluate(model, test_set, cfg, device, dtype)
        metrics = score(pred, cfg.get("metrics"))
        cfg["pretrained"] = model.config.pretrained
        cfg["model"] = {k: v for k, v in model.config.to_dict().items()
                        if k not in ("model_name", "pretrained")}
        result = {"test": metrics, "undefined": undefined_metrics(pred, metrics),
                  **grouped_record(pred, cfg.get("metrics")),
                  "classes": classes_record(cfg), "config": cfg,
                  "model": os.path.abspath(model_dir), "method": saved["method"],
                  "backbone": saved.get("backbone"),
                  "data": dict(info, test_samples=len(test_set))}
        write_json(os.path.join(cfg["out"], "metrics.json"), result)
    return result
