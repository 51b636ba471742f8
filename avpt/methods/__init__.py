"""Methods on the same frozen open_clip backbone, selectable by name: ``linear`` (probe),
``full`` (full fine-tuning), ``vpt`` (deep visual prompts), ``lora``, ``adapter``, ``coop``,
``avpt``, ``cilmp`` and
``biomedap``. Each is a config dataclass + a ``Method`` module, registered by name with
``@register(name)``, built with ``build_method(name, **config_overrides)``. A method with pieces
of its own has one package here holding all of them (PEFT-style): ``avpt/`` (config, model,
anatomy, loss, rollout), ``cilmp/`` (config, model, knowledge, descriptions), ``biomedap/``
(config, model, fusion, loss); the single-module methods are one file each. What every method
shares is in ``base.py`` and ``avpt.losses`` (CLS, SEG).

A new method: a module (or a package) here with its config dataclass and ``@register``-ed
``Method`` subclass (overriding the hooks it answers differently, see ``Method``), imported
below so that importing ``avpt.methods`` registers it.
"""
from .base import (Method, MethodConfig, MethodOutput, build_method, get_config_class,
                   get_method_class, method_names, register)
# each module registers its method on import; this order is ``method_names()``'s
from . import linear, full, vpt, lora, adapter, coop, avpt, cilmp, biomedap  # noqa: E402,F401,I001

__all__ = ["Method", "MethodConfig", "MethodOutput", "build_method", "get_config_class",
           "get_method_class", "method_names", "register"]
