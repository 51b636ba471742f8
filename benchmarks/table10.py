"""Write ``TABLE10.md``: the paper's Table 10 beside this run's model-level rows.

``python -m benchmarks.table10 [RESULTS.json] [--out benchmarks/results/TABLE10.md]`` (default:
the newest JSON in benchmarks/results/). ``pytest benchmarks/`` also writes it at the end of a run.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Dict, List, Optional

from benchmarks.harness import RESULTS_DIR

# Paper, Table 10 (A100 40GB, ViT-B/16, batch 32): trainable %, latency ms, memory GB.
PAPER = {
    "full": ("Full Fine-tuning", 100.0, 14.2, 9.3),
    "adapter": ("Adapter-Tuning", 3.6, 15.1, 9.5),
    "lora": ("LoRA", 2.8, 14.8, 9.6),
    "vpt": ("Visual Prompt Tuning (VPT)", 2.1, 15.3, 9.8),
    "avpt-fused": ("A-VPT (ours)", 1.87, 15.4, 9.9),
}
ORDER = ("backbone", "full", "adapter", "lora", "vpt", "avpt-eager", "avpt-fused", "cilmp", "biomedap")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _gb(value) -> Optional[float]:
    return None if value is None else value / 2**30


def targets(rows: Dict[str, dict]) -> List[str]:
    """The GPU targets of the benchmark issue, each with whether it holds in this run."""
    out = []
    fused, backbone = rows.get("avpt-fused", {}), rows.get("backbone", {})
    vpt, eager = rows.get("vpt", {}), rows.get("avpt-eager", {})

    def check(text, ok):
        out.append(f"- {text}: **{'holds' if ok else 'does not hold'}**" if ok is not None
                   else f"- {text}: not measured in this run")

    def ratio(a, b):
        return a / b if a and b else None

    r = ratio(fused.get("infer_ms"), backbone.get("infer_ms"))
    check(f"fused A-VPT inference within 1.05x of the frozen backbone (x{_fmt(r, '.3f')})",
          None if r is None else r <= 1.05)
    r = ratio(fused.get("train_step_ms"), vpt.get("train_step_ms"))
    check(f"fused A-VPT training step within 1.05x of VPT-deep (x{_fmt(r, '.3f')})",
          None if r is None else r <= 1.05)
    r = ratio(eager.get("train_step_ms"), fused.get("train_step_ms"))
    check(f"fused A-VPT training step >= 1.5x faster than A-VPT on the eager reference "
          f"(x{_fmt(r, '.2f')})", None if r is None else r >= 1.5)
    mem = _gb(fused.get("infer_peak_mem_bytes"))
    check(f"fused A-VPT inference peak memory under 2 GB ({_fmt(mem, '.2f')} GB)",
          None if mem is None else mem < 2.0)
    pct = fused.get("trainable_percent", eager.get("trainable_percent"))
    check(f"A-VPT trainable share at most 2.0% ({_fmt(pct, '.3f')}%)",
          None if pct is None else pct <= 2.0)
    return out


def cpu_note(name: str, row: dict, env: dict) -> str:
    """What a CPU smoke-run row means (the table's last column): the shares are of the tiny
    backbone's visual tower, the fused times are the Triton interpreter's."""
    notes = []
    tiny = "tiny" in str(row.get("model", ""))
    pct = row.get("trainable_percent")
    if tiny and pct is not None and name == "full":
        notes.append(f"{pct:.1f}% > 100%: the heads and decoder train too, counted against the "
                     "tiny visual tower")
    elif tiny and pct is not None and name != "backbone":
        ref = " (A-VPT there: 1.81%)" if name.startswith("avpt") else ""
        notes.append(f"{pct:.1f}% of the tiny visual tower (width 64, 4 layers): heads, prompts "
                     f"and PIMs do not shrink with it; ViT-B/16 shares: `avpt params`{ref}")
    timed = row.get("infer_ms") is not None or row.get("train_step_ms") is not None
    if name == "avpt-fused" and env.get("triton_interpret"):
        notes.append("fused kernels in the Triton interpreter (numpy, one program at a time): "
                     "far slower than the eager row, says nothing about GPU speed")
    elif timed:
        notes.append("CPU time of the tiny model, not a GPU latency")
    return "; ".join(notes) or "-"


def render(data: dict) -> str:
    env = data["environment"]
    rows = {r["method"]: r for r in data["rows"] if r.get("kind") == "model"}
    backbone_ms = rows.get("backbone", {}).get("infer_ms")
    on_gpu = env["device"] and not env["device"].startswith("cpu")
    lines = [
        "# Table 10: parameter efficiency and complexity",
        "",
        f"This run: **{env['device']}**, torch {env['torch']}, triton {env.get('triton')}, "
        f"started {data['started']}.",
    ]
    model = next(iter(rows.values()), {})
    lines.append(f"Backbone {model.get('model', '?')}, batch {model.get('batch', '?')}, "
                 f"autocast {model.get('autocast', '?')}. Paper: A100 40GB, ViT-B/16, batch 32.")
    if not on_gpu:
        lines += ["", "**CPU smoke run**: tiny backbone, small batch, fused kernels through the "
                  "Triton interpreter. Times and ratios below say nothing about GPU speed; "
                  "only the parameter shares carry over (for the tiny backbone)."]
    note_col = not on_gpu
    lines += ["", "| method | trainable % (paper) | latency ms/image (paper) | ms/batch | x backbone "
              "| train step ms | infer peak GB (paper) | train peak GB | launches/forward |"
              + (" read this row as |" if note_col else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if note_col else "")]
    for name in ORDER:
        r = rows.get(name)
        paper = PAPER.get(name)
        if r is None:
            continue
        note = f" {cpu_note(name, r, env)} |" if note_col else ""
        if r.get("status", "ok") != "ok":
            lines.append(f"| {name} | {r['status']} |  |  |  |  |  |  |  |" + note)
            continue
        p_pct, p_ms, p_mem = (f" ({paper[1]})", f" ({paper[2]})", f" ({paper[3]})") if paper else ("", "", "")
        x = r["infer_ms"] / backbone_ms if r.get("infer_ms") and backbone_ms else None
        lines.append(
            f"| {name} | {_fmt(r.get('trainable_percent'), '.2f')}{p_pct} | "
            f"{_fmt(r.get('infer_ms_per_image'), '.3f')}{p_ms} | {_fmt(r.get('infer_ms'), '.2f')} | "
            f"{_fmt(x, '.3f')} | {_fmt(r.get('train_step_ms'), '.2f')} | "
            f"{_fmt(_gb(r.get('infer_peak_mem_bytes')), '.2f')}{p_mem} | "
            f"{_fmt(_gb(r.get('train_peak_mem_bytes')), '.2f')} | "
            f"{r.get('launches_per_forward', '-')} |" + note)
    kind = model.get("launch_kind", "")
    lines += ["", f"Launches counted as {kind}. Latency is inference of one batch divided by the "
              "batch size; train step = forward + CLS/SEG loss + backward + AdamW step.", "",
              "## Targets", ""]
    if on_gpu:
        lines += targets(rows)
    else:
        lines.append("The targets (fused A-VPT inference within 1.05x of the backbone, training step "
                     "within 1.05x of VPT-deep and >= 1.5x faster than eager, inference peak "
                     "< 2 GB, trainable share <= 2.0% on ViT-B/16) are judged on a GPU run only.")
    lines += launch_section(data)
    lines += compiled_step_section(data)
    lines += graphed_section(data)
    lines += ["", "Results JSON: `benchmarks/results/<device>_<date>[_<HHMMSS>].json` (a later run "
              "on the same day gets its own file), or under `$AVPT_BENCH_RESULTS` when set; "
              "`python -m benchmarks.table10 FILE.json` rewrites this table from one of them."]
    return "\n".join(lines) + "\n"


def launch_section(data: dict) -> List[str]:
    """The launch counts (``kind == "launches"`` rows of benchmarks/launches.py), per config."""
    rows = [r for r in data["rows"] if r.get("kind") == "launches"]
    if not rows:
        return []
    lines = ["", "## Kernel launches and host syncs", "",
             "Counted on fake CUDA tensors (FakeTensorMode, no GPU), bf16 autocast (frozen "
             "weights stored in bf16 where a row's `frozen_weights` says so): aten ops "
             "that launch a kernel (views, allocations and host-only ops excluded; `_foreach_*` "
             "as multi_tensor_apply launches), Triton launches of the fused ops' launchers, host "
             "syncs (`.item()`/`bool()`/data-dependent shapes/host-to-device copies). Training "
             "step = forward + CLS/SEG loss + backward + AdamW(foreach) step. See "
             "`benchmarks/launches.py`."]
    configs = []
    for r in rows:
        key = (r["model"], r["batch"])
        if key not in configs:
            configs.append(key)
    order = {name: i for i, name in enumerate(("backbone", "linear") + ORDER[1:])}
    for model, batch in configs:
        sel = sorted((r for r in rows if (r["model"], r["batch"]) == (model, batch)),
                     key=lambda r: order.get(r["method"], 99))
        bwd_on = next((r["train"]["backward_on"] for r in sel if "train" in r), "-")
        lines += ["", f"**{model}, batch {batch}** (backward counted on {bwd_on}"
                  + (": fake CPU tensors, CPU-autocast casts replaced by the CUDA forward's"
                     if bwd_on == "cpu-fake" else "") + ")", "",
                  "| method | inference: aten | Triton | syncs | train step: aten | Triton "
                  "| syncs | fwd / bwd / optimizer aten |", "|---|---|---|---|---|---|---|---|"]
        for r in sel:
            i, t = r["inference"], r.get("train")
            tr = "- | - | - | -" if t is None else (
                f"{t['step']['aten']:,} | {t['step']['triton']} | {t['step']['syncs']} | "
                f"{t['forward']['aten']:,} / {t['backward']['aten']:,} / {t['optimizer']['aten']}")
            lines.append(f"| {r['method']} | {i['aten']:,} | {i['triton']} | {i['syncs']} | {tr} |")
        fused = next((r for r in sel if r["method"] == "avpt-fused"), None)
        if fused is not None:
            secs = fused["inference"]["by_section"]
            parts = ", ".join(f"{s} {c['aten']}+{c['triton']}" for s, c in secs.items())
            lines += ["", f"avpt-fused inference by section (aten+Triton): {parts}."]
    return lines


def compiled_step_section(data: dict) -> List[str]:
    """The whole-step compile rows (``kind == "compiled-step"``, benchmarks/test_table10.py) beside
    the same method's uncompiled training step: issue 11's "with and without" CUDA graphs."""
    rows = [r for r in data["rows"] if r.get("kind") == "compiled-step"]
    if not rows:
        return []
    eager = {r.get("method"): r for r in data["rows"] if r.get("kind") == "model"
             and r.get("train_step_ms") is not None}
    lines = ["", "## Whole training step compiled", "",
             "The CLS + SEG training step with AdamW compiled as one graph "
             "(`avpt.compiled_step.WholeStep`, `torch.compile(fullgraph=True)`; mode `reduce-overhead` "
             "captures CUDA graphs) beside the uncompiled step of the table above.", "",
             "| row | status | compile s | train step ms | uncompiled step ms |", "|---|---|---|---|---|"]
    for r in rows:
        base = eager.get(r["method"].split("+compile-")[0], {})
        ms = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"| {r['method']} | {r.get('status', '-')} | {ms(r.get('compile_s'))} | "
                     f"{ms(r.get('train_step_ms'))} | {ms(base.get('train_step_ms'))} |")
    return lines


def graphed_section(data: dict) -> List[str]:
    """Eager beside graphed (kind ``graphed``: inference replayed from a CUDA graph; the
    training step's ``+compile-reduce-overhead`` row), ratios graphed against graphed, and
    issue 23's targets on a GPU run."""
    graphed = {r["method"]: r for r in data["rows"] if r.get("kind") == "graphed"}
    if not graphed:
        return []
    eager = {r["method"]: r for r in data["rows"] if r.get("kind") == "model"}
    steps = {r["method"].split("+compile-")[0]: r for r in data["rows"]
             if r.get("kind") == "compiled-step" and r.get("compile") == "reduce-overhead"
             and r.get("status") == "ok"}
    ms = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731

    def ratio(a, b):
        return a / b if a and b else None

    base_infer = graphed.get("backbone", {}).get("infer_ms")
    base_step = steps.get("vpt", {}).get("train_step_ms")
    lines = ["", "## Graphed inference and training step (issue 23)", "",
             "Inference replayed from a CUDA graph per batch shape (`avpt.graphed.GraphedInference`, "
             "what `avpt eval` runs: input copy, replay, output copy), the training step as "
             "`WholeStep` under `torch.compile(mode=\"reduce-overhead\")` (inductor's CUDA graphs); "
             "the ratios compare graphed with graphed. Frozen weights: how the frozen backbone's "
             "projection weights are stored (bf16 under bf16 autocast on a GPU, "
             "`avpt.frozen_weights`), the same in the eager rows. GPU busy: the profiler's summed "
             "kernel time of one call.", "",
             "| method | frozen weights | infer ms eager | infer ms graphed | x graphed backbone "
             "| GPU busy ms | wall / busy | step ms eager | step ms graphed | x graphed VPT-deep |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ORDER:
        g = graphed.get(name)
        if g is None:
            continue
        e, st = eager.get(name, {}), steps.get(name, {})
        if g.get("status", "ok") != "ok":
            lines.append(f"| {name} | {g.get('frozen_weights', '-')} | {ms(e.get('infer_ms'))} | "
                         f"{g['status']} |  |  |  | {ms(e.get('train_step_ms'))} |  |  |")
            continue
        wob = g.get("wall_over_busy")
        lines.append(
            f"| {name} | {g.get('frozen_weights', '-')} | {ms(e.get('infer_ms'))} | "
            f"{ms(g.get('infer_ms'))} | {_fmt(ratio(g.get('infer_ms'), base_infer), '.3f')} | "
            f"{ms(g.get('gpu_busy_ms'))} | {_fmt(wob, '.3f')} | {ms(e.get('train_step_ms'))} | "
            f"{ms(st.get('train_step_ms'))} | "
            f"{_fmt(ratio(st.get('train_step_ms'), base_step), '.3f')} |")
    env = data["environment"]
    if not env["device"] or env["device"].startswith("cpu"):
        return lines + ["", "Graphed rows run on a GPU only (the CPU smoke run goes through the "
                        "eager fallback)."]
    out = []

    def check(text, value, ok):
        out.append(f"- {text}: **{'holds' if ok else 'does not hold'}**" if value is not None
                   else f"- {text}: not measured in this run")

    fused = graphed.get("avpt-fused", {})
    r = ratio(fused.get("infer_ms"), base_infer)
    check(f"graphed A-VPT fused inference <= 1.15x the graphed backbone (x{_fmt(r, '.3f')}; "
          f"stretch 1.05x)", r, r is not None and r <= 1.15)
    r = ratio(steps.get("avpt-fused", {}).get("train_step_ms"), base_step)
    check(f"graphed A-VPT fused training step <= 1.15x graphed VPT-deep (x{_fmt(r, '.3f')})", r,
          r is not None and r <= 1.15)
    r = ratio(eager.get("avpt-eager", {}).get("train_step_ms"),
              steps.get("avpt-fused", {}).get("train_step_ms"))
    check(f"graphed fused step >= 3x the eager A-VPT step (x{_fmt(r, '.2f')})", r,
          r is not None and r >= 3.0)
    worst = max((g["wall_over_busy"] for g in graphed.values() if g.get("wall_over_busy")),
                default=None)
    check(f"graph replay wall time within 5% of GPU busy, every graphed row (worst "
          f"x{_fmt(worst, '.3f')})", worst, worst is not None and worst <= 1.05)
    return lines + ["", "Targets (issue 23):", ""] + out


def write(json_path: str, out: Optional[str] = None) -> str:
    with open(json_path) as fh:
        data = json.load(fh)
    out = out or os.path.join(os.path.dirname(json_path), "TABLE10.md")
    with open(out, "w") as fh:
        fh.write(render(data))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", help="results JSON (default: newest in benchmarks/results)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    path = args.results
    if path is None:
        candidates = sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json")), key=os.path.getmtime)
        candidates = [c for c in candidates if not c.endswith("aot.json")]
        if not candidates:
            raise SystemExit(f"no results JSON in {RESULTS_DIR}: run `pytest benchmarks/` first")
        path = candidates[-1]
    print(f"wrote {write(path, args.out)} from {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
