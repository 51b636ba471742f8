"""Save and load only the trainable state (safetensors) plus the method's config, PEFT-style.

A directory holds ``avpt_config.json`` (method name + config) and ``trainable.safetensors``
(every parameter with requires_grad, by its name in the method). ``load_trainable`` builds a
fresh method on a fresh backbone (weights from ``pretrained``, by default the saved path) and
loads the trainable tensors into it, checking that exactly those tensors are present.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors.torch import load_file

from .methods.base import Method, build_method, get_config_class

CONFIG_FILE = "avpt_config.json"
WEIGHTS_FILE = "trainable.safetensors"
_KEEP = object()


def frozen_fingerprint(method: Method) -> str:
    """sha256 over the names, shapes, dtypes and values of the frozen parameters (the
    backbone): a rebuilt backbone with this fingerprint is bit-identical to the trained one.
    Weights stored in bf16 for a bf16-autocast run (``avpt.frozen_weights``) are hashed from
    their kept fp32 values, so the cast does not change the fingerprint."""
    import hashlib

    from .frozen_weights import fp32_frozen_values

    fp32 = fp32_frozen_values(method)
    h = hashlib.sha256()
    for name, p in method.named_parameters():
        if p.requires_grad:
            continue
        t = fp32.get(name, p).detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_trainable(method: Method, directory: Union[str, os.PathLike], backbone: Optional[Dict] = None,
                   run_config: Optional[Dict] = None) -> Path:
    """Write the trainable tensors and the config of ``method`` under ``directory``, with what
    rebuilds its frozen backbone exactly (``backbone``: model name, weights path and sha256, or
    the random-init seed; plus the frozen weights' fingerprint) and the training run's config."""
    from safetensors.torch import save

    from avpt_kernels._files import write_bytes_atomic

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in method.trainable_state_dict().items()}
    # each file whole or not at all (a kill or a full disk leaves the old one, no temp file)
    write_bytes_atomic(path / WEIGHTS_FILE, save(state, metadata={"method": method.name}))
    record = None
    if backbone is not None:  # the trainer's record: also the frozen weights' fingerprint
        record = dict(backbone, frozen_sha256=frozen_fingerprint(method))
    write_bytes_atomic(path / CONFIG_FILE, json.dumps(
        {"method": method.name, "config": method.config.to_dict(), "backbone": record,
         "run": run_config}, indent=2).encode())
    return path


def _start_fresh(path: Path) -> str:
    return (f"train the run again (the run folder's checkpoint.pt, if intact, rewrites "
            f"{path.name}/ when the same train command is rerun)")


def read_saved(directory: Union[str, os.PathLike]) -> Dict:
    """``avpt_config.json`` of a saved model, checked: a one-line ``ConfigError`` naming the
    file when it is missing, not JSON, or not a saved avpt model."""
    from .errors import ConfigError

    path = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: --checkpoint must be a run folder or its "
                              f"model/ folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        with open(path / CONFIG_FILE) as f:
            saved = json.load(f)
        get_config_class(saved["method"]).from_dict(saved["config"])
    except Exception as exc:  # noqa: BLE001 - truncated JSON, wrong content
        raise ConfigError(f"{path / CONFIG_FILE} is not a saved avpt model config "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                          f"{_start_fresh(path)}") from None
    return saved


def load_trainable(directory: Union[str, os.PathLike], pretrained=_KEEP,
                   map_location: str = "cpu") -> Method:
    """Rebuild the saved method on a fresh backbone and load its trainable tensors.

    ``pretrained``: backbone weights for the fresh backbone (default: the saved path; None for
    random weights). A model saved with a backbone record gets the same backbone as in
    training: random weights are drawn from the recorded seed, a weights file must have the
    recorded sha256, and the rebuilt frozen weights must have the recorded fingerprint.
    The op backend is the caller's (``avpt.runtime.op_backend``), not the saved model's."""
    from .errors import ConfigError
    from .run_io import file_sha256

    path = Path(directory)
    saved = read_saved(path)
    record = saved.get("backbone") or {}
    config = get_config_class(saved["method"]).from_dict(saved["config"])
    if pretrained is not _KEEP:
        if record and (pretrained is None) != (config.pretrained is None):
            raise ConfigError(f"{path / CONFIG_FILE}: the model was trained on "
                              f"{'random backbone weights' if config.pretrained is None else config.pretrained!r}; "
                              f"--pretrained {pretrained!r} contradicts it")
        if pretrained is not None and record.get("sha256"):
            got = file_sha256(pretrained)
            if got != record["sha256"]:
                raise ConfigError(f"--pretrained {pretrained!r} (sha256 {got[:12]}...) is not the "
                                  f"backbone the model was trained on ({record.get('pretrained')}, "
                                  f"sha256 {record['sha256'][:12]}...)")
        config.pretrained = pretrained
    elif config.pretrained is not None and record.get("sha256"):
        if not os.path.isfile(config.pretrained):
            raise ConfigError(f"the backbone weights {config.pretrained!r} the model was trained on "
                              f"are gone; pass --pretrained PATH (a file with sha256 "
                              f"{record['sha256'][:12]}...)")
        if file_sha256(config.pretrained) != record["sha256"]:
            raise ConfigError(f"the backbone weights {config.pretrained!r} changed since training "
                              f"(sha256 differs from {record['sha256'][:12]}...)")
    with torch.random.fork_rng(devices=[]):
        if config.pretrained is None and record.get("init_seed") is not None:
            torch.manual_seed(int(record["init_seed"]))  # the draw of the training run
        method = build_method(saved["method"], config)
    if record.get("frozen_sha256") and frozen_fingerprint(method) != record["frozen_sha256"]:
        raise ConfigError(f"{path / CONFIG_FILE}: the rebuilt frozen backbone differs from the one "
                          f"the model was trained with (fingerprint mismatch; another open_clip or "
                          f"torch version?): its metrics would not be the training run's")
    try:
        state = load_file(str(path / WEIGHTS_FILE), device=map_location)
    except Exception as exc:  # noqa: BLE001 - truncated or garbage file
        raise ConfigError(f"{path / WEIGHTS_FILE} is not readable safetensors (truncated or corrupt: "
                          f"{str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); "
                          f"{_start_fresh(path)}") from None
    load_trainable_state(method, state, f"{path / WEIGHTS_FILE}", saved["method"])
    return method


def load_trainable_state(method: Method, state: Dict[str, torch.Tensor], source: str,
                         method_name: Optional[str] = None) -> None:
    """Copy ``state`` (parameter name -> tensor) into ``method``'s trainable parameters, in place.
    ``state`` must hold exactly the trainable parameters, each with the parameter's shape; else a
    one-line ``ConfigError`` naming ``source`` (the file the state came from)."""
    from .errors import ConfigError

    params = dict(method.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ConfigError(f"{source} does not match method {method_name or method.name!r}: "
                          f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    for name, tensor in state.items():
        if params[name].shape != tensor.shape:
            raise ConfigError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                              f"the model {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
