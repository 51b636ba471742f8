"""``pytest benchmarks/``: without a CUDA device, Triton kernels run through the interpreter on
small CPU shapes (a smoke run: every row is produced, no time is asserted). One JSON file per run
is written at the end of the session to benchmarks/results/ or to ``$AVPT_BENCH_RESULTS`` (a
second run on the same day gets a new file name; see ``benchmarks/harness.py``)."""
import os
import shutil
import subprocess

if not (shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"],
                                                      capture_output=True).returncode == 0):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402

from benchmarks.harness import Results  # noqa: E402

_RESULTS = None


@pytest.fixture(scope="session")
def results():
    global _RESULTS
    if _RESULTS is None:
        _RESULTS = Results()
    return _RESULTS


def pytest_sessionfinish(session, exitstatus):
    if _RESULTS is not None and _RESULTS.rows:
        from benchmarks import table10

        path = _RESULTS.write()
        table = table10.write(path) if any(r.get("kind") == "model" for r in _RESULTS.rows) else None
        print(f"\nbenchmarks: {len(_RESULTS.rows)} rows -> {path}" + (f", {table}" if table else ""))
