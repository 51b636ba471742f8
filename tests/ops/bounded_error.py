"""The bounded-error rule (flash-attention's, ``avpt_kernels.testing.assert_bounded_error``) as the
op tests apply it in float16 and bfloat16 (``measure``, ``check_rule``): soft region pooling
(Eq. 2, tests/ops/test_region_pool.py), the prompt bank (Eq. 4, tests/ops/test_prompt_bank.py)
and the low-rank projection (tests/ops/test_low_rank_project.py); PIM's in
tests/ops/test_pim_bounded_error.py.

For each op, input family and dtype: the Triton backend's error against the fp64 truth (the
reference evaluated in fp64 on the SAME 16-bit inputs, upcast) must be at most 2x the torch
backend's error on those inputs (floored at the dtype's unit roundoff), for the output and the
gradient of every differentiable input, with error = max|diff| / max|truth| per tensor. The
upstream gradient is one fixed random fp64 tensor, cast to each side's dtype.

Input families: plain; one high-norm token per image (x30, x100); sharp/peaked inputs
(region_pool: near-binary maps, a region with tiny total mass; prompt_bank: every weight scaled
x3..x5, region embeddings with one huge row); very different images in one batch (per-image
scales 1e-2..1e2); and two more: features sharing one large vector (region_pool "offset30", the
case that found the 16-bit ``out`` in region_pool's backward) and inputs near the top of
float16's range whose sums exceed it ("nearmax"). All at the model's shapes and at small odd
ones.

Non-finite values: the rule's error is inf where a backend gives inf/NaN and the truth is
finite, but it would pass if both backends overflowed. So every case also checks on its own that
the Triton backend is finite wherever the truth is finite AND representable in the dtype, and
the cases are built so that the truth is representable (the check is not vacuous). The one
documented exception, the gradient w.r.t. an all-zero map (F / eps, about 1e6 |F|, beyond
float16's range: the truth itself overflows float16), has its own test below.

The cases at the model's shapes take seconds each under the Triton interpreter: a
representative few run in CI, the rest carry the ``extended`` marker (``make test-extended``).
Run with ``-s`` to print the measured errors of every tensor.
"""

import torch

from avpt_kernels.testing import BOUND_FACTOR, UNIT_ROUNDOFF, assert_bounded_error, \
    relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float16, torch.bfloat16)  # the dtypes the rule is checked in


# --------------------------------------------------------------------------------------------
# The measurement: one op on the same 16-bit inputs through both backends, and in fp64
# --------------------------------------------------------------------------------------------
def _grads(fn, inputs, names, grad64, dtype):
    """{"out": fn(*inputs), "d <name>": gradient} with leaves copied from ``inputs`` in
    ``dtype`` (the 16-bit inputs themselves, or their fp64 upcast for the truth)."""
    leaves = [x.detach().to(device=DEVICE, dtype=dtype).requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad64.to(device=DEVICE, dtype=dtype))
    return {"out": out.detach(), **{f"d {n}": g for n, g in zip(names, grads)}}


def measure(fn, inputs, names, dtype, seed=123):
    """fused, torch-backend and truth tensors of ``fn(*inputs, backend=...)``; ``inputs`` are
    already in ``dtype``."""
    with torch.no_grad():
        probe = fn(*[x.detach().to(DEVICE) for x in inputs], backend="torch")
    grad64 = torch.randn(probe.shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)
    fused = _grads(lambda *a: fn(*a, backend="triton"), inputs, names, grad64, dtype)
    torch_side = _grads(lambda *a: fn(*a, backend="torch"), inputs, names, grad64, dtype)
    truth = _grads(lambda *a: fn(*a, backend="torch"), inputs, names, grad64, torch.float64)
    return fused, torch_side, truth


def check_rule(fused, torch_side, truth, dtype, label):
    """The rule, plus: the fused backend is finite wherever the truth is finite and fits in
    ``dtype``, and the truth does fit (else the finiteness check would be vacuous)."""
    big = torch.finfo(dtype).max
    lines = []
    for name, t in truth.items():
        t = t.detach().cpu()
        assert torch.isfinite(t).all() and float(t.abs().max()) <= big, \
            f"{label} {name}: the truth does not fit {dtype} (max |truth| {float(t.abs().max()):.3g})"
        assert torch.isfinite(fused[name].detach().cpu()).all(), \
            f"{label} {name}: the Triton backend gives inf/NaN where the truth is finite"
        e_f, e_t = relative_error(fused[name], t), relative_error(torch_side[name], t)
        bound = BOUND_FACTOR * max(e_t, UNIT_ROUNDOFF[dtype])
        lines.append(f"  {name:16s} triton {e_f:.3e}  torch {e_t:.3e}  ratio-to-bound "
                     f"{e_f / bound:.2f}")
    print(f"\n{label} [{str(dtype)[6:]}]\n" + "\n".join(lines))
    assert_bounded_error(fused, torch_side, truth, dtype, label=label)
