"""Every kernel configuration that can be selected compiles for sm_80 and sm_90a, spills
nothing and fits in shared memory (compiled ahead of time, no GPU needed)."""
import json
import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl

from avpt_kernels import aot
from avpt_kernels._compat import for_triton, triton_version
from avpt_kernels.ops import OPS

# The GPU tier leaves these out: not a device path (compile checks for sm_80/sm_90a: no GPU used).
pytestmark = pytest.mark.cpu_only


@triton.jit
def _probe_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2, mask=mask)


def _compiler_run(*args: str, timeout: int = 300) -> str:
    """``python *args`` in a subprocess without TRITON_INTERPRET (the interpreter cannot compile),
    from the repository root; asserts it succeeds and returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=timeout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run.stdout


def _compile_all(tmp_path, *flags):
    out = tmp_path / "aot.json"
    _compiler_run("-m", "avpt_kernels.aot", "--out", str(out), *flags, timeout=900)
    data = json.loads(out.read_text())
    assert list(data["by_triton"]) == [triton.__version__]
    rows = aot.load_rows(str(out))
    assert all(r["ok"] and r["spill_bytes"] == 0 for r in rows)
    assert {r["target"] for r in rows} <= {"sm_80", "sm_90a"}
    return rows


def _target_count(configs) -> int:
    """Compiles of ``configs``: one per target each selects (every target unless it names some)."""
    return sum(len(c.targets or aot.TARGETS) for c in configs)


@pytest.mark.extended
def test_every_shipped_kernel_config_compiles_without_spills(tmp_path):
    rows = _compile_all(tmp_path)
    assert len(rows) == _target_count(aot.collect())
    # Every op of the registry contributes its configurations.
    assert all(op.aot_configs() for op in OPS.values()), [n for n, op in OPS.items()
                                                          if not op.aot_configs()]


def test_a_sample_of_every_kernel_compiles_without_spills(tmp_path):
    """CI: the first and last configuration of every kernel (``aot.sample``), cold; the full
    list is the extended test above and ``make aot`` (benchmarks/results/aot.json)."""
    rows = _compile_all(tmp_path, "--sample")
    configs = aot.collect()
    assert {r["kernel"] for r in rows} == {c.kernel for c in configs}
    assert len(rows) == _target_count([configs[i] for i in aot.sample(configs)])


def test_the_recorded_table_covers_every_config_spill_free():
    """benchmarks/results/aot.json (``make aot``, both Triton versions) lists every configuration
    that ``collect()`` gives under this Triton, each compiled without spills for every target
    whose launchers select it (both, unless the configuration names its targets)."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "results",
                        "aot.json")
    rows = aot.load_rows(path)
    recorded = {(r["kernel"], r["config"], r["target"]) for r in rows if r["ok"]}
    assert all(r["ok"] and r["spill_bytes"] == 0 for r in rows)
    want = {(c.kernel, c.label, t) for c in aot.collect() for t in aot.TARGETS
            if c.targets is None or t in c.targets}
    assert want <= recorded, sorted(want - recorded)[:5]


def test_harness_reports_a_probe_kernel_in_a_subprocess():
    code = (
        "from avpt_kernels import aot\n"
        "from avpt_kernels.ops.kernel_config import KernelConfig\n"
        "from tests.test_aot import _probe_kernel\n"
        "cfg = KernelConfig(_probe_kernel, {'x_ptr': '*fp32', 'y_ptr': '*fp32', 'n': 'i32',"
        " 'BLOCK': 'constexpr'}, {'BLOCK': 128})\n"
        "rows = aot.run([cfg])\n"
        "assert len(rows) == 2 and all(r['ok'] for r in rows), rows\n"
        "assert all(r['registers'] > 0 for r in rows), rows\n"
        "print(aot.format_table(rows))\n")
    assert "_probe_kernel" in _compiler_run("-c", code)


def test_aligned_configs_compile_with_the_launch_time_hints():
    """An ``aligned`` configuration compiles what a launch with 16-aligned pointers and sizes
    compiles: its ``divisible`` parameters carry ``tt.divisibility`` 16 and its ``ones`` become
    the constant 1; the generic one carries no hint."""
    from avpt_kernels.ops.kernel_config import KernelConfig

    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    generic = KernelConfig(_probe_kernel, sig, {"BLOCK": 128})
    aligned = KernelConfig(_probe_kernel, sig, {"BLOCK": 128}, divisible=("x_ptr", "y_ptr"),
                           ones=("n",))
    assert generic.spec == "generic" and generic.compile_inputs()[2] == {}
    assert aligned.spec == "aligned" and aligned.label.endswith(",spec=aligned")
    signature, constexprs, attrs = aligned.compile_inputs()
    assert attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    assert signature["n"] == "constexpr" and constexprs == {"BLOCK": 128, "n": 1}


def test_the_hints_reach_the_compiler_in_a_subprocess():
    """Compiled for sm_90a, the aligned probe loads 4 floats an instruction and the generic one
    1 (the difference between the two compiles' registers in the PIM tables)."""
    code = (
        "from avpt_kernels import aot\n"
        "from avpt_kernels.ops.kernel_config import KernelConfig\n"
        "from tests.test_aot import _probe_kernel\n"
        "sig = {'x_ptr': '*fp32', 'y_ptr': '*fp32', 'n': 'i32', 'BLOCK': 'constexpr'}\n"
        "for name, hinted in (('generic', ()), ('aligned', ('x_ptr', 'y_ptr', 'n'))):\n"
        "    cfg = KernelConfig(_probe_kernel, sig, {'BLOCK': 512}, divisible=hinted)\n"
        "    ptx = aot.compile_config(cfg, 'sm_90a').asm['ptx']\n"
        "    print(name, ptx.count('ld.global.v4'))\n")
    out = _compiler_run("-c", code)
    counts = dict(line.split() for line in out.split("\n") if line.strip())
    assert int(counts["generic"]) == 0 and int(counts["aligned"]) > 0, out


def test_for_triton_picks_the_newest_entry_not_newer_than_the_running_version():
    choices = {(3, 0): "old", (3, 7): "new"}
    assert for_triton(choices, "3.6.0") == "old"
    assert for_triton(choices, "3.7.0") == "new"
    assert for_triton(choices, "3.8.0+git1234") == "new"
    assert for_triton(choices, "2.3.1") == "old"  # older than every key: the oldest entry
    assert triton_version("3.10.2") == (3, 10)


def test_aot_json_keeps_one_entry_per_triton_version(tmp_path):
    path = str(tmp_path / "aot.json")
    for version in ("3.8.0", "3.6.0", "3.8.0"):
        data = aot._merge(path, version, {"rows": [{"kernel": version}]})
        with open(path, "w") as fh:
            json.dump(data, fh)
    assert list(data["by_triton"]) == ["3.8.0", "3.6.0"]
    assert aot.load_rows(path, "3.6.0") == [{"kernel": "3.6.0"}]
