"""Methods on the same frozen open_clip backbone, selectable by name: ``linear`` (probe),
``full`` (full fine-tuning), ``vpt`` (deep visual prompts), ``lora``, ``adapter``, ``coop`` and
``avpt``. Each is a config dataclass + a ``Method`` module, built with
``build_method(name, **config_overrides)``."""
from .base import (Method, MethodConfig, MethodOutput, build_method, get_config_class,
                   get_method_class, method_names, register)

__all__ = ["Method", "MethodConfig", "MethodOutput", "build_method", "get_config_class",
           "get_method_class", "method_names", "register"]
from . import biomedap  # noqa: F401
