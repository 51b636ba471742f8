"""``make gpu-check``'s script (benchmarks/gpu_check.py) without a GPU: the dry run writes every
phase's log and the summary; a phase past its limit is cut, its process group killed, and the
next phase still runs; failures, skips, xfails and a cut run are counted from the results log.
(The first is the CI's run of ``make gpu-check-dry``; it also checks the tier's marker.)"""
import glob
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from benchmarks import gpu_check

# The GPU tier leaves these out: not a device path (the plumbing of the GPU check).
pytestmark = pytest.mark.cpu_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_every_phase_and_the_summary(tmp_path):
    env = dict(os.environ)
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (out,) = glob.glob(str(tmp_path / "gpu-check_cpu-dry_*"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    status = {r["name"]: r["status"] for r in summary["phases"]}
    assert list(status) == ["setup", "tier", "bench", "profile"]
    assert status["tier"] == status["bench"] == status["profile"] == "passed", status
    assert status["setup"] == "skipped"  # a dry run installs nothing
    tier = summary["tier"]
    assert tier["collected"] == tier["counts"]["passed"] == 3 and tier["not_run"] == 0, tier
    # the marker left test_metrics.py's selected (cpu_only) test out
    assert list(tier["seconds_per_file"]) == ["tests/test_modules.py"]
    assert summary["bench"]["counts"]["passed"] >= 1 and not summary["bench"]["failures"]
    assert glob.glob(os.path.join(out, "*.json"))  # the benchmark rows beside the summary
    assert "phase profile: passed" in open(os.path.join(out, "gpu-profile.txt")).read()
    log = open(os.path.join(out, "gpu-tier.log")).read()
    assert "time per test file" in log and "[gpu_check] phase tier: passed" in log
    md = open(os.path.join(out, "SUMMARY.md")).read()
    assert "| tier | passed |" in md and "3 passed of 3 collected" in md


def _running(pid):
    """Alive and not a zombie (an orphan's zombie waits for a reaper that may never come)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_slow_phase_is_cut_and_the_next_still_runs(tmp_path, monkeypatch):
    """A phase that ignores SIGINT and SIGTERM is killed with its children (its own process
    group) shortly after its limit; the phase after it runs in full."""
    monkeypatch.setattr(gpu_check, "GRACE_S", (0.5, 0.5))
    stubborn = ("import signal, subprocess, sys, time\n"
                "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                "print(child.pid, flush=True)\n"
                "time.sleep(60)\n")
    start = time.monotonic()
    cut = gpu_check.run_phase(gpu_check.Phase("slow", [sys.executable, "-c", stubborn], 2.0,
                                              "slow.log"), str(tmp_path))
    assert cut["status"] == "timeout" and time.monotonic() - start < 10, cut
    child = int([line for line in open(tmp_path / "slow.log") if line.strip().isdigit()][0])
    time.sleep(0.2)
    assert not _running(child)  # the grandchild went with the group
    after = gpu_check.run_phase(gpu_check.Phase("next", [sys.executable, "-c", "print('ran')"],
                                                30.0, "next.log"), str(tmp_path))
    assert after["status"] == "passed" and "ran" in open(tmp_path / "next.log").read()
    assert "phase slow: timeout" in open(tmp_path / "slow.log").read()


def test_outcomes_and_a_cut_run_are_counted(tmp_path):
    """tests/run_log.py's results file, read by count_results: each outcome once, the failure's
    last line, tracebacks in the failure log, and the tests a time limit left unrun."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(
        "from tests.run_log import (pytest_collection_finish, pytest_configure,  # noqa\n"
        "                           pytest_runtest_logreport, pytest_terminal_summary)\n")
    (suite / "test_sample.py").write_text(textwrap.dedent("""\
        import time
        import pytest

        def test_passes():
            pass

        def test_fails():
            assert 1 + 1 == 3, "arithmetic is broken"

        @pytest.mark.skip(reason="not here")
        def test_skipped():
            pass

        @pytest.mark.xfail(strict=True, reason="known")
        def test_known_failure():
            assert False

        def test_slow():
            time.sleep(120)
        """))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(PYTHONPATH=ROOT, AVPT_RESULTS_LOG=str(out / "results.jsonl"),
               AVPT_FAILURE_LOG=str(out / "failures.log"), AVPT_PART_TIMES="1")
    phase = gpu_check.Phase("sample", [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                                       "-q", str(suite)], 10.0, "sample.log", env)
    record = gpu_check.run_phase(phase, str(out))
    assert record["status"] == "timeout", open(out / "sample.log").read()
    res = gpu_check.count_results(str(out / "results.jsonl"))
    assert res["collected"] == 5 and res["finished"] == 4 and res["not_run"] == 1, res
    assert res["counts"] == dict(passed=1, failed=1, error=0, skipped=1, xfailed=1, xpassed=0)
    (failure,) = res["failures"]
    assert failure["test"].endswith("test_sample.py::test_fails")
    assert "arithmetic is broken" in failure["message"]
    assert "assert 1 + 1 == 3" in open(out / "failures.log").read()
