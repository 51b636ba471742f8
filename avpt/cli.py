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

Every run writes OUT/metrics.json (a ``test`` object with auc, f1, dice, iou, hd95 and the
resolved config) and, unless --set report=false, figures and OUT/report.html.
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
from typing import Dict, List, Optional

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _add_run_args(p: argparse.ArgumentParser, out_default: Optional[str] = None) -> None:
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--variant", help="a named variant of the YAML file (ablation tables)")
    p.add_argument("--dataset", choices=("phantom", "busi", "inbreast", "duke"))
    p.add_argument("--data-root", help="folder of the real data set")
    p.add_argument("--modality", nargs="+", choices=("MG", "US", "MRI"),
                   help="modalities to use (phantom; real data sets have one)")
    p.add_argument("--method", help="avpt (default), linear, full, vpt, lora, adapter, coop")
    p.add_argument("--backbone", help="ViT-B-16 (default), tiny, or an open_clip config name")
    p.add_argument("--pretrained", help="local open_clip checkpoint (nothing is downloaded)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--fold", type=int, help="test fold of the patient-level k-fold split")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"))
    p.add_argument("--compile", choices=("none", "default", "reduce-overhead"),
                   help="compile the whole training step (forward, losses, backward, AdamW) as one "
                        "graph; reduce-overhead: CUDA graphs on a GPU (default none)")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip unreadable/corrupt files (counted in metrics.json) instead of stopping")
    p.add_argument("--out", default=out_default, help="output folder")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set model.schedule=late --set lr=3e-4")
    p.add_argument("-v", "--verbose", action="store_true")


def _config(args, extra: Optional[Dict] = None) -> Dict:
    from .train import load_config

    overrides = dict(dataset=args.dataset, data_root=args.data_root, modality=args.modality,
                     method=args.method, backbone=args.backbone, pretrained=args.pretrained,
                     epochs=args.epochs, batch_size=args.batch_size, fold=args.fold, seed=args.seed,
                     device=args.device, amp=args.amp, skip_bad=args.skip_bad, out=args.out,
                     compile=getattr(args, "compile", None))
    overrides.update(extra or {})
    return load_config(args.config, args.variant, overrides, args.sets)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("avpt.train").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")


def _summary(res: Dict) -> str:
    t = res.get("test", {})
    vals = " ".join(f"{k}={t[k]:.4f}" if isinstance(t.get(k), float) else f"{k}=n/a"
                    for k in ("auc", "f1", "dice", "iou", "hd95"))
    return vals


def cmd_train(args) -> int:
    from .train import run

    cfg = _config(args)
    res = run(cfg)
    if res.get("test"):
        print(f"test: {_summary(res)}")
        print(f"metrics: {os.path.join(cfg['out'], 'metrics.json')}")
        if res.get("report"):
            print(f"report: {res['report']}")
    return 0


def cmd_transfer(args) -> int:
    if not (args.test_modality or args.test_dataset):
        raise SystemExit("avpt transfer: give --test-modality and/or --test-dataset")
    extra = dict(test_modality=args.test_modality, test_dataset=args.test_dataset,
                 test_data_root=args.test_data_root)
    if args.train_modality:
        extra["modality"] = args.train_modality
    args.modality = None
    from .train import run

    cfg = _config(args, extra)
    res = run(cfg)
    if res.get("test"):
        print(f"transfer {res['data'].get('train_modalities')} -> "
              f"{res['data'].get('test_modalities')}: {_summary(res)}")
        print(f"metrics: {os.path.join(cfg['out'], 'metrics.json')}")
    return 0


def _model_dir(path: str) -> str:
    return os.path.join(path, "model") if os.path.isdir(os.path.join(path, "model")) else path


def cmd_eval(args) -> int:
    from .train import evaluate_checkpoint

    cfg = _config(args)
    run_folds = os.path.join(args.checkpoint, "folds.json")
    if cfg["folds_file"] is None and os.path.isfile(run_folds):
        cfg["folds_file"] = run_folds  # the training run's folds: its test fold stays unseen
    res = evaluate_checkpoint(_model_dir(args.checkpoint), cfg)
    print(f"test: {_summary(res)}")
    print(f"metrics: {os.path.join(cfg['out'], 'metrics.json')}")
    return 0


