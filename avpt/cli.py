"""The ``avpt`` command line.

  avpt demo       the main job: A-VPT on the synthetic phantom (tiny backbone on CPU, ViT-B/16 on
                  a GPU), classification + segmentation, one cross-modal transfer, report.html
  avpt train      train + evaluate one run (--config FILE.yaml, --dataset, --method, --set k=v ...)
  avpt eval       evaluate a saved model (OUT/model of a run) on a data set
  avpt transfer   train on one modality/data set, test on another without fine-tuning
  avpt cv         patient-level stratified k-fold cross-validation over seeds, mean +- std
  avpt explain    rollout relevance and prompt-type attention figures of a saved model
  avpt params     trainable-parameter table of the methods
  avpt compare    op-level backend comparison (python -m avpt_kernels.compare)

Every run writes OUT/metrics.json (a ``test`` object with auc, f1, dice, iou, hd95 with
hd95_unit and the conventions, ``test_by`` per patient/breast with --set metrics.groups=..., and
the resolved config) and, unless --set report=false, figures and OUT/report.html.

Every setting, file and folder is checked before any data is loaded or anything trained
(``avpt.validate``); a mistake is one line ``avpt CMD: error: ...`` on stderr and exit code 2
(``AVPT_TRACEBACK=1`` shows the traceback); a full disk or other I/O failure is one line naming
the file, exit code 1. Ctrl-C: one line, exit code 130, SIGTERM the same with exit code 143, the
last epoch's checkpoint and log.csv intact and in agreement. One run per --out at a time (a lock
file, ``OUT/.avpt.lock``); every --out records what made it (``avpt.owner``) and a command
refuses a folder of another kind or run unless --overwrite.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

from .cli_args import add_run_args, run_config, run_overrides, set_keys
from .cli_eval import _model_dir, _saved_model
from .cli_exit import Terminated, error_line, interrupted, on_sigterm
from .cli_tools import cmd_compare, cmd_params
from .data.modalities import DATASETS, MODALITIES
from .demo import DEMO_METHODS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


EVAL_FROM_RUN = ("dataset", "data_root", "modality", "test_dataset", "test_data_root",
                 "test_modality", "seed", "folds", "fold", "folds_file", "clahe", "data",
                 "skip_bad", "metrics", "pipeline", "shots", "shots_seed")


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("avpt.train").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")


def _summary(res: Dict) -> str:
    t = res.get("test", {})
    vals = " ".join(f"{k}={t[k]:.4f}" if isinstance(t.get(k), float) else f"{k}=n/a"
                    for k in ("auc", "f1", "dice", "iou", "hd95"))
    if t.get("hd95_unit"):  # HD95's unit and where the segmentation figures were measured
        vals += f" (hd95 in {t['hd95_unit']}, {t.get('resolution', 'native')} resolution)"
    for group, g in (res.get("test_by") or {}).items():
        vals += f"; per {group} (n={g.get('n')}): " + " ".join(
            f"{k}={g[k]:.4f}" if isinstance(g.get(k), float) else f"{k}=n/a"
            for k in ("auc", "f1", "dice", "hd95"))
    return vals


def cmd_train(args) -> int:
    from .train import run

    cfg = run_config(args)
    res = run(cfg, kind="train", overwrite=args.overwrite)
    if res.get("test"):
        print(f"test: {_summary(res)}")
        print(f"metrics: {os.path.join(cfg['out'], 'metrics.json')}")
        if res.get("report"):
            print(f"report: {res['report']}")
    return 0


def cmd_transfer(args) -> int:
    from .errors import ConfigError

    if not (args.test_modality or args.test_dataset):
        raise ConfigError("give --test-modality and/or --test-dataset (what to test on)")
    if args.modality:
        raise ConfigError("use --train-modality (and --test-modality), not --modality")
    extra = dict(test_modality=args.test_modality, test_dataset=args.test_dataset,
                 test_data_root=args.test_data_root)
    if args.train_modality:
        extra["modality"] = args.train_modality
    from .train import run

    cfg = run_config(args, extra)
    res = run(cfg, kind="transfer", overwrite=args.overwrite)
    if res.get("test"):
        print(f"transfer {res['data'].get('train_modalities')} -> "
              f"{res['data'].get('test_modalities')}: {_summary(res)}")
        print(f"metrics: {os.path.join(cfg['out'], 'metrics.json')}")
    return 0


def _load_kwargs(cfg: Dict) -> Dict:
    """load_trainable's overrides from an eval/explain config: --pretrained."""
    return {"pretrained": cfg["pretrained"]} if cfg["pretrained"] else {}


