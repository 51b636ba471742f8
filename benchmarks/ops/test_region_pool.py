"""Benchmark rows ``op="region_pool"``: soft region pooling (Eq. 2), token and pixel maps. Latency
and memory per shape, provider and mode, and the host time of a fused call
(``benchmarks/op_bench.py``)."""
from benchmarks.op_bench import PYTESTMARK, op_benchmarks

pytestmark = PYTESTMARK
test_op, test_host_time = op_benchmarks("region_pool")
