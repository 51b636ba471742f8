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
else:
    # cuBLAS is deterministic only with a fixed workspace (read when CUDA initialises): the
    # trainer's deterministic mode and the tests that compare two runs bit for bit need it
    # (tests/determinism.py)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

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


@pytest.fixture
def hf_offline_env():
    """Any attempt to reach the Hugging Face hub fails the test (``avpt.local_backbone.hf_offline``:
    the variables the CLI itself sets); modules use it with ``pytest.mark.usefixtures``."""
    from avpt.local_backbone import hf_offline

    with hf_offline():
        yield


# The run's log as it happens (failure tracebacks, per-test results, the time of each test
# file): tests/run_log.py, whose hooks these names make this conftest's.
from tests.run_log import (pytest_collection_finish, pytest_configure,  # noqa: E402,F401
                           pytest_runtest_logreport, pytest_terminal_summary,
                           pytest_xdist_node_collection_finished)