def _cv(base: Dict, seeds: List[int]) -> Dict:
    """k-fold x seeds runs of one config; writes OUT/cv_metrics.json; returns the summary."""
    from .metrics import aggregate
    from .train import _write_json, run

    runs, rows = [], []
    folds_file = base["folds_file"] or os.path.join(base["out"], "folds.json")
    for seed in seeds:
        for fold in range(base["folds"]):
            cfg = copy.deepcopy(base)
            cfg.update(seed=seed, fold=fold, folds_file=folds_file,
                       out=os.path.join(base["out"], f"seed{seed}_fold{fold}"))
            res = run(cfg)
            runs.append(res["test"])
            rows.append({"seed": seed, "fold": fold, **res["test"]})
            print(f"seed {seed} fold {fold}: {_summary(res)}", flush=True)
    agg = aggregate(runs)
    _write_json(os.path.join(base["out"], "cv_metrics.json"),
                {"summary": agg, "runs": rows, "config": base, "folds_file": folds_file})
    return agg


def _mean_std(agg: Dict, k: str) -> str:
    return f"{agg[k]['mean']:.4f} +- {agg[k]['std']:.4f}" if k in agg else "n/a"


def cmd_cv(args) -> int:
    """Cross-validation; ``--variant all`` runs every variant of the YAML file (an ablation
    table) over the same folds and prints the table."""
    from .train import _write_json

    seeds = args.seeds
    if args.variant == "all":
        import yaml

        if not args.config:
            raise SystemExit("avpt cv --variant all needs --config FILE.yaml with variants")
        with open(args.config) as f:
            names = list((yaml.safe_load(f) or {}).get("variants", {}))
        out = args.out
        table = {}
        for name in names:
            args.variant = name
            base = _config(args, {"out": os.path.join(out, name)})
            base["folds_file"] = base["folds_file"] or os.path.join(out, "folds.json")
            print(f"== variant {name}", flush=True)
            table[name] = _cv(base, seeds or [base["seed"]])
        _write_json(os.path.join(out, "ablation.json"), table)
        keys = ("auc", "f1", "dice", "hd95")
        print(f"{'variant':<16}" + "".join(f"{k:>22}" for k in keys))
        for name, agg in table.items():
            print(f"{name:<16}" + "".join(f"{_mean_std(agg, k):>22}" for k in keys))
        print(f"metrics: {os.path.join(out, 'ablation.json')}")
        return 0
    base = _config(args)
    agg = _cv(base, seeds or [base["seed"]])
    for k in ("auc", "f1", "dice", "iou", "hd95"):
        if k in agg:
            print(f"{k}: {_mean_std(agg, k)} (n={agg[k]['n']})")
    print(f"metrics: {os.path.join(base['out'], 'cv_metrics.json')}")
    return 0


def cmd_explain(args) -> int:
    from .checkpoint import load_trainable
    from .report import _pick, rollout_and_prompt_types, write_html
    from .train import build_data, resolve_device

    cfg = _config(args)
    device = resolve_device(cfg["device"])
    model = load_trainable(_model_dir(args.checkpoint)).to(device)
    if model.name != "avpt":
        raise SystemExit(f"avpt explain needs an A-VPT model (rollout of its prompts), got {model.name!r}")
    _, test_set, _ = build_data(cfg, int(model.visual.image_size[0]), cfg["out"])
    fig_dir = os.path.join(cfg["out"], "figures")
    os.makedirs(fig_dir, exist_ok=True)
    roll, types = rollout_and_prompt_types(model, test_set, _pick(test_set, args.num), device, fig_dir)
    figs = {"rollout overlays (Eq. 18)": roll, "attention by prompt type (Figs. 7-8)": types}
    path = write_html(os.path.join(cfg["out"], "explain.html"), "A-VPT explanations", [], figs)
    print(f"figures: {roll}, {types}\nreport: {path}")
    return 0


def cmd_params(args) -> int:
    from .params import main as params_main

    return params_main(args.rest)


def cmd_compare(args) -> int:
    from avpt_kernels import compare

    return compare.main(args.rest)


