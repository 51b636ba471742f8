"""Methods on the same frozen open_clip backbone, selectable by name: ``linear`` (probe),
``full`` (full fine-tuning), ``vpt`` (deep visual prompts), ``lora``, ``adapter``, ``coop``,
``avpt``, ``cilmp`` and
``biomedap``. Each is a config dataclass + a ``Method`` module in its own module here, registered
by name with ``@register(name)``, built with ``build_method(name, **config_overrides)``.

A new method: a module in this package with its config dataclass and ``@register``-ed
``Method`` subclass (overriding the hooks it answers differently, see ``Method``), imported
below so that importing ``avpt.methods`` registers it.
"""
from .base import (Method, MethodConfig, MethodOutput, build_method, get_config_class,
                   get_method_class, method_names, register)
# each module registers its method on import; this order is ``method_names()``'s
from . import linear, full, vpt, lora, adapter, coop, avpt, cilmp, biomedap  # noqa: E402,F401,I001

__all__ = ["Method", "MethodConfig", "MethodOutput", "build_method", "get_config_class",
           "get_method_class", "method_names", "register"]
