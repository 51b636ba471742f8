"""``avpt demo``: methods side by side on the phantom with a pretrained tiny backbone.

``run(out, ...)`` trains and evaluates every method of ``methods`` (default linear probe, VPT-deep,
LoRA, A-VPT) on the same patient-level fold and on one cross-modal transfer (train on FROM, test
on TO, no fine-tuning), computes 95% bootstrap intervals over test images
(``avpt.methods_table``) and writes ``OUT/report.html`` opening with the comparison table and plot,
``OUT/comparison.json`` and ``OUT/summary.json``. The backbone weights default to the shipped
``avpt/weights/avpt-tiny-p8-phantom-clip.safetensors`` (made by ``avpt pretrain``, command in its
``.json`` sidecar); the phantom seed of the evaluation must differ from the weights' seed.

Settings are chosen by a fixed rule, never on the test set: every method gets the demo config's
one shared recipe (``avpt.recipes``; optimizer, schedule, epochs, lr, batch size, pipeline), so
the table compares methods like for like (``recipe: reference``, each method's own authors'
recipe, is refused here); A-VPT's ``model:`` settings come from the config, the baselines keep
their own defaults.

The trainer is called in one place only (``_train_predict``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import methods_table as C

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo_cpu.yaml"
# the methods side by side unless --methods says otherwise
DEMO_METHODS = ("linear", "vpt", "lora", "avpt")


def display_name(method: str) -> str:
    """How tables and reports name the registered method ``method`` (its class's
    ``display_name``)."""
    from .methods import get_method_class

    return get_method_class(method).display_name


def _default_weights() -> str:
    from .pretrain import DEFAULT_WEIGHTS

    return DEFAULT_WEIGHTS


def _train_predict(cfg: Dict, overwrite: bool = False) -> Tuple[Dict, Dict]:
    """Train + evaluate one run with the trainer (``avpt.train.run``), then reload the saved
    model and predict its test split again for per-image metrics. Returns (metrics dict of the
    run, prediction dict: probs [N], labels [N], preds [N, H, W] or None, gts [N, H, W])."""
    from .checkpoint import load_trainable
    from .engine import evaluate
    from .run_data import build_data
    from .runtime import op_backend, resolve_device
    from .train import run as train_run

    res = train_run(cfg, kind="train", overwrite=overwrite)
    device = resolve_device(cfg["device"])
    model = load_trainable(os.path.join(cfg["out"], "model")).to(device)
    _, test_set, _ = build_data(cfg, int(model.visual.image_size[0]), cfg["out"], training=False)
    with op_backend(cfg):
        return res, evaluate(model, test_set, cfg, device)


def _configs(config: str, out: str, methods: Sequence[str], transfer: Tuple[str, str],
             pretrained: Optional[str], sets: Sequence[str], overrides: Dict) -> List[Tuple[str, str, Dict]]:
    """(method, split name, config) of every run, all validated before the first one starts."""
    from .config import load_config
    from .methods import get_method_class

    src, dst = transfer
    runs = []
    for method in methods:
        for split in ("fold", "transfer"):
            extra = dict(overrides, method=method, pretrained=pretrained,
                         out=os.path.join(out, method if split == "fold" else f"{method}_{src}_to_{dst}"))
            if split == "transfer":
                extra.update(modality=[src], test_modality=[dst])
            own = get_method_class(method)
            extra.update(tensorboard=False, progress=False,
                         report=own.has_report_sections and split == "fold")
            # the config's model: section is A-VPT's; a method takes the settings it has
            cfg = load_config(config, None, extra, list(sets), shared_model=True)
            runs.append((method, split, cfg))
    return runs


def _insert_after_title(path: str, fragment: str) -> None:
    with open(path) as f:
        text = f.read()
    cut = text.index("</h1>") + len("</h1>")
    from .run_io import write_text

    write_text(path, text[:cut] + fragment + text[cut:])


def _verdict(rows: List[Dict], split: str) -> str:
    """One plain sentence: does A-VPT beat the others on ``split`` (AUC, Dice), with numbers."""
    by = {r["method"]: r["metrics"] for r in rows if r["split"] == split}
    ours = display_name("avpt")
    if ours not in by or len(by) < 2:
        return ""
    a = by[ours]["auc"][0]
    better = [m for m, v in by.items() if m != ours and v["auc"][0] > a]
    if better:
        return (f"On {split}, {ours} does NOT have the best AUC: {ours} {a:.3f} vs "
                + ", ".join(f"{m} {by[m]['auc'][0]:.3f}" for m in better) + ".")
    return f"On {split}, {ours} has the best AUC ({a:.3f}); overlapping intervals mean the gap is not resolved."


def run(out: str = "runs/demo", config: Optional[str] = None, pretrained: Optional[str] = "default",
        methods: Sequence[str] = DEMO_METHODS, transfer: Tuple[str, str] = ("MG", "US"),
        sets: Sequence[str] = (), overrides: Optional[Dict] = None, n_resamples: int = 1000,
        overwrite: bool = False) -> int:
    """The whole demo; returns the exit code. ``pretrained``: a weights file, "default" (the
    shipped one) or None (random weights: every number is then meaningless, and the report
    says so). ``overrides``: top-level config keys (e.g. ``device``, ``epochs``). ``out`` is
    recorded as a demo's folder (``avpt.owner``): another command's folder, or a demo with
    other settings, is refused unless ``overwrite``."""
    from .report import img_tag, write_html
    from .errors import ConfigError
    from .validate import check_out, run_lock

    t0 = time.time()
    config = str(config or DEFAULT_CONFIG)
    if not os.path.isfile(config):
        raise ConfigError(f"--config {config} not found (configs/ ships with the repository)")
    if pretrained == "default":
        pretrained = _default_weights()
        if not os.path.isfile(pretrained):
            raise ConfigError(f"the shipped weights {pretrained} are missing: make them with "
                              f"`avpt pretrain` or pass --pretrained FILE")
    if transfer[0] == transfer[1]:
        raise ConfigError(f"--transfer FROM TO must name two different modalities, got {transfer}")
    from .methods import method_names

    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ConfigError(f"methods {unknown} unknown; expected some of {sorted(method_names())}")
    check_out(out)
    runs = _configs(config, out, methods, transfer, pretrained, sets, dict(overrides or {}))
    if any(cfg["recipe"] == "reference" for _, _, cfg in runs):
        raise ConfigError("avpt demo trains every method with one shared recipe (a like-for-like "
                          "table): recipe reference gives each method its own; train those with "
                          "avpt train --recipe reference")
    from .owner import check_owner, claim, identity

    ident = identity({"runs": [(m, s, {k: v for k, v in c.items() if k != "out"})
                               for m, s, c in runs], "transfer": transfer})
    check_owner(out, "demo", ident, overwrite)
    if pretrained:
        from .pretrain import read_meta

        seed = read_meta(pretrained).get("seed")
        if seed is not None and any(cfg["seed"] == seed for _, _, cfg in runs):
            raise ConfigError(f"seed {seed} is the pretraining seed of {pretrained}: evaluate on "
                              f"another phantom seed")
    rows, results = [], {}
    with run_lock(out, "demo"):
        claim(out, "demo", ident, f"{', '.join(methods)}, transfer {transfer[0]}->{transfer[1]}")
        print(f"[demo] every method: {_recipe_line(runs[0][2])} (one shared recipe: a "
              f"like-for-like table)", flush=True)
        for method, split, cfg in runs:
            name = display_name(method)
            where = cfg["data"].get("num_patients", "?")
            print(f"[demo] {name}: {'fold ' + str(cfg['fold']) if split == 'fold' else f'transfer {transfer[0]}->{transfer[1]}'}"
                  f" ({where} patients per modality, {cfg['epochs']} epochs)", flush=True)
            res, pred = _train_predict(cfg, overwrite)
            arrays = C.per_image(pred, cfg.get("metrics"))
            ci = C.bootstrap_ci(arrays, n_resamples=n_resamples, seed=cfg["seed"])
            label = res["data"]["split"] if split == "fold" else f"transfer {transfer[0]}->{transfer[1]}"
            rows.append(dict(method=res.get("method_label", name), split=label, n=int(len(arrays["labels"])), metrics=ci,
                             hd95_unit=arrays["unit"],
                             trainable_pct=res["params"]["percent_of_visual"],
                             time_s=res.get("time_s")))
            results[(method, split)] = res
            print(f"[demo] {name} {label}: " + " ".join(
                f"{k}={ci[k][0]:.3f} [{ci[k][1]:.3f},{ci[k][2]:.3f}]" for k in C.KEYS
                if ci[k][0] == ci[k][0]) + f" ({res.get('time_s', 0):.0f} s)", flush=True)
        fig_dir = os.path.join(out, "figures")
        os.makedirs(fig_dir, exist_ok=True)
        plot = C.comparison_plot(rows, os.path.join(fig_dir, "comparison.png"))
        main = results.get(("avpt", "fold")) or results[(methods[0], "fold")]
        weights = (f"backbone {main['config']['backbone']} with weights {os.path.basename(pretrained)} "
                   f"(CLIP-style pretraining on phantom seed {read_meta(pretrained).get('seed')}, "
                   f"disjoint from the evaluation seed {main['config']['seed']})" if pretrained else
                   "<b>RANDOM backbone weights: every number below only shows that the pipeline "
                   "runs; nothing is learned from a random frozen backbone</b>")
        verdict = " ".join(v for v in (_verdict(rows, rows[0]["split"]),
                                       _verdict(rows, f"transfer {transfer[0]}->{transfer[1]}")) if v)
        fragment = ("<h2>Methods side by side</h2>"
                    f"<p>{weights}. Every method: the same folds, one shared recipe "
                    f"({_recipe_line(main['config'])}), settings fixed in advance (no tuning on "
                    f"the test set). {verdict}</p>"
                    + C.comparison_html(rows, "test metrics, 95% bootstrap intervals")
                    + (img_tag(plot) if plot else "")
                    + _figure_notes(bool(pretrained)))
        report_runs = [(f"{display_name(m)}, " + ("phantom " + r["data"]["split"] if s == "fold" else
                                           f"transfer {transfer[0]} -> {transfer[1]}"), r)
                       for (m, s), r in results.items()]
        report = write_html(os.path.join(out, "report.html"), "A-VPT demo report", report_runs,
                            main.get("figures") or {}, f"Total time {time.time() - t0:.0f} s.")
        _insert_after_title(report, fragment)
        from .run_io import write_text

        write_text(os.path.join(out, "comparison.json"),
                   json.dumps({"rows": rows, "pretrained": pretrained}, indent=1, default=str))
        write_text(os.path.join(out, "summary.json"),
                   json.dumps({"main": main.get("test"), "rows": rows,
                               "time_s": time.time() - t0}, indent=1, default=str))
    print(f"[demo] done in {time.time() - t0:.0f} s\n[demo] report: {os.path.abspath(report)}", flush=True)
    return 0


def _recipe_line(cfg: Dict) -> str:
    """The shared recipe of a demo run in words (``avpt.recipes``)."""
    return (f"recipe {cfg['recipe']}: {cfg['optimizer']} lr {cfg['lr']}, {cfg['epochs']} epochs, "
            f"batch {cfg['batch_size']}, {cfg['warmup']} warm-up {cfg['warmup_epochs']} epochs "
            f"then {cfg['lr_schedule']}, {cfg['pipeline']} pipeline")


def _figure_notes(pretrained: bool) -> str:
    """How to read the A-VPT figures further down (captions the figures lack)."""
    items = [
        "<b>Random / static / anatomy prompts</b>: one trained A-VPT model whose prompts are swapped "
        "at test time (random tokens of matched spread; the batch-mean static prompt; its own "
        "anatomy-guided prompts). These are prompt swaps of ONE model, not separately trained models.",
        "<b>RCL curve</b>: the region contrastive loss (Eq. 12) pulls each tissue's region embedding "
        "toward the same tissue in other images/modalities; a falling curve means the tissue "
        "embeddings separate by tissue type, not that classification improves.",
        "<b>Rollout relevance</b>: attention rollout from the prompts (Eq. 18), normalised per image "
        "to [0, 1] (bright = more relevant).",
    ]
    if not pretrained:
        items.append("<b>Random weights</b>: the backbone is random, so every figure is of an "
                     "untrained feature extractor.")
    return "<h3>Reading the figures</h3><ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"
