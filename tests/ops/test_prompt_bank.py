"""Triton low-rank prompt bank (Eq. 4, all layers in one launch) against the reference on fp64
copies: prompts and all seven gradients, every kernel dtype, ranks 4/8/16, the op registration
(opcheck, torch.compile) and the backend routing; then the bounded-error rule in float16 and
bfloat16 (the input families and the rule: tests/ops/bounded_error.py). Runs on CUDA tensors when
a GPU is present, otherwise on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py). Run with
``-s`` to print the bounded-error measurements."""

import pytest
import torch

import avpt_kernels as ak
from avpt_kernels import backend
from avpt_kernels.ops.prompt_bank import op as pb
from avpt_kernels.ops.prompt_bank import reference, spec
from avpt_kernels.testing import DTYPES, assert_close
from tests.ops import bounded_error
from tests.ops.bounded_error import check_rule, measure

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

NAMES = ("region_emb", "token_offset", "U", "V", "layer_bias", "ln_weight", "ln_bias")

# (B, R, m, D, r, L, S): K = R*m.
CASES = {
    "B2-R3-K6-r4": (2, 3, 2, 40, 4, 4, 2),
    "B1-R1-K3-r8": (1, 1, 3, 24, 8, 3, 1),
    "vitb-L12-D768-r16": (2, 3, 2, 768, 16, 12, 3),
}


def _stages(n_layers, n_stages):
    return [layer * n_stages // n_layers for layer in range(n_layers)]


def _inputs(b, r, m, d, rank, n_layers, n_stages, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=g) * scale + shift).to(dtype).to(DEVICE) \
            .requires_grad_()

    k = r * m
    return [rnd(b, r, d), rnd(k, d, scale=0.5), rnd(n_stages, d, rank, scale=d ** -0.5),
            rnd(n_stages, rank, d, scale=rank ** -0.5), rnd(n_layers, d, scale=0.3),
            rnd(n_layers, d, scale=0.3, shift=1.0), rnd(n_layers, d, scale=0.3)]


def _reference(args, stages, grad, eps=1e-5):
    args64 = [a.detach().double().requires_grad_() for a in args]
    out = reference.prompt_bank(*args64, stages, eps)
    return out, torch.autograd.grad(out, args64,
                                    grad.to(device=args64[0].device, dtype=torch.float64))


def _check(args, stages, dtype, eps=1e-5):
    out = pb.prompt_bank(*args, stages, eps, backend="triton")
    b, _, d = args[0].shape
    assert out.dtype == dtype and out.shape == (len(stages), b, args[1].shape[0], d)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(out, args, grad)
    ref_out, ref_grads = _reference(args, stages, grad, eps)
    assert_close(out, ref_out, dtype, "prompts")
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert_close(got, want, dtype, f"d {name}")


# The model's shape (D=768, L=12, r=16: ~70 s a dtype under the interpreter) runs in bf16, the
# GPU dtype, in CI and in the other dtypes under ``extended``; the small shapes run every dtype.
MATCH_CASES = [pytest.param(case, dtype, id=f"{case}-{dtype}",
                            marks=pytest.mark.extended if case.startswith("vitb")
                            and dtype != torch.bfloat16 else ())
               for case in CASES for dtype in DTYPES]


