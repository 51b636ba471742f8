"""The low-rank, stage-shared prompt bank (Eq. 4), ``prompt_bank(region_emb[B,R,D], ...) ->
[L,B,K,D]``: ``op`` (checks, launchers, custom ops, public entry point; the algorithm and its
costs in its docstring), ``kernels`` (Triton), ``reference`` (the torch ground truth), ``spec``
(inputs, traffic floor: this op's entry in ``avpt_kernels.ops.OPS``). ``nn.Module``:
``avpt_kernels.modules.LowRankPromptBank``."""
from .op import (aot_configs, check_args, prompt_bank, prompt_bank_backward_op, prompt_bank_op,
                triton_unsupported_reason)
from .spec import SPEC, prompt_bank_min_bytes
from . import reference

__all__ = ["aot_configs", "check_args", "prompt_bank", "prompt_bank_backward_op", "prompt_bank_op",
           "triton_unsupported_reason", "SPEC", "prompt_bank_min_bytes", "reference"]