def _check_side_out(args, what: str) -> None:
    """eval/explain write into their own --out, never into a training run's folder."""
    from .errors import ConfigError
    from .validate import check_out, is_run_folder

    out = os.path.abspath(args.out)
    if is_run_folder(out) or out in (os.path.abspath(args.checkpoint),
                                     os.path.abspath(_model_dir(args.checkpoint))):
        raise ConfigError(f"--out {args.out!r} holds a training run; avpt {what} writes "
                          f"metrics.json and figures there: give another --out")
    check_out(args.out)


def _eval_config(args, saved: Dict) -> Dict:
    """The eval config: the training run's data settings (data set, root, modalities, data.*,
    seed, folds, fold), then --config, flags and --set on top; method/backbone/model.* are the
    saved model's."""
    run_cfg = saved.get("run") or {}
    base = {}
    if run_cfg:
        same_data = args.dataset is None or args.dataset == run_cfg.get("dataset")
        given = set_keys(args)
        for k in EVAL_FROM_RUN:
            if k not in run_cfg or k in given or (not same_data and k != "seed"):
                continue
            base[k] = run_cfg[k]  # (--set data.KEY=VALUE then changes one loader setting)
    if getattr(args, "modality", None) and base.get("test_modality"):
        # a transfer run tests on every image of its test_modality: --modality names the
        # modalities to evaluate, never one it trained on (whose images it has seen)
        seen = sorted(set(args.modality) & set(base.get("modality") or []))
        if seen:
            from .errors import ConfigError

            raise ConfigError(f"--modality {' '.join(args.modality)}: this transfer run trained on "
                              f"{' '.join(base['modality'])}, so its images are not a test set; "
                              f"evaluate on modalities it did not train on (it tested on "
                              f"{' '.join(base['test_modality'])})")
        base["test_modality"] = list(args.modality)
    extra = {"method": saved["method"], "backbone": saved["config"]["model_name"]}
    cfg = run_config(args, extra, base)
    model_dir = _model_dir(args.checkpoint)
    for run_folds in (os.path.join(args.checkpoint, "folds.json"),
                      os.path.join(os.path.dirname(os.path.abspath(model_dir)), "folds.json")):
        if cfg["folds_file"] is None and os.path.isfile(run_folds):
            cfg["folds_file"] = run_folds  # the training run's folds: its test fold stays unseen
    return cfg


# the settings that make an evaluation what it is (with the model): its owner identity
EVAL_IDENTITY = EVAL_FROM_RUN + ("pretrained",)


def _side_owner(args, kind: str, model_dir: str, cfg: Dict) -> tuple:
    """(kind, identity, description) of an eval/explain output, checked against --out's owner."""
    from .owner import check_owner, identity

    ident = identity({"model": os.path.abspath(model_dir),
                      **{k: cfg.get(k) for k in EVAL_IDENTITY}})
    check_owner(cfg["out"], kind, ident, args.overwrite)
    return kind, ident, f"of {os.path.abspath(model_dir)} on {cfg['dataset']}"


def cmd_eval(args) -> int:
    from .saved_eval import evaluate_checkpoint

    model_dir, saved = _saved_model(args)
    _check_side_out(args, "eval")
    cfg = _eval_config(args, saved)
    owner = _side_owner(args, "eval", model_dir, cfg)
    res = evaluate_checkpoint(model_dir, cfg, owner=owner)
    print(f"test: {_summary(res)}")
    print(f"metrics: {os.path.join(cfg['out'], 'metrics.json')}")
    return 0


def _cv(base: Dict, seeds: List[int], overwrite: bool = False) -> Dict:
    """k-fold x seeds runs of one config; writes OUT/cv_metrics.json; returns the summary."""
    from .metrics import aggregate
    from .run_io import write_json
    from .train import run

    runs, rows, by_group = [], [], {}
    folds_file = base["folds_file"] or os.path.join(base["out"], "folds.json")
    for seed in seeds:
        for fold in range(base["folds"]):
            cfg = copy.deepcopy(base)
            cfg.update(seed=seed, fold=fold, folds_file=folds_file,
                       out=os.path.join(base["out"], f"seed{seed}_fold{fold}"))
            res = run(cfg, kind="train", overwrite=overwrite)
            runs.append(res["test"])
            for group, metrics in (res.get("test_by") or {}).items():
                by_group.setdefault(group, []).append(metrics)
            rows.append({"seed": seed, "fold": fold, **res["test"]})
            print(f"seed {seed} fold {fold}: {_summary(res)}", flush=True)
    agg = aggregate(runs)
    summary_by = {group: aggregate(r) for group, r in by_group.items()}
    write_json(os.path.join(base["out"], "cv_metrics.json"),
                {"summary": agg, "runs": rows, "config": base, "folds_file": folds_file,
                 **({"summary_by": summary_by} if summary_by else {})})
    return agg


