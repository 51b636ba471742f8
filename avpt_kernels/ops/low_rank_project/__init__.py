"""CILMP's per-layer rank-r projection, ``low_rank_project(x[N,Din] | x[L,N,Din], U, V, layer_stage)
-> [L,N,Dout]``: ``op`` (checks, Triton kernels, launchers, custom ops, public entry point; the
algorithm and its costs in its docstring), ``reference`` (the torch ground truth), ``spec``
(inputs, traffic floor: this op's entry in ``avpt_kernels.ops.OPS``)."""
from .op import (aot_configs, check_args, low_rank_project, low_rank_project_backward_op,
                low_rank_project_op, triton_unsupported_reason)
from .spec import SPEC, low_rank_project_min_bytes
from . import reference

__all__ = ["aot_configs", "check_args", "low_rank_project", "low_rank_project_backward_op",
           "low_rank_project_op", "triton_unsupported_reason", "SPEC",
           "low_rank_project_min_bytes", "reference"]
