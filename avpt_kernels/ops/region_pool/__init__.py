"""Soft region pooling (Eq. 2), ``region_pool(features[B,T|N,D], maps) -> [B,R,D]``: ``op``
(checks, launchers, custom ops, public entry point; the algorithm and its costs in its docstring),
``kernels`` (Triton), ``reference`` (the torch ground truth), ``spec`` (inputs, traffic floor:
this op's entry in ``avpt_kernels.ops.OPS``). ``nn.Module``: ``avpt_kernels.modules.RegionPool``."""
from .op import (aot_configs, check_args, infer_grid, region_pool, region_pool_backward_op,
                region_pool_op, triton_unsupported_reason)
from .spec import SPEC, region_pool_min_bytes
from . import reference

__all__ = ["aot_configs", "check_args", "infer_grid", "region_pool", "region_pool_backward_op",
           "region_pool_op", "triton_unsupported_reason", "SPEC", "region_pool_min_bytes",
           "reference"]
