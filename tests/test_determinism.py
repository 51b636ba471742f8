"""tests/determinism.py: an op's nondeterminism alert turns a bit-for-bit comparison of two runs
into a tolerance one (with the reason in the failure), silence keeps it bit for bit, other
warnings pass through, and the global deterministic setting is restored."""
import warnings

import pytest
import torch

from tests.determinism import NOT_REPRODUCIBLE, assert_same_run, watch_determinism

# The GPU tier leaves these out: not a device path (a test helper's logic).
pytestmark = pytest.mark.cpu_only

# torch's own wording for an op without a deterministic implementation (warn_only mode)
TORCH_ALERT = ("index_add_cuda_ does not have a deterministic implementation, but you set "
               "'torch.use_deterministic_algorithms(True, warn_only=True)'.")


def test_an_alert_means_a_tolerance_and_silence_means_bit_for_bit():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = a + torch.tensor([0.0, 2e-7, 0.0])  # a last-bits difference
    with watch_determinism() as quiet:
        assert torch.are_deterministic_algorithms_enabled()  # the runs happen in that mode
    assert quiet.reproducible
    with pytest.raises(AssertionError, match="two runs differ"):
        assert_same_run(b, a, quiet.reproducible, name="x")
    with watch_determinism() as noisy:
        warnings.warn(TORCH_ALERT, UserWarning)
    assert not noisy.reproducible and "index_add_cuda_" in noisy.messages[0]
    assert_same_run(b, a, noisy.reproducible, name="x")  # within the fp32 tolerance
    with pytest.raises(AssertionError, match="not bit-reproducible on this device"):
        assert_same_run(a + 1e-3, a, noisy.reproducible, name="x")
    assert "compared to the dtype's tolerance" in NOT_REPRODUCIBLE


def test_other_warnings_pass_through_and_the_setting_is_restored():
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    with pytest.warns(RuntimeWarning, match="unrelated"):
        with watch_determinism() as runs:
            warnings.warn("unrelated", RuntimeWarning)
    assert runs.reproducible
    assert (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled()) == before
