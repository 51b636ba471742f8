"""Graphed inference (``avpt.graphed.GraphedInference``) on the CPU, through its capture seam:
``ReplayByRerun`` stands in for a CUDA graph (one "capture" call whose outputs are the static
outputs; a replay reruns the forward on the same static input buffers and writes into those
same output tensors), so what the wrapper itself does is tested without a GPU: static input
buffers reused across calls, the last batch padded to the captured batch and its padded rows
dropped, one graph per input signature and capacity, the outputs equal to the eager forward's,
warm-up before capture, autocast without its cast cache, the eager fallback with one log line
(no CUDA device, ``AVPT_CUDA_GRAPHS=0``, a failed capture). The CUDA capture itself
(``cuda_graph_capture``) runs on a GPU only (the benchmarks' graphed rows)."""
import logging

import pytest
import torch

from avpt import graphed
from avpt.graphed import GraphedInference
from avpt_kernels.testing import assert_close
from tests.tiny_models import trained_looking_tiny_avpt


class ReplayByRerun:
    """A CUDA graph's semantics without CUDA: the capture's outputs are static tensors that
    every replay overwrites; records the forward calls and the autocast state they saw."""

    def __init__(self):
        self.captures, self.replays, self.warmups, self.cache_enabled = 0, 0, [], []

    def __call__(self, run, warmup):
        self.warmups.append(warmup)
        for _ in range(warmup):
            run()
        self.captures += 1
        outputs = run()

        def replay():
            self.replays += 1
            for static, new in zip(outputs, run()):
                if static is not None:
                    static.copy_(new)
        return replay, outputs


def _recording(fn, seen):
    def forward(*inputs):
        seen.append(dict(ptrs=[None if x is None else x.data_ptr() for x in inputs],
                         inputs=[None if x is None else x.clone() for x in inputs],
                         grad=torch.is_grad_enabled(),
                         cache=torch.is_autocast_cache_enabled()))
        return fn(*inputs)
    return forward


def _affine(x, y):
    return x * 2 + y.sum(-1, keepdim=True), None


def test_static_buffers_reused_last_batch_padded_and_its_rows_dropped():
    seen, cap = [], ReplayByRerun()
    run = GraphedInference(_recording(_affine, seen), "cpu", capture=cap, batch_size=4)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 3, generator=g), torch.randn(n, 5, generator=g)) for n in (4, 4, 3)]
    outs = [run(*b) for b in batches]
    assert cap.captures == 1 and cap.replays == 3 and cap.warmups == [graphed.WARMUP]
    # every call ran on the same static buffers [4, ...]
    assert len({tuple(s["ptrs"]) for s in seen}) == 1
    assert all(x.shape[0] == 4 for s in seen for x in s["inputs"] if x is not None)
    # the 3-row batch: rows 0-2 its own, row 3 a copy of its last row; 3 rows come back
    x, y = batches[2]
    last = seen[-1]["inputs"]
    assert torch.equal(last[0][:3], x) and torch.equal(last[0][3], x[2])
    assert torch.equal(last[1][3], y[2])
    for (x, y), (out, none) in zip(batches, outs):
        assert none is None and out.shape == (x.shape[0], 3)
        assert torch.equal(out, _affine(x, y)[0])
    # outputs are copies: the next replay does not overwrite what a caller holds
    before = outs[0][0].clone()
    run(*batches[1])
    assert torch.equal(outs[0][0], before)
    # no grad, autocast cache off, inside the graph
    assert all(not s["grad"] and not s["cache"] for s in seen)


def test_one_graph_per_signature_and_capacity():
    cap = ReplayByRerun()
    run = GraphedInference(_affine, "cpu", capture=cap)  # no batch_size hint: capacity = n
    x = lambda n, d=3: torch.ones(n, d)  # noqa: E731
    run(x(2), x(2, 5))
    run(x(2), x(2, 5))
    run(x(2, 4), x(2, 5))  # another trailing shape: its own graph
    run(x(6), x(6, 5))     # more rows than any graph holds: a graph of 6
    out, _ = run(x(5), x(5, 5))  # fits the graph of 6, padded
    run(x(1), x(1, 5))     # fits the graph of 2 (the smallest that holds it)
    assert cap.captures == 3 and out.shape == (5, 3)
    caps = {k[0][0]: sorted(v) for k, v in run.graphs.items()}
    assert caps == {(3,): [2, 6], (4,): [2]}


