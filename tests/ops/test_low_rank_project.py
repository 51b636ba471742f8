"""Triton per-layer rank-r projection (``low_rank_project``, CILMP's x A_l^T B_l^T) against the
reference on fp64 copies: the output and the gradients of x, U and V, every kernel dtype, x
shared and per layer, shared stages, transposed (CILMP) factor views; the op registration
(opcheck), gradcheck of the reference, the bounded-error rule in 16 bits, the backend routing,
the argument errors and CILMP's ``project_knowledge``. Runs on CUDA tensors when a GPU is
present, otherwise on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py). Run with ``-s``
to print the bounded-error measurements."""

import pytest
import torch

import avpt_kernels as ak
from avpt_kernels import backend
from avpt_kernels.ops.low_rank_project import op as lrp
from avpt_kernels.ops.low_rank_project import reference
from avpt_kernels.testing import DTYPES, assert_close
from tests.ops.bounded_error import check_rule, measure

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "U", "V")

# name -> (N, Din, Dout, r, layer_stage, x shared)
CASES = {
    "N5-Din96-Dout80-L3S2-shared": (5, 96, 80, 8, [0, 1, 0], True),
    "N37-Din96-Dout80-L3S2-perlayer": (37, 96, 80, 8, [1, 0, 1], False),
    "N20-Din16-Dout512-L12-perlayer": (20, 16, 512, 8, list(range(12)), False),  # CILMP fast d
    "N80-Din512-Dout512-L12-shared": (80, 512, 512, 8, list(range(12)), True),    # description h
    "N5-Din4096-Dout512-L12-shared": (5, 4096, 512, 8, list(range(12)), True),    # LLM states
}
# The L=12 model shapes take seconds a dtype under the interpreter: bf16 (the GPU dtype) of the
# LLM-width and fast-path shapes in CI, the rest under ``extended``; the small shapes run every
# dtype.
CI_MODEL = {"N20-Din16-Dout512-L12-perlayer", "N5-Din4096-Dout512-L12-shared"}
MATCH_CASES = [pytest.param(case, dtype, id=f"{case}-{str(dtype)[6:]}",
                            marks=pytest.mark.extended if "L12" in case
                            and (dtype != torch.bfloat16 or case not in CI_MODEL) else ())
               for case in CASES for dtype in DTYPES]


def _inputs(n, din, dout, rank, stages, shared, dtype, seed=0, cilmp_layout=True):
    """x, U, V on DEVICE (leaves), drawn on CPU with a seeded generator. ``cilmp_layout``: U, V
    are the transposed views of A [S,r,Din], B [S,Dout,r] (what CILMP passes); the leaves
    returned for the gradients are then A and B."""
    g = torch.Generator().manual_seed(seed)
    n_layers, n_stages = len(stages), max(stages) + 1

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE).requires_grad_()

    x = rnd(n, din) if shared else rnd(n_layers, n, din)
    if cilmp_layout:
        A, B = rnd(n_stages, rank, din, scale=din ** -0.5), rnd(n_stages, dout, rank,
                                                                scale=rank ** -0.5)
        return (x, A, B), (lambda x, a, b: (x, a.transpose(1, 2), b.transpose(1, 2)))
    U, V = rnd(n_stages, din, rank, scale=din ** -0.5), rnd(n_stages, rank, dout,
                                                            scale=rank ** -0.5)
    return (x, U, V), (lambda x, u, v: (x, u, v))


