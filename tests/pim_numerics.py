"""The extreme-logits case of tests/ops/test_pim.py on the CPU, under two changes to the Triton
interpreter's arithmetic (test harness only; both need TRITON_INTERPRET=1):

``gpu_like_math``: fp32 arithmetic closer to what compiled sm_90 code does than numpy's:
  tl.exp as ex2.approx.ftz(x * log2 e) (the product rounded to fp32, results below 2^-126
  flushed to zero), fp32 division as a * rcp(b) (two roundings, like div.full.f32), IEEE fp32
  tl.dot as one fused multiply-add per k in order (the FMA dot), and the programs of each launch
  in a shuffled order (so fp32 atomic adds land in another order).
``backward_one_rounding_off``: every fp32 tl.dot result of the kernels launched inside the block
  moved up by one ulp. Around the backward only, it models a backward that recomputes a forward
  quantity (the logits, from Z and the per-image matrices) with one rounding of difference, as
  two differently compiled kernels may on a GPU.

Run ``python -m tests.pim_numerics`` for the table of the issue-24 write-up: the fused kernels'
and the torch backend's errors against the fp64 truth at logit gains 1 .. 3000 under each.
"""
import contextlib
import os
import random
import sys

import numpy as np
import torch

# The case of test_extreme_logits_stay_finite_and_match: (B, T, D, K, H, dh), seed 3.
EXTREME_SHAPE, EXTREME_SEED, HEADS = (2, 21, 32, 5, 2, 16), 3, 2
LOG2E = np.float32(1.4426950408889634)


def _interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("these patches change the Triton interpreter: TRITON_INTERPRET=1 only")
    from triton.runtime import interpreter
    return interpreter


def _ftz(x):
    return np.where(np.abs(x) < np.float32(2.0 ** -126), np.float32(0), x).astype(np.float32)


def _exp_approx(x):
    if x.dtype != np.float32:
        return np.exp(x)
    return _ftz(np.exp2((x * LOG2E).astype(np.float32).astype(np.float64)).astype(np.float32))


def _div_full(a, b):
    if np.asarray(a).dtype != np.float32:
        return np.divide(a, b)
    return (a * (np.float32(1) / np.asarray(b, dtype=np.float32))).astype(np.float32)


def _fma_dot(a, b, acc):
    """[M,K] @ [K,N] + acc with one fp32 rounding per k, in k order (fp32 x fp32 is exact in
    fp64, so the fp64 sum rounded once is a fused multiply-add)."""
    acc = acc.astype(np.float32).copy()
    for k in range(a.shape[-1]):
        acc = (acc.astype(np.float64) + a[..., :, k, None].astype(np.float64)
               * b[..., k, None, :].astype(np.float64)).astype(np.float32)
    return acc


@contextlib.contextmanager
def _patched(obj, **attrs):
    missing = object()  # a module global that shadows a builtin (range) is deleted after
    saved = {name: obj.__dict__.get(name, missing) for name in attrs}
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


@contextlib.contextmanager
def gpu_like_math(seed: int = 0):
    I = _interpreter()
    B = I.InterpreterBuilder
    dot = B.create_dot
    rng = random.Random(seed)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype == np.float32 and b.data.dtype == np.float32:
            return I.TensorHandle(_fma_dot(a.data, b.data, d.data), d.dtype.scalar)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def shuffled_range(*args):  # the interpreter's grid loops call range(grid[i])
        order = list(range(*args))
        rng.shuffle(order)
        return order

    with _patched(B, create_exp=lambda self, x: self.unary_op(x, _exp_approx),
                  create_fdiv=lambda self, x, y: self.binary_op(x, y, _div_full),
                  create_dot=create_dot), _patched(I, range=shuffled_range):
        yield


@contextlib.contextmanager
def backward_one_rounding_off():
    I = _interpreter()
    dot = I.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        out = dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        if out.data.dtype != np.float32:
            return out
        return I.TensorHandle(np.nextafter(out.data, np.float32(np.inf)), out.dtype.scalar)

    with _patched(I.InterpreterBuilder, create_dot=create_dot):
        yield


def extreme_case_errors(gain: float, backend: str, forward_ctx=None, backward_ctx=None):
    """max |x - truth| / max |truth| of z_out, p_tilde, attn and the gradients of z and p for the
    extreme-logits inputs with query weights x ``gain`` (the test's: 3000), fp32, on the CPU."""
    import avpt_kernels as ak
    from avpt_kernels.ops.pim import reference
    from avpt_kernels.testing import relative_error
    from tests.ops.test_pim import _cotangents, _fp64, _inputs

    z, p, w = _inputs(*EXTREME_SHAPE, logit_gain=gain, seed=EXTREME_SEED)
    with forward_ctx or contextlib.nullcontext():
        out = ak.pim(z, p, w, HEADS, return_attn=True, backend=backend)
    zd, pd, wd = _fp64(z, p, w)
    want = reference.pim(zd, pd, wd, HEADS, return_attn=True)
    gz, gp = _cotangents(out[0], out[1], 0, dtype=torch.float32)
    with backward_ctx or contextlib.nullcontext():
        got = torch.autograd.grad(out[:2], (z, p), (gz, gp))
    exp = torch.autograd.grad(want[:2], (zd, pd), (gz.double(), gp.double()))
    return {"z_out": relative_error(out[0], want[0]), "p_tilde": relative_error(out[1], want[1]),
            "attn": relative_error(out[2], want[2]), "grad z": relative_error(got[0], exp[0]),
            "grad p": relative_error(got[1], exp[1])}


def main() -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from avpt_kernels.testing import emulate_gpu_bf16_rounding
    emulate_gpu_bf16_rounding()
    none = contextlib.nullcontext
    variants = {"interpreter": (none, none),  # (forward, backward) context factories
                "gpu-like math": (gpu_like_math, lambda: gpu_like_math(1)),
                "backward one rounding off": (none, backward_one_rounding_off)}
    print("max |error| / max |truth| against fp64; the test asks ~1e-5 (fp32 tolerance)")
    for label, (fwd, bwd) in variants.items():
        for gain in (1.0, 30.0, 300.0, 3000.0):
            # the patches change the Triton kernels only: the torch backend once, unpatched
            for backend in ("triton", "torch") if label == "interpreter" else ("triton",):
                errs = extreme_case_errors(gain, backend, fwd(), bwd())
                print(f"{label:26s} gain {gain:6g} {backend:6s} "
                      + "  ".join(f"{k} {v:8.2g}" for k, v in errs.items()), flush=True)

if __name__ == "__main__":
    sys.exit(main())
