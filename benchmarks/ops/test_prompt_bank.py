"""Benchmark rows ``op="prompt_bank"``: the low-rank prompt bank (Eq. 4), all layers in one call.
Latency and memory per shape, provider and mode, and the host time of a fused call
(``benchmarks/op_bench.py``)."""
from benchmarks.op_bench import PYTESTMARK, op_benchmarks

pytestmark = PYTESTMARK
test_op, test_host_time = op_benchmarks("prompt_bank")
