"""Benchmark rows ``op="pim"``: PIM (Eqs. 5-10), with the expert baselines
(``avpt_kernels.baselines``). Latency and memory per shape, provider and mode, and the host time
of a fused call (``benchmarks/op_bench.py``)."""
from benchmarks.op_bench import PYTESTMARK, op_benchmarks

pytestmark = PYTESTMARK
test_op, test_host_time = op_benchmarks("pim")