def cmd_demo(args) -> int:
    """Phantom -> A-VPT (classification + segmentation) -> MG->US transfer -> report.html."""
    import torch

    from .report import write_html
    from .train import run

    t0 = time.time()
    gpu = torch.cuda.is_available() and args.device != "cpu"
    config = args.config or str(CONFIG_DIR / ("demo_gpu.yaml" if gpu else "demo_cpu.yaml"))
    if not os.path.isfile(config):
        raise SystemExit(f"{config} not found (configs/ ships with the repository)")
    args.config, args.variant = config, None
    out = args.out
    main_cfg = _config(args, {"out": os.path.join(out, "avpt")})
    print(f"[demo] A-VPT on the synthetic phantom ({', '.join(main_cfg['modality'] or ['MG', 'US', 'MRI'])}), "
          f"backbone {main_cfg['backbone']}, {main_cfg['epochs']} epochs, device "
          f"{'cuda' if gpu else 'cpu'}", flush=True)
    main_res = run(main_cfg)
    print(f"[demo] fold {main_cfg['fold']} test: {_summary(main_res)}", flush=True)
    src, dst = args.transfer
    tr_cfg = _config(args, {"out": os.path.join(out, f"transfer_{src}_to_{dst}"), "modality": [src],
                            "test_modality": [dst]})
    tr_cfg["report"] = False
    print(f"[demo] cross-modal transfer: train on {src}, test on {dst} (no fine-tuning)", flush=True)
    tr_res = run(tr_cfg)
    print(f"[demo] transfer {src}->{dst} test: {_summary(tr_res)}", flush=True)
    notes = (f"Main job of avpt: A-VPT trained on the synthetic breast phantom ({'GPU' if gpu else 'CPU'}, "
             f"backbone {main_cfg['backbone']}"
             f"{'' if main_cfg['pretrained'] else ', random backbone weights: the numbers only show that the pipeline works'}). "
             f"Total time {time.time() - t0:.0f} s.")
    report = write_html(os.path.join(out, "report.html"), "A-VPT demo report",
                        [("A-VPT, phantom " + main_res["data"]["split"], main_res),
                         (f"A-VPT transfer {src} -> {dst}", tr_res)],
                        main_res.get("figures", {}), notes)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"main": main_res.get("test"), "transfer": tr_res.get("test"),
                   "time_s": time.time() - t0}, f, indent=2, default=str)
    print(f"[demo] done in {time.time() - t0:.0f} s")
    print(f"[demo] report: {os.path.abspath(report)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="avpt", description="Anatomy-guided Visual Prompt Tuning")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job: phantom training, evaluation, transfer, report")
    _add_run_args(p, "runs/demo")
    p.add_argument("--transfer", nargs=2, default=("MG", "US"), metavar=("FROM", "TO"))
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train and evaluate one run")
    _add_run_args(p, "runs/train")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved model")
    _add_run_args(p, "runs/eval")
    p.add_argument("--checkpoint", required=True, help="a run folder or its model/ folder")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("transfer", help="train on one modality/data set, test on another")
    _add_run_args(p, "runs/transfer")
    p.add_argument("--train-modality", nargs="+", choices=("MG", "US", "MRI"))
    p.add_argument("--test-modality", nargs="+", choices=("MG", "US", "MRI"))
    p.add_argument("--test-dataset", choices=("phantom", "busi", "inbreast", "duke"))
    p.add_argument("--test-data-root")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("cv", help="k-fold cross-validation over seeds (mean +- std); "
                            "--variant all runs an ablation table")
    _add_run_args(p, "runs/cv")
    p.add_argument("--seeds", type=int, nargs="+")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("explain", help="rollout and prompt-type attention figures of a saved model")
    _add_run_args(p, "runs/explain")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num", type=int, default=4, help="number of images")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("params", help="trainable-parameter table (python -m avpt.params)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("compare", help="op-level backend comparison (avpt_kernels.compare)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_compare)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("params", "compare"):  # their own parsers take every option
        rest = argparse.Namespace(rest=argv[1:])
        return cmd_params(rest) if argv[0] == "params" else cmd_compare(rest)
    args = parser.parse_args(argv)
    if hasattr(args, "verbose"):
        _logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        from .data import DataError

        if isinstance(exc, (DataError, FileNotFoundError)) or os.environ.get("AVPT_TRACEBACK") is None:
            print(f"avpt {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
