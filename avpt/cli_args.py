"""The options every run command shares (``avpt train``, ``eval``, ``transfer``, ``cv``,
``explain``, ``demo``), their choices read from the settings' owners, and the run config they
make (``avpt.config.load_config``: DEFAULTS < --config < flags < --set, validated once)."""
from __future__ import annotations

import argparse
from typing import Dict, Optional

from avpt_kernels.backend import BACKENDS

from .compiled_step import COMPILE_MODES
from .data.modalities import DATASETS, MODALITIES
from .recipes import RECIPE_NAMES
from .runtime import AMP_MODES


def add_run_args(p: argparse.ArgumentParser, out_default: Optional[str] = None) -> None:
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--variant", help="a named variant of the YAML file (ablation tables)")
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-root", help="folder of the real data set")
    p.add_argument("--modality", nargs="+", choices=MODALITIES,
                   help="modalities to use (phantom; real data sets have one)")
    from .methods import method_names

    p.add_argument("--method", help=f"the method: {', '.join(method_names())} (default avpt)")
    p.add_argument("--backbone", help="ViT-B-16 (default), tiny, or an open_clip config name")
    p.add_argument("--pretrained", help="local open_clip checkpoint (nothing is downloaded)")
    p.add_argument("--recipe", choices=RECIPE_NAMES,
                   help="training recipe: avpt-paper (default: the A-VPT paper's) or reference "
                        "(the method's authors'); flags and --set override its settings "
                        "(docs/recipes.md)")
    p.add_argument("--shots", type=int, help="few-shot: K training images per class, drawn "
                   "patient by patient with the run's seed (--set shots_seed=S)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--fold", type=int, help="test fold of the patient-level k-fold split")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--amp", choices=AMP_MODES)
    p.add_argument("--backend", choices=BACKENDS,
                   help="the avpt_kernels op backend of the run (default: AVPT_BACKEND, else auto)")
    p.add_argument("--compile", choices=COMPILE_MODES,
                   help="compile the whole training step (forward, losses, backward, AdamW) as one "
                        "graph; reduce-overhead: CUDA graphs on a GPU (default none)")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip unreadable/corrupt files (counted in metrics.json) instead of stopping")
    p.add_argument("--out", default=out_default, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds another run or another command's "
                        "output (refused otherwise, see docs/cli.md: what each command writes)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set model.schedule=late --set lr=3e-4")
    p.add_argument("-v", "--verbose", action="store_true")


def run_overrides(args) -> Dict:
    return dict(dataset=args.dataset, data_root=args.data_root, modality=args.modality,
                method=args.method, backbone=args.backbone, pretrained=args.pretrained,
                recipe=args.recipe, shots=args.shots,
                epochs=args.epochs, batch_size=args.batch_size, fold=args.fold, seed=args.seed,
                device=args.device, amp=args.amp, backend=args.backend, skip_bad=args.skip_bad,
                out=args.out,
                compile=getattr(args, "compile", None))


def run_config(args, extra: Optional[Dict] = None, base: Optional[Dict] = None) -> Dict:
    """DEFAULTS < --config (+ --variant) < ``base`` < flags < ``extra`` < --set, validated.
    ``base`` may hold None values (e.g. a training run's ``fold: null``)."""
    from .config import load_config

    flags = {k: v for k, v in run_overrides(args).items() if v is not None}
    flags.update(extra or {})
    base = {k: v for k, v in (base or {}).items() if k not in flags}
    overrides = {k: v for k, v in base.items() if v is not None}
    overrides.update(flags)
    nulls = [f"{k}=null" for k, v in base.items() if v is None]
    return load_config(args.config, args.variant, overrides, nulls + list(args.sets))


def set_keys(args) -> set:
    return {item.split("=", 1)[0].strip() for item in args.sets if "=" in item}