def _mean_std(agg: Dict, k: str) -> str:
    if k not in agg:
        return "n/a"
    unit = f" {agg[k]['unit']}" if agg[k].get("unit") else ""
    return f"{agg[k]['mean']:.4f} +- {agg[k]['std']:.4f}{unit}"


def cmd_cv(args) -> int:
    """Cross-validation; ``--variant all`` runs every variant of the YAML file (an ablation
    table) over the same folds and prints the table."""
    from .config import read_yaml
    from .run_io import write_json
    from .errors import ConfigError
    from .validate import check_out, run_lock

    seeds = args.seeds
    if seeds is not None and (not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"--seeds must be distinct integers >= 0, got {seeds}")
    from .owner import check_owner, claim, identity

    check_out(args.out)
    if args.variant == "all":
        if not args.config:
            raise ConfigError("--variant all needs --config FILE.yaml with variants")
        names = list(read_yaml(args.config).get("variants") or {})
        if not names:
            raise ConfigError(f"--variant all: {args.config} has no variants")
        out = args.out
        bases = {}
        for name in names:  # every variant's config is checked before the first run
            args.variant = name
            bases[name] = run_config(args, {"out": os.path.join(out, name)})
        table = {}
        ident = identity({"variants": bases, "seeds": seeds})
        check_owner(out, "cv", ident, args.overwrite)
        with run_lock(out, "cv --variant all"):
            claim(out, "cv", ident, f"ablation of {args.config} ({', '.join(names)})")
            for name, base in bases.items():
                base["folds_file"] = base["folds_file"] or os.path.join(out, "folds.json")
                print(f"== variant {name}", flush=True)
                table[name] = _cv(base, seeds or [base["seed"]], args.overwrite)
            write_json(os.path.join(out, "ablation.json"), table)
        keys = ("auc", "f1", "dice", "hd95")
        print(f"{'variant':<16}" + "".join(f"{k:>22}" for k in keys))
        for name, agg in table.items():
            print(f"{name:<16}" + "".join(f"{_mean_std(agg, k):>22}" for k in keys))
        print(f"metrics: {os.path.join(out, 'ablation.json')}")
        return 0
    base = run_config(args)
    ident = identity({"config": {k: v for k, v in base.items() if k != "out"}, "seeds": seeds})
    check_owner(base["out"], "cv", ident, args.overwrite)
    with run_lock(base["out"], "cv"):
        claim(base["out"], "cv", ident, f"{base['method']} on {base['dataset']}, "
                                        f"{base['folds']} folds")
        agg = _cv(base, seeds or [base["seed"]], args.overwrite)
    for k in ("auc", "f1", "dice", "iou", "hd95"):
        if k in agg:
            print(f"{k}: {_mean_std(agg, k)} (n={agg[k]['n']})")
    print(f"metrics: {os.path.join(base['out'], 'cv_metrics.json')}")
    return 0


def cmd_explain(args) -> int:
    from .checkpoint import load_trainable
    from .methods import get_method_class
    from .figures import pick_examples
    from .report import write_html
    from .runtime import op_backend, resolve_device
    from .run_data import build_data
    from .errors import ConfigError
    from .validate import check_paths, run_lock

    if args.num < 1:
        raise ConfigError(f"--num must be an integer >= 1, got {args.num}")
    model_dir, saved = _saved_model(args)
    if not get_method_class(saved["method"]).has_report_sections:
        raise ConfigError(f"avpt explain needs a model with explanation figures (A-VPT: rollout "
                          f"of its prompts), got {saved['method']!r}")
    _check_side_out(args, "explain")
    cfg = _eval_config(args, saved)
    check_paths(cfg)
    from .owner import claim

    owner = _side_owner(args, "explain", model_dir, cfg)
    device = resolve_device(cfg["device"])
    with run_lock(cfg["out"], "explain"), op_backend(cfg):
        claim(cfg["out"], *owner)
        model = load_trainable(model_dir, **_load_kwargs(cfg)).to(device)
        _, test_set, _ = build_data(cfg, int(model.visual.image_size[0]), cfg["out"], training=False)
        fig_dir = os.path.join(cfg["out"], "figures")
        os.makedirs(fig_dir, exist_ok=True)
        figs = model.report_sections(test_set, pick_examples(test_set, args.num), device, fig_dir)
        path = write_html(os.path.join(cfg["out"], "explain.html"), "A-VPT explanations", [], figs)
    print(f"figures: {', '.join(str(f) for f in figs.values())}\nreport: {path}")
    return 0


