"""A pytest plugin that writes what a run did as it happens, so that a run cut off by a time limit
(as on a lent GPU machine) still leaves it. tests/conftest.py takes its hooks; other suites get
them with ``-p tests.run_log`` (``benchmarks/gpu_check.py`` does, for the benchmarks).

AVPT_FAILURE_LOG   each failure's traceback, appended as it happens
AVPT_RESULTS_LOG   one JSON line per test phase (nodeid, when, outcome, duration, xfail) and one
                   with the number of tests collected; ``benchmarks/gpu_check.py`` counts them
AVPT_PART_TIMES    set: the summed time of each test file in the terminal summary (the log)

Everything is written by the controlling process only: pytest-xdist workers send their reports
there, so nothing is written twice."""
import collections
import json
import os
import time

import pytest

_STATE = {"worker": False}
_PART_SECONDS = collections.Counter()  # test file -> summed setup + call + teardown seconds


def _append(variable, text):
    path = os.environ.get(variable)
    if path:
        with open(path, "a") as f:
            f.write(text)


def pytest_configure(config):
    _STATE["worker"] = hasattr(config, "workerinput")


def pytest_collection_finish(session):
    if not _STATE["worker"]:  # without xdist; with it, the hook below
        _append("AVPT_RESULTS_LOG", json.dumps({"collected": len(session.items)}) + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    if not _STATE.get("collected"):  # every worker collects the same items
        _STATE["collected"] = True
        _append("AVPT_RESULTS_LOG", json.dumps({"collected": len(ids)}) + "\n")


def pytest_runtest_logreport(report):
    if _STATE["worker"]:
        return
    _PART_SECONDS[report.nodeid.split("::")[0]] += report.duration
    if report.failed:
        _append("AVPT_FAILURE_LOG", f"==== {report.nodeid} ({report.when})\n"
                                    f"{report.longreprtext}\n\n")
    line = dict(nodeid=report.nodeid, when=report.when, outcome=report.outcome,
                duration=round(report.duration, 3), time=round(time.time(), 3))
    if hasattr(report, "wasxfail"):
        line["xfail"] = True
    if report.failed:  # the exception's one-line message, else the report's last line
        crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
        line["message"] = (crash or (report.longreprtext.strip().splitlines() or [""])[-1])[:300]
    _append("AVPT_RESULTS_LOG", json.dumps(line) + "\n")


def pytest_terminal_summary(terminalreporter):
    if _PART_SECONDS and os.environ.get("AVPT_PART_TIMES"):
        terminalreporter.section("time per test file (setup + call + teardown, summed)")
        for part, seconds in _PART_SECONDS.most_common():
            terminalreporter.write_line(f"{seconds:8.1f} s  {part}")
