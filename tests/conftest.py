"""Test setup: without a CUDA device, Triton kernels run on CPU tensors through the interpreter.
TRITON_INTERPRET must be set before triton is first imported, hence here, before any import."""
import os
import shutil
import subprocess


def _has_cuda() -> bool:
    # Decided without importing torch (which may import triton) and without touching a GPU.
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from avpt_kernels.testing import emulate_gpu_bf16_rounding  # noqa: E402

# The interpreter truncates fp32 -> bf16 where a GPU rounds to nearest-even: make it round like
# the GPU, so that bf16 errors measured here are the ones a GPU run would show.
if os.environ.get("TRITON_INTERPRET") == "1":
    assert emulate_gpu_bf16_rounding(), "could not patch the Triton interpreter's bf16 cast"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_runtest_logreport(report):
    """With AVPT_FAILURE_LOG set, each failure's traceback is appended to that file as it
    happens (also under pytest-xdist, whose workers report here): a run cut off by a time
    limit, as on a lent GPU machine, still leaves its tracebacks."""
    path = os.environ.get("AVPT_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