def cmd_demo(args) -> int:
    """Phantom -> methods side by side (classification + segmentation, bootstrap intervals) ->
    MG->US transfer -> report.html (``avpt.demo.run``)."""
    import torch

    from .demo import run as demo_run
    from .errors import ConfigError

    gpu = torch.cuda.is_available() and args.device != "cpu"
    config = args.config or str(CONFIG_DIR / ("demo_gpu.yaml" if gpu else "demo_cpu.yaml"))
    if args.modality:
        raise ConfigError("avpt demo takes no --modality (the demo config's); --transfer FROM TO "
                          "sets the transfer's")
    if args.method:
        raise ConfigError("avpt demo takes --methods NAME [NAME ...], not --method")
    flags = {k: v for k, v in run_overrides(args).items()
             if v is not None and k not in ("out", "pretrained", "method", "modality")}
    # the shipped weights are the tiny backbone's; the GPU demo's ViT-B/16 needs --pretrained
    pretrained = args.pretrained or (None if gpu else "default")
    return demo_run(args.out, config=config, pretrained=pretrained, methods=args.methods,
                    transfer=tuple(args.transfer), sets=args.sets, overrides=flags,
                    overwrite=args.overwrite)


def _run_command(sub, name: str, func, help: str, description: str) -> argparse.ArgumentParser:
    """A sub-command that takes the run options (``--out`` defaults to runs/NAME)."""
    p = sub.add_parser(name, help=help, description=description)
    add_run_args(p, f"runs/{name}")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    from .validate import OneLineParser

    parser = OneLineParser(prog="avpt", description="Anatomy-guided Visual Prompt Tuning")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _run_command(sub, "demo", cmd_demo,
                     "the main job: phantom training, evaluation, transfer, report",
                     "avpt demo: A-VPT on the synthetic phantom, one cross-modal transfer, "
                     "report.html")
    p.add_argument("--transfer", nargs=2, default=("MG", "US"), metavar=("FROM", "TO"),
                   choices=MODALITIES, help="transfer modalities (default MG US)")
    p.add_argument("--methods", nargs="+", default=list(DEMO_METHODS),
                   help="methods side by side, any registered method (default "
                        f"{' '.join(DEMO_METHODS)}: 196 s on 2 CPU cores; also adapter, coop, "
                        "cilmp, biomedap, ...)")
    from .pretrain import add_parser as add_pretrain_parser
    add_pretrain_parser(sub)
    from .llm_knowledge import add_parser as add_knowledge_parser
    add_knowledge_parser(sub)
    _run_command(sub, "train", cmd_train, "train and evaluate one run",
                 "avpt train: train and evaluate one run")
    p = _run_command(sub, "eval", cmd_eval, "evaluate a saved model",
                     "avpt eval: evaluate a saved model; data settings default to the training "
                     "run's, the model is the saved one")
    p.add_argument("--checkpoint", required=True, help="a run folder or its model/ folder")
    p = _run_command(sub, "transfer", cmd_transfer, "train on one modality/data set, test on another",
                     "avpt transfer: train on one modality/data set, test on another")
    p.add_argument("--train-modality", nargs="+", choices=MODALITIES)
    p.add_argument("--test-modality", nargs="+", choices=MODALITIES)
    p.add_argument("--test-dataset", choices=DATASETS)
    p.add_argument("--test-data-root")
    p = _run_command(sub, "cv", cmd_cv, "k-fold cross-validation over seeds (mean +- std); "
                     "--variant all runs an ablation table",
                     "avpt cv: patient-level k-fold cross-validation over seeds")
    p.add_argument("--seeds", type=int, nargs="+")
    p = _run_command(sub, "explain", cmd_explain,
                     "rollout and prompt-type attention figures of a saved model",
                     "avpt explain: rollout and prompt-type attention figures")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num", type=int, default=4, help="number of images")

    p = sub.add_parser("params", help="trainable-parameter table (avpt params --help)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("compare", help="op-level backend comparison (avpt compare --help)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv=None) -> int:
    """Run the CLI; returns the exit code: 0 done, 2 a mistake in what was given (one line),
    1 a full disk or other I/O failure (one line), 130 Ctrl-C, 143 SIGTERM."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        return _main(argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("params", "compare"):  # their own parsers take every option
        args = argparse.Namespace(command=argv[0], rest=argv[1:],
                                  func=cmd_params if argv[0] == "params" else cmd_compare)
    else:
        args = parser.parse_args(argv)
    if hasattr(args, "verbose"):
        _logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM: no traceback
        term = isinstance(exc, Terminated)
        print(f"avpt {args.command}: {interrupted(args, 'terminated (SIGTERM)' if term else 'interrupted')}",
              file=sys.stderr)
        return 143 if term else 130
    except (ValueError, OSError) as exc:
        return error_line(f"avpt {args.command}", exc)


if __name__ == "__main__":
    sys.exit(main())
