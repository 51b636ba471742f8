"""``avpt eval`` / ``avpt explain``: the saved model a --checkpoint names, with the flags that
contradict it refused."""
from __future__ import annotations

import os

_MISSING = object()


def _model_dir(path: str) -> str:
    return os.path.join(path, "model") if os.path.isdir(os.path.join(path, "model")) else path


def _saved_model(args):
    """(model dir, saved avpt_config.json) of --checkpoint, with flags that contradict the
    saved model refused: --method, --backbone, --set model.KEY=VALUE (model.* is the saved
    model's; --pretrained is checked by sha256 when the model is loaded)."""
    from .checkpoint import read_saved
    from .backbone import BACKBONE_ALIASES
    from .errors import ConfigError

    if not os.path.isdir(args.checkpoint):
        raise ConfigError(f"--checkpoint {args.checkpoint!r} is not a folder (a run's --out or its "
                          f"model/ folder)")
    model_dir = _model_dir(args.checkpoint)
    saved = read_saved(model_dir)
    where = os.path.join(model_dir, "avpt_config.json")
    if args.method is not None and args.method != saved["method"]:
        raise ConfigError(f"--method {args.method} contradicts the checkpoint: {where} is a "
                          f"{saved['method']!r} model; drop --method")
    name = saved["config"]["model_name"]
    if args.backbone is not None and BACKBONE_ALIASES.get(args.backbone.lower(), args.backbone) != name:
        raise ConfigError(f"--backbone {args.backbone} contradicts the checkpoint: {where} was "
                          f"trained on {name!r}; drop --backbone")
    from .config import parse_value

    for item in args.sets:
        k, _, v = item.partition("=")
        k = k.strip()
        if k.startswith("model."):
            field = k[len("model."):]
            have, want = saved["config"].get(field, _MISSING), parse_value(v)
            if isinstance(want, tuple):
                want = list(want)
            if have is _MISSING or have != want:
                raise ConfigError(f"--set {item} contradicts the checkpoint: the model's settings "
                                  f"are the saved ones ({where}: {field} = "
                                  f"{saved['config'].get(field, 'not a setting')!r}); drop it")
    return model_dir, saved
