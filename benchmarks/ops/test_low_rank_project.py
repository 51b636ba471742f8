"""Benchmark rows ``op="low_rank_project"``: CILMP's per-layer rank-r projection. Latency and memory
per shape, provider and mode, and the host time of a fused call (``benchmarks/op_bench.py``)."""
from benchmarks.op_bench import PYTESTMARK, op_benchmarks

pytestmark = PYTESTMARK
test_op, test_host_time = op_benchmarks("low_rank_project")
