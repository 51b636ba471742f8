"""Benchmark results files (issue 13): a second run on the same day gets its own JSON, never
the first's; AVPT_BENCH_RESULTS picks the folder; TABLE10.md explains a CPU run's rows."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import table10
from benchmarks.harness import Results

# The GPU tier leaves these out: not a device path (benchmark result files).
pytestmark = pytest.mark.cpu_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_second_run_same_day_does_not_overwrite_the_first(tmp_path):
    first, second, third = Results(), Results(), Results()
    second.started = third.started = first.started  # the same second, even
    first.add(kind="op", op="a", value=1)
    second.add(kind="op", op="b", value=2)
    third.add(kind="op", op="c", value=3)
    paths = [r.write(str(tmp_path)) for r in (first, second, third)]
    assert len(set(paths)) == 3 and all(os.path.isfile(p) for p in paths)
    assert os.path.basename(paths[0]).endswith(first.started.strftime("%Y-%m-%d") + ".json")
    ops = [json.load(open(p))["rows"][0]["op"] for p in paths]
    assert ops == ["a", "b", "c"]


def test_results_folder_from_the_environment(tmp_path):
    code = "from benchmarks.harness import RESULTS_DIR; print(RESULTS_DIR)"
    env = dict(os.environ, AVPT_BENCH_RESULTS=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == str(tmp_path)


def _cpu_run():
    env = {"device": "cpu (x86_64)", "torch": "2.14.1", "triton": "3.8.0", "triton_interpret": True}
    common = dict(kind="model", model="avpt-tiny", batch=2, autocast="off", launch_kind="aten")
    rows = [dict(common, method="backbone", trainable_percent=0.0, infer_ms=10.0,
                 infer_ms_per_image=5.0, train_step_ms=None),
            dict(common, method="vpt", trainable_percent=9.5, infer_ms=12.0,
                 infer_ms_per_image=6.0, train_step_ms=30.0),
            dict(common, method="avpt-eager", trainable_percent=180.0, infer_ms=40.0,
                 infer_ms_per_image=20.0, train_step_ms=90.0),
            dict(common, method="avpt-fused", trainable_percent=180.0, infer_ms=4000.0,
                 infer_ms_per_image=2000.0, train_step_ms=9000.0)]
    return {"started": "2026-11-23T10:00:00+00:00", "environment": env, "rows": rows}


def test_table10_explains_cpu_rows_in_the_table():
    text = table10.render(_cpu_run())
    table = text.split("| method |", 1)[1].split("\n\n", 1)[0]
    fused = next(line for line in table.splitlines() if line.startswith("| avpt-fused"))
    assert "interpreter" in fused                    # the fused row says why it is slow
    eager = next(line for line in table.splitlines() if line.startswith("| avpt-eager"))
    assert "tiny" in eager                           # the share is of the tiny visual tower
    assert "AVPT_BENCH_RESULTS" in text


def test_table10_renders_compiled_step_rows_beside_the_uncompiled_step():
    data = {"rows": [dict(kind="model", method="avpt-fused", train_step_ms=12.5),
                     dict(kind="compiled-step", method="avpt-fused+compile-default", status="ok",
                          compile_s=30.0, train_step_ms=10.0),
                     dict(kind="compiled-step", method="vpt+compile-reduce-overhead",
                          status="skipped: on a GPU")]}
    lines = table10.compiled_step_section(data)
    assert "| avpt-fused+compile-default | ok | 30.00 | 10.00 | 12.50 |" in lines
    assert "| vpt+compile-reduce-overhead | skipped: on a GPU | - | - | - |" in lines
    assert table10.compiled_step_section({"rows": data["rows"][:1]}) == []


def test_table10_graphed_section_compares_graphed_with_graphed_and_judges_the_targets():
    env = {"device": "NVIDIA H200"}
    ro = dict(kind="compiled-step", compile="reduce-overhead", status="ok")
    rows = [dict(kind="model", method="backbone", infer_ms=10.0),
            dict(kind="model", method="avpt-eager", infer_ms=40.0, train_step_ms=120.0),
            dict(kind="model", method="avpt-fused", infer_ms=30.0, train_step_ms=90.0),
            dict(kind="graphed", method="backbone", status="ok", frozen_weights="bf16",
                 infer_ms=5.0, gpu_busy_ms=4.9, wall_over_busy=5.0 / 4.9),
            dict(kind="graphed", method="avpt-fused", status="ok", frozen_weights="bf16",
                 infer_ms=5.5, gpu_busy_ms=5.0, wall_over_busy=1.1),
            dict(ro, method="vpt+compile-reduce-overhead", train_step_ms=20.0),
            dict(ro, method="avpt-fused+compile-reduce-overhead", train_step_ms=30.0),
            dict(kind="compiled-step", compile="default", status="ok",
                 method="avpt-fused+compile-default", train_step_ms=1.0)]
    lines = table10.graphed_section({"environment": env, "rows": rows})
    assert "| backbone | bf16 | 10.00 | 5.00 | 1.000 | 4.90 | 1.020 | - | - | - |" in lines
    assert "| avpt-fused | bf16 | 30.00 | 5.50 | 1.100 | 5.00 | 1.100 | 90.00 | 30.00 | 1.500 |" \
        in lines
    text = "\n".join(lines)
    assert "inference <= 1.15x the graphed backbone (x1.100; stretch 1.05x): **holds**" in text
    assert "step <= 1.15x graphed VPT-deep (x1.500): **does not hold**" in text
    assert ">= 3x the eager A-VPT step (x4.00): **holds**" in text
    assert "within 5% of GPU busy, every graphed row (worst x1.100): **does not hold**" in text
    cpu = table10.graphed_section({"environment": {"device": "cpu (x86_64)"}, "rows": [
        dict(kind="graphed", method="vpt", status="skipped: CUDA graphs need a GPU")]})
    assert any("| vpt | - | - | skipped: CUDA graphs need a GPU |" in x for x in cpu)
    assert not any("Targets" in x for x in cpu)
    assert table10.graphed_section({"environment": env, "rows": rows[:3]}) == []


def test_ratios_compare_fused_with_every_provider_and_the_best():
    from benchmarks.harness import ratios

    key = dict(kind="op", op="pim", mode="fwd", shape={"B": 2}, dtype="float32")
    rows = [dict(key, provider=p, median_ms=ms) for p, ms in
            (("fused", 1.0), ("eager", 4.0), ("compiled", 3.0), ("expert", 2.0))]
    rows.append(dict(key, provider="expert-max-autotune", median_ms=None))  # skipped: no time
    (entry,) = ratios(rows)
    assert entry["speedup_vs_eager"] == 4.0 and entry["speedup_vs_expert"] == 2.0
    assert entry["best_baseline"] == "expert" and entry["speedup_vs_best"] == 2.0
    assert "speedup_vs_expert-max-autotune" not in entry
