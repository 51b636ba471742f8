"""Two runs compared bit for bit, made explicit on every device.

A test that runs the same computation twice and compares the results with ``torch.equal`` holds
only where that computation is deterministic. On the CPU (the Triton interpreter runs programs
in order) every op here is; on a GPU an op that adds fp32 partial sums in a run-dependent order
(atomic adds) is not, and two runs then agree only to rounding. Rather than hard-coding which
ops those are (the PIM kernels are being rebuilt to be deterministic), a test asks the op:
``watch_determinism`` runs both runs under ``torch.use_deterministic_algorithms(True,
warn_only=True)``, where such an op warns, as torch's own nondeterministic ops do;
``assert_same_run`` then compares bit for bit, or to the dtype's tolerance with that reason in
the failure message.
"""
import contextlib
import re
import warnings
from typing import Optional

import torch
from torch import Tensor

from avpt_kernels.testing import assert_close

# What torch's and our launchers' nondeterminism alerts say ("... does not have a deterministic
# implementation", "... can differ run to run ... use_deterministic_algorithms(True) is set").
_ALERT = re.compile(r"determinis", re.IGNORECASE)

NOT_REPRODUCIBLE = ("not bit-reproducible on this device (the op warned under "
                    "torch.use_deterministic_algorithms: partial sums in a run-dependent order), "
                    "so the two runs are compared to the dtype's tolerance")


class _Alerts:
    """What ``watch_determinism`` saw: ``reproducible`` is False once an op alerted."""

    def __init__(self):
        self.messages = []

    @property
    def reproducible(self) -> bool:
        return not self.messages


@contextlib.contextmanager
def watch_determinism():
    """Run the block (both runs that a test compares) under
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` and record the ops'
    nondeterminism alerts; after it, ``.reproducible`` says whether the runs may be compared bit
    for bit by the ops' own account. Both runs happen under the same setting, because torch
    picks other (deterministic) kernels for some ops in that mode. Other warnings pass through;
    the previous setting is restored."""
    seen = _Alerts()
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    for w in caught:
        if _ALERT.search(str(w.message)):
            seen.messages.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def assert_same_run(actual: Tensor, expected: Tensor, is_reproducible: bool,
                    dtype: Optional[torch.dtype] = None, name: str = "tensor") -> None:
    """``actual`` and ``expected`` come from two runs of the same computation: equal bit for bit
    when ``is_reproducible`` (``watch_determinism``'s verdict), else within the tolerance of
    ``dtype`` (default: ``actual``'s): a run-dependent summation order changes the last bits."""
    if is_reproducible:
        if not torch.equal(actual, expected):
            diff = (actual.double() - expected.double()).abs().max().item()
            raise AssertionError(f"{name}: two runs differ (max |diff| {diff:.3g}) although the "
                                 f"ops raised no nondeterminism alert")
        return
    assert_close(actual, expected, dtype=dtype, name=f"{name} ({NOT_REPRODUCIBLE})")
