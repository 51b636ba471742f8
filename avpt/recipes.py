"""Training recipes as data: how a method is trained (optimizer, learning-rate schedule and
warm-up, epochs, batch size, input pipeline, precision), selectable by name with ``recipe:``.

``avpt-paper``  the A-VPT paper's protocol (AdamW 1e-4, weight decay 1e-4, 50 epochs, batch 32 /
                8 for MRI, 5 linear warm-up epochs then cosine, its pipeline: greyscale,
                per-modality z-score, CLAHE, rotation +-10 degrees, flip). The default, and the
                one shared recipe of ``avpt demo``'s like-for-like table.
``reference``   each method's authors' settings: the method class's ``reference_recipe``
                (``avpt.methods.base.Method``); a method without one refuses it.

A recipe fills the run-config keys of ``Recipe.settings()`` that the user did not set (a YAML
file, a flag or ``--set`` always wins: ``--recipe reference --epochs 1`` trains one epoch with
the authors' optimizer). The resolved values are what the run records (metrics.json's
``config``, the checkpoint, ``model/avpt_config.json``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict

from .errors import ConfigError

RECIPE_NAMES = ("avpt-paper", "reference")
OPTIMIZERS = ("adamw", "sgd")
WARMUPS = ("linear", "constant")     # linear: 0 -> lr; constant: warmup_lr, then lr
LR_SCHEDULES = ("cosine", "constant")  # after the warm-up: cosine annealing to 0, or lr kept
PIPELINES = ("avpt-paper", "clip")   # avpt.data.transforms.PIPELINES


@dataclass(frozen=True)
class Recipe:
    """One training recipe; ``source`` says where its numbers come from."""
    source: str
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.0           # SGD's (unused by AdamW)
    epochs: int = 50
    batch_size: int = 32
    batch_size_mri: int = 8
    lr_schedule: str = "cosine"
    warmup_epochs: int = 5
    warmup: str = "linear"
    warmup_lr: float = 0.0          # the constant warm-up's learning rate
    pipeline: str = "avpt-paper"
    flip: bool = True               # horizontal flip in training (both pipelines)
    amp: str = "auto"               # precision: auto | off | bf16 | fp16 (avpt.runtime.AMP_MODES)

    def settings(self) -> Dict[str, Any]:
        """The run-config keys this recipe sets, with its values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "source"}


AVPT_PAPER = Recipe(source="the A-VPT paper, 'Training protocol': AdamW 1e-4, weight decay 1e-4, "
                           "cosine over 50 epochs, 5 warm-up epochs, batch 32 (8 for MRI); "
                           "rotation +-10 degrees, flip, CLAHE, per-modality normalisation")


def dassl_recipe(source: str, lr: float, epochs: int, batch_size: int, flip: bool,
                 amp: str) -> Recipe:
    """A CoOp-family recipe (Dassl's trainer): SGD with Dassl's momentum 0.9 and weight decay
    5e-4, cosine, one constant warm-up epoch at 1e-5, the CLIP pipeline; MRI batches as large
    as the others (the authors have no MRI)."""
    return Recipe(source=source, optimizer="sgd", lr=lr, weight_decay=5e-4, momentum=0.9,
                  epochs=epochs, batch_size=batch_size, batch_size_mri=batch_size,
                  lr_schedule="cosine", warmup_epochs=1, warmup="constant", warmup_lr=1e-5,
                  pipeline="clip", flip=flip, amp=amp)


def resolve_recipe(name: str, method_cls) -> Recipe:
    """The recipe ``name`` of method class ``method_cls`` (one-line ``ConfigError`` otherwise)."""
    if name not in RECIPE_NAMES:
        raise ConfigError(f"recipe must be one of {', '.join(RECIPE_NAMES)}, got {name!r}")
    if name == "avpt-paper":
        return AVPT_PAPER
    recipe = method_cls.reference_recipe
    if recipe is None:
        raise ConfigError(f"recipe reference: method {method_cls.name!r} has no recipe of its "
                          f"authors here; use --recipe avpt-paper (docs/recipes.md)")
    return recipe

