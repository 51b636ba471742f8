"""Parameter accounting: trainable and total parameters of a method, and the trainable share of
the visual tower (the paper's "% of full fine-tuning" denominator: the ViT's parameters).

``python -m avpt.params [--model ViT-B-16] [--methods avpt lora ...]`` prints the table and the
A-VPT breakdown (the lead wires this to ``avpt params``)."""
from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

from torch import nn

from .backbone import VIT_B16, visual_param_count


@dataclass
class ParamReport:
    method: str
    trainable: int
    total: int          # every parameter of the method (both towers, heads, extras)
    visual: int         # parameters of the frozen visual tower alone
    breakdown: Dict[str, int]  # trainable parameters per top-level part
    breakdown_title: Optional[str] = None  # the method's ``param_breakdown_title``
    budget_percent: Optional[float] = None  # the method's ``param_budget_percent``

    @property
    def over_budget(self) -> bool:
        return self.budget_percent is not None and self.percent_of_visual > self.budget_percent

    @property
    def percent_of_visual(self) -> float:
        return 100.0 * self.trainable / self.visual


def _part(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "backbone":
        return "backbone." + parts[1]
    return parts[0]


def parameter_report(method: nn.Module) -> ParamReport:
    """Trainable/total parameters of ``method`` and its share of the visual tower."""
    breakdown: Dict[str, int] = {}
    trainable = total = 0
    for name, p in method.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            key = _part(name)
            breakdown[key] = breakdown.get(key, 0) + p.numel()
    return ParamReport(getattr(method, "name", type(method).__name__), trainable, total,
                       visual_param_count(method.backbone), breakdown,
                       getattr(method, "param_breakdown_title", None),
                       getattr(method, "param_budget_percent", None))


def format_reports(reports: List[ParamReport]) -> str:
    lines = [f"{'method':<16} {'trainable':>12} {'total':>12} {'% of visual':>12}"]
    for r in reports:
        lines.append(f"{r.method:<16} {r.trainable:>12,} {r.total:>12,} {r.percent_of_visual:>11.3f}%")
    if reports:
        lines.append(f"(visual tower: {reports[0].visual:,} parameters)")
    for r in reports:
        if r.breakdown_title:
            lines.append(f"\n{r.breakdown_title}:")
            for k, v in r.breakdown.items():
                lines.append(f"  {k:<16} {v:>10,}  ({100.0 * v / r.visual:.3f}%)")
    return "\n".join(lines)


def report_methods(model_name: str = VIT_B16, methods: Optional[List[str]] = None,
                   presets: bool = False, **overrides) -> List[ParamReport]:
    """Build each method on ``model_name`` (random weights suffice to count) and report it; with
    ``presets`` also each of its config's named presets (``PRESETS``, e.g. ``vpt[table10]``)."""
    from .methods import method_names

    reports = []
    for name in methods or method_names():
        reports.append(_report_one(name, model_name, overrides))
        if presets and "preset" not in overrides:
            from .methods import get_config_class

            for preset in get_config_class(name).PRESETS:  # e.g. vpt[table10]
                report = _report_one(name, model_name, dict(overrides, preset=preset))
                report.method = f"{name}[{preset}]"
                reports.append(report)
    return reports


def _report_one(name: str, model_name: str, overrides: Dict) -> ParamReport:
    from .methods import build_method

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = build_method(name, model_name=model_name, **overrides)
    report = parameter_report(method)
    del method
    gc.collect()
    return report


def main(argv=None) -> int:
    from .methods import method_names
    from .backbone import BACKBONE_ALIASES
    from .errors import ConfigError
    from .validate import OneLineParser, check_backbone

    parser = OneLineParser(prog="avpt params", description=__doc__.splitlines()[0])
    parser.add_argument("--model", "--backbone", dest="model", default=VIT_B16,
                        help="backbone: ViT-B-16 (default), tiny, or an open_clip config name "
                             "(the names avpt train --backbone takes)")
    parser.add_argument("--methods", nargs="*", default=None,
                        help=f"methods (default: all of {', '.join(method_names())})")
    args = parser.parse_args(argv)
    model = BACKBONE_ALIASES.get(args.model.lower(), args.model)
    try:
        check_backbone(model)
    except ConfigError as exc:
        raise ConfigError(f"--model: {exc}") from None
    bad = [m for m in args.methods or [] if m not in method_names()]
    if bad or args.methods == []:
        raise ConfigError(f"--methods must name methods among {', '.join(method_names())}, "
                          f"got {bad or 'none'}")
    reports = report_methods(model, args.methods, presets=True)
    print(format_reports(reports))
    if any("[" in r.method for r in reports):
        print("method[preset]: the named preset of the method's config (--set model.preset=NAME); "
              "table10 reproduces the trainable shares of the paper's Table 10 on ViT-B-16")
    over = [r for r in reports if r.over_budget] if model == VIT_B16 else []
    for r in over:
        print(f"{r.method} exceeds its {r.budget_percent}% budget")
    return 1 if over else 0


if __name__ == "__main__":  # as ``avpt params``: a mistake is one line and exit code 2
    import sys

    from .cli_exit import error_line

    try:
        code = main(sys.argv[1:])
    except (ValueError, OSError) as exc:
        code = error_line("avpt params", exc)
    raise SystemExit(code)