def test_the_model_graphed_equals_the_model_eager():
    """A-VPT (torch backend) through the wrapper: the full batch is the eager forward bit for
    bit; a padded batch's rows are the eager forward of the padded batch bit for bit, and the
    eager forward of the short batch within fp32 rounding (another GEMM shape)."""
    model = trained_looking_tiny_avpt("torch").eval()
    g = torch.Generator().manual_seed(4)
    images, maps = torch.randn(3, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)
    modality = torch.tensor([0, 1, 0])

    def forward(images, maps, modality):
        out = model(images, maps=maps, modality=modality)
        return out.logits, out.seg_logits

    run = GraphedInference(forward, "cpu", capture=ReplayByRerun(), batch_size=3)
    with torch.no_grad():
        full = forward(images, maps, modality)
        padded = forward(*(torch.cat([t[:2], t[1:2]]) for t in (images, maps, modality)))
        short = forward(images[:2], maps[:2], modality[:2])
    got_full = run(images, maps, modality)
    got_short = run(images[:2], maps[:2], modality[:2])
    for a, b in zip(got_full, full):
        assert torch.equal(a, b)
    for a, b, c in zip(got_short, padded, short):
        assert a.shape[0] == 2 and torch.equal(a, b[:2])
        assert_close(a, c, torch.float32, "padded batch against the short batch")


def test_cpu_runs_eager_with_one_log_line(caplog, monkeypatch):
    monkeypatch.setattr(graphed, "_logged", set())
    with caplog.at_level(logging.INFO, logger="avpt.graphs"):
        runs = [GraphedInference(_affine, "cpu") for _ in range(2)]
        x, y = torch.randn(2, 3), torch.randn(2, 5)
        outs = [r(x, y)[0] for r in runs]
    assert not any(r.enabled for r in runs) and all(not r.graphs for r in runs)
    assert all(torch.equal(o, _affine(x, y)[0]) for o in outs)
    lines = [r.getMessage() for r in caplog.records if r.name == "avpt.graphs"]
    assert lines == ["CUDA graphs need a CUDA device (here: cpu): inference runs eager"]


def test_env_switch_and_failed_capture_fall_back_to_eager(caplog, monkeypatch):
    monkeypatch.setattr(graphed, "_logged", set())
    monkeypatch.setenv(graphed.ENV_SWITCH, "0")
    assert graphed.graphs_available("cuda").startswith("CUDA graphs off (AVPT_CUDA_GRAPHS=0)")
    monkeypatch.delenv(graphed.ENV_SWITCH)
    assert graphed.graphs_available("cuda") is None

    def failing(run, warmup):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    run = GraphedInference(_affine, "cpu", capture=failing)
    x, y = torch.randn(2, 3), torch.randn(2, 5)
    with caplog.at_level(logging.INFO, logger="avpt.graphs"):
        out = run(x, y)[0]
        run(x, y)
    assert torch.equal(out, _affine(x, y)[0]) and not run.enabled
    lines = [r.getMessage() for r in caplog.records if r.name == "avpt.graphs"]
    assert lines == ["CUDA graph capture failed (RuntimeError: operation not permitted when "
                     "stream is capturing): inference runs eager"]


def test_bad_inputs_and_outputs_are_refused_in_one_line():
    run = GraphedInference(_affine, "cpu", capture=ReplayByRerun())
    with pytest.raises(ValueError, match=r"share one non-zero batch size on dim 0, got \[2, 3\]"):
        run(torch.ones(2, 3), torch.ones(3, 5))
    with pytest.raises(TypeError, match="input 1 must be a tensor with the batch on dim 0 or None"):
        run(torch.ones(2, 3), ["MG", "US"])
    scalar = GraphedInference(lambda x: (x.sum(),), "cpu", capture=ReplayByRerun())
    with pytest.raises(ValueError, match=r"output 0 has shape \(\); every output must have the "
                                         r"batch \(2 rows\) on dim 0"):
        scalar(torch.ones(2, 3))


def test_cuda_capture_recipe_warms_up_on_a_side_stream_and_refuses_syncs_before_capture(
        monkeypatch):
    """``cuda_graph_capture``'s order of events, with torch.cuda's stream, graph and
    sync-debug calls replaced by recorders (no GPU): warm-up on a side stream, the last warm-up
    call under sync debug mode "error" (restored after), then one call inside the capture."""
    import contextlib

    events, mode = [], ["default"]

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits {other.name}")

    class Graph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def on(stream):
        events.append(f"enter {stream.name}")
        yield
        events.append(f"exit {stream.name}")

    @contextlib.contextmanager
    def capturing(graph):
        events.append("capture begin")
        yield
        events.append("capture end")

    def set_mode(m):
        mode[0] = m

    main = Stream("main")
    for name, value in dict(Stream=Stream, CUDAGraph=Graph, stream=on, graph=capturing,
                            current_stream=lambda: main, get_sync_debug_mode=lambda: mode[0],
                            set_sync_debug_mode=set_mode).items():
        monkeypatch.setattr(torch.cuda, name, value)

    def run():
        events.append(f"run (sync mode {mode[0]})")
        return (torch.ones(2),)

    replay, outputs = graphed.cuda_graph_capture(run, warmup=2)
    replay()
    assert events == ["side waits main", "enter side", "run (sync mode default)",
                      "run (sync mode error)", "exit side", "main waits side", "capture begin",
                      "run (sync mode default)", "capture end", "replay"]
    assert mode == ["default"] and torch.equal(outputs[0], torch.ones(2))