@pytest.mark.parametrize("case,dtype", MATCH_CASES)
def test_matches_reference(case, dtype):
    b, r, m, d, rank, n_layers, n_stages = CASES[case]
    _check(_inputs(b, r, m, d, rank, n_layers, n_stages, dtype), _stages(n_layers, n_stages),
           dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_master_weights_with_16bit_embeddings(dtype):
    """What the module runs under autocast: 16-bit region embeddings, fp32 weights read as they
    are. Prompts in the input dtype, weight gradients in fp32, both backends alike."""
    b, r, m, d, rank, n_layers, n_stages = CASES["B2-R3-K6-r4"]
    args = _inputs(b, r, m, d, rank, n_layers, n_stages, torch.float32)
    args[0] = args[0].detach().to(dtype).requires_grad_()
    stages = _stages(n_layers, n_stages)
    outs = {name: pb.prompt_bank(*args, stages, backend=name) for name in ("triton", "torch")}
    grad = torch.randn(outs["torch"].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = {name: torch.autograd.grad(out, args, grad.to(DEVICE)) for name, out in outs.items()}
    assert outs["triton"].dtype == dtype
    assert [g.dtype for g in grads["triton"]] == [dtype] + [torch.float32] * 6
    ref_out, ref_grads = _reference(args, stages, grad)
    assert_close(outs["triton"], ref_out, dtype, "prompts")
    for name, got, want in zip(NAMES, grads["triton"], ref_grads):
        assert_close(got, want, dtype, f"d {name}")


def test_row_tiles_and_interleaved_stages():
    # B*K = 102 rows: partial row tiles everywhere, more images than one 16-image block of the
    # offset gradient, two 64-row blocks of dU; stages not contiguous; eps honoured.
    args = _inputs(17, 2, 3, 72, 8, 5, 3, torch.float32, seed=2)
    _check(args, [2, 0, 1, 0, 2], torch.float32, eps=1e-2)


def test_row_tile_partials_summed_over_more_than_one_block_of_tiles():
    # B*K = 290 rows: 19 row tiles of 16, so the per-layer and dV sums of the tiles' partials take
    # two BLOCK_TILES (16) loads, the second one partial; two stages of two layers each.
    args = _inputs(29, 2, 5, 24, 3, 4, 2, torch.float32, seed=5)
    assert -(-29 * 10 // pb._BLOCK_T) > pb._INPUTS_BLOCKS["BLOCK_TILES"]
    _check(args, [1, 0, 0, 1], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    b, r, m, d, rank, n_layers, n_stages = 2, 3, 2, 32, 4, 3, 2
    args = _inputs(b, r, m, d, rank, n_layers, n_stages, dtype, seed=4)
    # Same values, transposed storage: each tensor becomes a non-contiguous view.
    views = [a.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
             for a in args]
    assert not any(v.is_contiguous() for v in views)
    _check(views, _stages(n_layers, n_stages), dtype)


def test_frozen_parameters_only_region_emb_grad():
    args = _inputs(2, 3, 2, 32, 8, 3, 2, torch.float32, seed=5)
    for a in args[1:]:
        a.requires_grad_(False)
    stages = _stages(3, 2)
    out = pb.prompt_bank(*args, stages, backend="triton")
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, (args[0],), grad)
    _, ref_grads = _reference(args, stages, grad)
    assert_close(got, ref_grads[0], torch.float32, "d region_emb")


def test_broadcast_gradient():
    # prompts.sum().backward() hands the backward a stride-0 (expanded) gradient.
    args = _inputs(2, 3, 2, 32, 4, 3, 2, torch.float32, seed=8)
    stages = _stages(3, 2)
    pb.prompt_bank(*args, stages, backend="triton").sum().backward()
    _, ref_grads = _reference(args, stages, torch.ones(3, 2, 6, 32))
    for name, got, want in zip(NAMES, [a.grad for a in args], ref_grads):
        assert_close(got, want, torch.float32, f"d {name}")


def test_opcheck():
    args = [a.detach().requires_grad_() for a in _inputs(2, 3, 2, 32, 4, 3, 2, torch.float32)]
    stages = _stages(3, 2)
    torch.library.opcheck(pb.prompt_bank_op, (*args, stages, 1e-5))
    with torch.no_grad():
        out, low, mean, rstd = pb.prompt_bank_op(*args, stages, 1e-5)
    plain = [a.detach() for a in args]
    torch.library.opcheck(pb.prompt_bank_backward_op,
                          (torch.randn_like(out), *plain[:6], low, mean, rstd, stages))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    args = _inputs(2, 3, 2, 32, 8, 4, 2, torch.float32, seed=6)
    stages = _stages(4, 2)

    def fn(*tensors):
        return pb.prompt_bank(*tensors, stages, backend="triton") * 2

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    grads = torch.autograd.grad(out, args, grad)
    ref_out, ref_grads = _reference(args, stages, 2 * grad)
    assert_close(out, 2 * ref_out, torch.float32, "compiled prompts")
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert_close(got, want, torch.float32, f"compiled d {name}")


def test_module_uses_the_kernel():
    bank = ak.LowRankPromptBank(dim=32, num_regions=3, tokens_per_region=2, rank=8,
                                num_layers=4, num_stages=2, backend="triton").to(DEVICE)
    with torch.no_grad():  # move off the init (LN affine = identity) so every gradient is generic
        for name in NAMES[4:]:
            param = getattr(bank, name)  # drawn on CPU (the global CPU generator), then moved
            param.add_(0.3 * torch.randn(param.shape, dtype=param.dtype).to(DEVICE))
    emb = torch.randn(2, 3, 32).to(DEVICE).requires_grad_()
    out = bank(emb)
    grad = torch.randn_like(out)
    out.backward(grad)
    weights = [emb] + [getattr(bank, n) for n in NAMES[1:]]
    grads = [w.grad for w in weights]
    args64 = [w.detach().double().requires_grad_() for w in weights]
    ref = reference.prompt_bank(*args64, bank.layer_stage, bank.eps)
    ref_grads = torch.autograd.grad(ref, args64, grad.double())
    assert_close(out, ref, torch.float32, "module prompts")
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert_close(got, want, torch.float32, f"module d {name}")


def test_backend_routing(monkeypatch):
    args = [a.detach() for a in _inputs(1, 1, 2, 16, 4, 2, 1, torch.float32)]
    calls = []
    real = pb._forward
    monkeypatch.setattr(pb, "_forward", lambda *a: calls.append(1) or real(*a))
    pb.prompt_bank(*args, [0, 0], backend="torch")
    assert not calls, "backend='torch' must not run the kernel"
    with backend.use_backend("triton"):
        pb.prompt_bank(*args, [0, 0])
    assert calls, "backend='triton' must run the kernel"
    if backend.interpreter_enabled():
        calls.clear()
        pb.prompt_bank(*args, [0, 0], backend="auto")
        assert calls, "backend='auto' runs Triton under the interpreter"


def test_unsupported_inputs_fall_back_or_raise():
    args = _inputs(1, 1, 2, 16, 4, 2, 1, torch.float64)
    out = pb.prompt_bank(*args, [0, 0], backend="auto")  # float64: the torch path under auto
    assert_close(out, reference.prompt_bank(*[a.detach() for a in args], [0, 0]), torch.float64,
                 "fp64 auto")
    with pytest.raises(ValueError, match="region_emb dtype"):  # one rule: resolve raises ValueError
        pb.prompt_bank(*args, [0, 0], backend="triton")
    wide = _inputs(1, 1, 2, 32, 17, 2, 1, torch.float32)
    with pytest.raises(ValueError, match="U with rank r=17 .*rank r <= 16"):
        pb.prompt_bank(*wide, [0, 0], backend="triton")


def test_min_bytes():
    got = spec.prompt_bank_min_bytes(32, 3, 6, 768, 8, 12, 3, torch.bfloat16)
    inputs = 32 * 3 * 768 + 6 * 768 + 2 * 3 * 768 * 8 + 3 * 12 * 768
    assert got == 2 * (inputs + 12 * 32 * 6 * 768)


# --------------------------------------------------------------------------------------------
# The bounded-error rule (tests/ops/bounded_error.py), float16 and bfloat16
# --------------------------------------------------------------------------------------------
PB_NAMES = ("region_emb", "token_offset", "U", "V", "layer_bias", "ln_weight", "ln_bias")
# (B, R, m, D, r, L, S): K = R*m.
PB_SHAPES = {
    "vitb": (2, 3, 2, 768, 8, 12, 3),
    "odd": (3, 5, 1, 48, 5, 5, 2),  # K = 5 with m = 1, rank 5, L = 5 over 2 stages
}


def _pb_inputs(shape, family, dtype, seed=0):
    b, r, m, d, rank, n_layers, n_stages = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*size, scale=1.0, shift=0.0):
        return torch.randn(size, generator=g, dtype=torch.float64) * scale + shift

    args = [rnd(b, r, d), rnd(r * m, d, scale=0.5), rnd(n_stages, d, rank, scale=d ** -0.5),
            rnd(n_stages, rank, d, scale=rank ** -0.5), rnd(n_layers, d, scale=0.3),
            rnd(n_layers, d, scale=0.3, shift=1.0), rnd(n_layers, d, scale=0.3)]
    emb = args[0]
    if family.startswith("highnorm"):
        # One high-norm prompt token per image: the embedding of one region per image (a
        # different one in each) x30 / x100, as a high-norm patch token carries into its region.
        gain = float(family[len("highnorm"):])
        for i in range(b):
            emb[i, i % r] *= gain
    elif family == "scaled":
        # Every weight scaled by a factor in 3..5.
        for i, factor in enumerate((3.0, 3.5, 4.0, 4.5, 5.0, 3.25), start=1):
            args[i] = args[i] * factor
    elif family == "hugerow":
        emb[0, r - 1] *= 1e3  # one region embedding of the batch 1000x the others
    elif family == "nearmax":
        # Region embeddings near the top of float16's range (|E| up to ~4e4): x = e U V and the
        # LayerNorm sums of squares exceed it, only fp32 holds them.
        emb *= 1e4
    elif family == "mixed":
        emb *= torch.logspace(-2, 2, b, dtype=torch.float64)[:, None, None]
    else:
        assert family == "plain", family
    return [a.to(dtype) for a in args]


PB_FAMILIES = ("plain", "highnorm30", "highnorm100", "scaled", "hugerow", "nearmax", "mixed")
PB_CI_MODEL = {("vitb", "plain", torch.float16)}


def _pb_cases():
    cases = []
    for shape in PB_SHAPES:
        for family in PB_FAMILIES:
            for dtype in bounded_error.DTYPES:
                slow = shape == "vitb" and (shape, family, dtype) not in PB_CI_MODEL
                cases.append(pytest.param(shape, family, dtype, marks=(pytest.mark.extended,) if slow else (),
                                          id=f"{shape}-{family}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("shape,family,dtype", _pb_cases())
def test_prompt_bank_bounded_error(shape, family, dtype):
    dims = PB_SHAPES[shape]
    stages = _stages(dims[5], dims[6])
    args = _pb_inputs(dims, family, dtype)

    def fn(*tensors, backend):
        return pb.prompt_bank(*tensors, stages, backend=backend)

    fused, torch_side, truth = measure(fn, args, PB_NAMES, dtype)
    check_rule(fused, torch_side, truth, dtype, f"prompt_bank {shape} {family}")
