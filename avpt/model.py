"""Old import path of A-VPT, which lives in ``avpt.methods.avpt`` now; kept for code that still
imports it from here (``stage_of_layers`` is ``avpt_kernels.contiguous_stages`` in 3 stages)."""
from functools import partial

import avpt_kernels as ak

from .methods.avpt import AVPT, NUM_STAGES, SCHEDULES, AVPTConfig, injection_plan  # noqa: F401

stage_of_layers = partial(ak.contiguous_stages, num_stages=NUM_STAGES)