def _check(leaves, to_args, stages, dtype):
    out = lrp.low_rank_project(*to_args(*leaves), stages, backend="triton")
    x = leaves[0]
    assert out.dtype == dtype and out.shape == (len(stages), x.shape[-2], to_args(*leaves)[2].shape[2])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(out, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.low_rank_project(*to_args(*leaves64), stages)
    ref_grads = torch.autograd.grad(ref, leaves64, grad.double())
    assert_close(out, ref, dtype, "out")
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert got.dtype == dtype
        assert_close(got, want, dtype, f"d {name}")
    return grads


@pytest.mark.parametrize("case,dtype", MATCH_CASES)
def test_matches_reference(case, dtype):
    n, din, dout, rank, stages, shared = CASES[case]
    leaves, to_args = _inputs(n, din, dout, rank, stages, shared, dtype)
    grads = _check(leaves, to_args, stages, dtype)
    # CILMP's transposed views go in without a copy, and their gradients come back contiguous.
    assert grads[1].is_contiguous() and grads[2].is_contiguous()


@pytest.mark.parametrize("rank", (3, 16))
@pytest.mark.parametrize("shared", (True, False), ids=("shared", "perlayer"))
def test_contiguous_factors_other_ranks(rank, shared):
    # N = 33: three row tiles, the last partial; Dout = 65: a partial Dout chunk; 2 of 4 stages
    # unused (their gradients are zero).
    stages = [3, 0, 3, 0, 3]
    leaves, to_args = _inputs(33, 70, 65, rank, stages, shared, torch.float32, seed=3,
                              cilmp_layout=False)
    grads = _check(leaves, to_args, stages, torch.float32)
    assert (grads[1][1:3] == 0).all() and (grads[2][1:3] == 0).all()


def test_only_some_inputs_require_grad_and_broadcast_gradient():
    # CILMP's base term: x is a buffer (no grad); out.sum() hands a stride-0 gradient.
    stages = [0, 1, 2]
    leaves, to_args = _inputs(6, 40, 24, 8, stages, True, torch.float32, seed=4)
    x = leaves[0].detach()
    out = lrp.low_rank_project(*to_args(x, *leaves[1:]), stages, backend="triton")
    out.sum().backward()
    x64, a64, b64 = [t.detach().double().requires_grad_() for t in (x, *leaves[1:])]
    reference.low_rank_project(*to_args(x64, a64, b64), stages).sum().backward()
    assert_close(leaves[1].grad, a64.grad, torch.float32, "d A")
    assert_close(leaves[2].grad, b64.grad, torch.float32, "d B")


def test_opcheck():
    stages = [0, 1, 0]
    (x, A, B), _ = _inputs(5, 40, 24, 8, stages, False, torch.float32)
    U, V = A.detach().transpose(1, 2).requires_grad_(), B.detach().transpose(1, 2).requires_grad_()
    x = x.detach().requires_grad_()
    torch.library.opcheck(lrp.low_rank_project_op, (x, U, V, stages))
    torch.library.opcheck(lrp.low_rank_project_op, (x[0].detach().requires_grad_(), U, V, stages))
    with torch.no_grad():
        out, low = lrp.low_rank_project_op(x, U, V, stages)
    torch.library.opcheck(lrp.low_rank_project_backward_op,
                          (torch.randn_like(out), x.detach(), U.detach(), V.detach(), low, stages))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    stages = [0, 1, 1]
    leaves, to_args = _inputs(6, 40, 24, 8, stages, True, torch.float32, seed=7)

    def fn(x, a, b):
        return lrp.low_rank_project(*to_args(x, a, b), stages, backend="triton") * 2

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    grads = torch.autograd.grad(out, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = 2 * reference.low_rank_project(*to_args(*leaves64), stages)
    ref_grads = torch.autograd.grad(ref, leaves64, grad.double())
    assert_close(out, ref, torch.float32, "compiled out")
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert_close(got, want, torch.float32, f"compiled d {name}")


def test_gradcheck_reference_fp64():
    """The kernels take no float64 (the public op routes it to the reference): gradcheck the
    reference path of the public op; the kernels are checked against it above and by opcheck."""
    stages = [1, 0, 1]
    g = torch.Generator().manual_seed(5)
    for shared in (True, False):
        x = torch.randn(*(() if shared else (3,)), 4, 6, generator=g, dtype=torch.float64)
        U = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
        V = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
        args = [t.to(DEVICE).requires_grad_() for t in (x, U, V)]
        assert torch.autograd.gradcheck(
            lambda *a: ak.low_rank_project(*a, stages, backend="auto"), args)


# ---- The bounded-error rule (avpt_kernels.testing.assert_bounded_error) -------------------------
# The small shapes run in CI, the L=12 model shapes (seconds each under the interpreter) under
# ``extended``.
# (N, Din, Dout, r, layer_stage, shared), family
BOUNDED = [
    pytest.param((7, 96, 80, 8, [0, 1, 0], True), "plain", id="small-shared-plain"),
    pytest.param((7, 96, 80, 8, [0, 1, 0], False), "highnorm100", id="small-perlayer-highnorm100"),
    pytest.param((16, 512, 512, 8, list(range(12)), True), "plain",
                 marks=pytest.mark.extended, id="cilmp-shared-plain"),
    pytest.param((5, 4096, 512, 8, list(range(12)), True), "scaled",
                 marks=pytest.mark.extended, id="llm-shared-scaled"),
]


def _bounded_inputs(shape, family, dtype):
    n, din, dout, rank, stages, shared = shape
    g = torch.Generator().manual_seed(11)
    s = max(stages) + 1
    x = torch.randn(*(() if shared else (len(stages),)), n, din, generator=g, dtype=torch.float64)
    U = torch.randn(s, din, rank, generator=g, dtype=torch.float64) * din ** -0.5
    V = torch.randn(s, rank, dout, generator=g, dtype=torch.float64) * rank ** -0.5
    if family == "highnorm100":
        x[..., 2, :] *= 100  # one high-norm row (token) in every layer's input
    elif family == "scaled":
        U, V = U * 4, V * 3
    else:
        assert family == "plain", family
    return [t.to(dtype) for t in (x, U, V)]


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape,family", BOUNDED)
def test_bounded_error(shape, family, dtype):
    stages = shape[4]

    def fn(x, U, V, backend):
        return lrp.low_rank_project(x, U, V, stages, backend=backend)

    fused, torch_side, truth = measure(fn, _bounded_inputs(shape, family, dtype), NAMES, dtype)
    check_rule(fused, torch_side, truth, dtype, f"low_rank_project {family}")


# ---- Routing and errors -----------------------------------------------------------------------
def test_backend_routing(monkeypatch):
    (x, U, V), _ = _inputs(3, 16, 8, 4, [0, 0], True, torch.float32, cilmp_layout=False)
    x, U, V = x.detach(), U.detach(), V.detach()
    calls = []
    real = lrp._forward
    monkeypatch.setattr(lrp, "_forward", lambda *a: calls.append(1) or real(*a))
    want = reference.low_rank_project(x, U, V, [0, 0])
    assert_close(lrp.low_rank_project(x, U, V, [0, 0], backend="torch"), want)
    assert not calls, "backend='torch' must not run the kernel"
    with backend.use_backend("triton"):
        assert_close(lrp.low_rank_project(x, U, V, [0, 0]), want)
    assert calls, "backend='triton' must run the kernel"
    if backend.triton_can_run(x.device):
        calls.clear()
        ak.low_rank_project(x, U, V, (0, 0), backend="auto")
        assert calls, "backend='auto' runs Triton where it can"
        calls.clear()
        ak.low_rank_project(x.double(), U.double(), V.double(), [0, 0], backend="auto")
        assert not calls, "float64 runs on the torch backend under 'auto'"
        with pytest.raises(ValueError, match="low_rank_project: backend='triton' does not "
                                             "support x dtype torch.float64"):
            ak.low_rank_project(x.double(), U.double(), V.double(), [0, 0], backend="triton")
        big_u, big_v = torch.zeros(1, 16, 17, device=DEVICE), torch.zeros(1, 17, 8, device=DEVICE)
        with pytest.raises(ValueError, match="rank r=17"):
            ak.low_rank_project(x, big_u, big_v, [0, 0], backend="triton")
        assert ak.low_rank_project(x, big_u, big_v, [0, 0]).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.low_rank_project(x, U, V, [0, 0], backend="cuda")


def _bad_calls():
    x, U, V = torch.zeros(5, 16), torch.zeros(2, 16, 4), torch.zeros(2, 4, 8)
    return [
        ((x[None, None], U, V, [0]), ValueError, r"x must be 2-D or 3-D \[N, Din\]"),
        ((x, U[0], V, [0]), ValueError, r"U must be 3-D \[S, Din, r\]"),
        ((x, U, V[:, :3], [0]), ValueError, r"V must have shape \(2, 4, 8\) \[S, r, Dout\]"),
        ((x, U, V[:1], [0]), ValueError, r"V must have shape \(2, 4, 8\)"),
        ((x[:, :15], U, V, [0]), ValueError, r"x must have shape \(5, 16\) \[N, Din\]"),
        ((torch.zeros(3, 5, 16), U, V, [0, 1]), ValueError,
         r"x must have shape \(2, 5, 16\) \[L, N, Din\]"),
        ((x, U, V, [0, 2]), ValueError, r"layer_stage must be .* in \[0, 2\), got \[0, 2\]"),
        ((x, U, V, []), ValueError, r"layer_stage must be a non-empty"),
        ((x, U, V, [0, True]), ValueError, r"layer_stage must be"),
        ((x, U, V, "01"), ValueError, r"layer_stage must be"),
        ((x[:0], U, V, [0]), ValueError, r"x must have at least one row \(N\)"),
        ((x, U.double(), V, [0]), TypeError, r"U has dtype torch.float64 but x has torch.float32"),
        ((x, U, V.to("meta"), [0]), ValueError, r"V is on meta but x is on cpu"),
        ((x.long(), U, V, [0]), TypeError, r"x must be float16, bfloat16, float32 or float64"),
        (([[1.0]], U, V, [0]), TypeError, r"x must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("args,error,message", _bad_calls(),
                         ids=[f"bad{i}" for i in range(len(_bad_calls()))])
def test_argument_errors(args, error, message, monkeypatch):
    monkeypatch.setattr(lrp, "_forward", lambda *a: pytest.fail("ran before the checks"))
    monkeypatch.setattr(reference, "low_rank_project",
                        lambda *a: pytest.fail("ran before the checks"))
    with pytest.raises(error, match=message) as info:
        lrp.low_rank_project(*args)
    assert "\n" not in str(info.value)


# ---- CILMP ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", (True, False), ids=("shared", "perlayer"))
def test_cilmp_project_knowledge_runs_the_op(shared, monkeypatch):
    from avpt.methods.cilmp import project_knowledge

    g = torch.Generator().manual_seed(6)
    L, n, d_k, width, r = 4, 9, 48, 32, 8
    x = torch.randn(*(() if shared else (L,)), n, d_k, generator=g).to(DEVICE)
    A = torch.randn(L, r, d_k, generator=g).to(DEVICE).requires_grad_()
    B = torch.randn(L, width, r, generator=g).to(DEVICE).requires_grad_()
    calls = []
    real = lrp._forward
    monkeypatch.setattr(lrp, "_forward", lambda *a: calls.append(1) or real(*a))
    out = project_knowledge(x, A, B)
    xs = x if shared else x.transpose(0, 1)
    want = torch.stack([(xs if shared else xs[:, l]) @ A[l].t() @ B[l].t() for l in range(L)])
    assert_close(out, want.detach(), torch.float32, "project_knowledge")
    assert bool(calls) == backend.triton_can_run(x.device), "the default picks Triton"
    calls.clear()
    assert_close(project_knowledge(x, A, B, backend="torch"), want.detach(), torch.float32)
    assert not calls
