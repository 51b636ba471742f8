"""Op-level comparison: every backend of every op against the fp64 reference, one small table.

``python -m avpt_kernels.compare [--batch B] [--tokens T] [--dim D] [--device cpu|cuda]``
prints, per op and backend, the largest error of the output and of the gradients relative to
the tolerance of the dtype, and the wall time of one forward+backward (CPU times are only a
sanity check; speed is judged by ``pytest benchmarks/`` on a GPU).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, List, Sequence

import torch

from . import backend as backends
from .ops import OPS
from .ops.opspec import Shape
from .testing import tolerance


def _run(fn: Callable, inputs: Sequence[torch.Tensor], backend: str):
    outs = fn(*inputs, backend=backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(0)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    grads = torch.autograd.grad(loss, inputs)
    return outs, grads


def _rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """Largest per-tensor error relative to the tensor's scale; a tensor whose fp64 value is
    zero (the PIM key-bias gradients, by softmax shift invariance) is scaled by the largest."""
    largest = max(float(y.detach().abs().max()) for y in want)
    errs = []
    for x, y in zip(got, want):
        scale = float(y.detach().abs().max())
        errs.append(float((x.detach().double() - y.detach()).abs().max())
                    / (scale if scale > 1e-9 * largest else largest))
    return max(errs)


def compare(b=2, t=197, d=768, k=6, r=3, device="cpu", dtype=torch.float32) -> List[dict]:
    """Every op of the registry (``avpt_kernels.ops.OPS``, each at its ``SPEC``'s inputs: token
    maps, the A-VPT model's PIM layout) on both backends against its fp64 evaluation."""
    rows = []
    shape = Shape(B=b, T=t, D=d, K=k, R=r)
    for op, package in OPS.items():
        spec = package.SPEC
        fn = spec.op(shape)
        inputs = spec.inputs(shape, dtype, device, requires_grad=True)
        truth_in = [x.detach().double().requires_grad_(True) for x in inputs]
        want_out, want_grad = _run(fn, truth_in, "torch")
        for name in ("torch", "triton"):
            row = {"op": op, "backend": name, "dtype": str(dtype).replace("torch.", "")}
            try:
                start = time.perf_counter()
                outs, grads = _run(fn, inputs, name)
                if device == "cuda":
                    torch.cuda.synchronize()
                row["ms"] = (time.perf_counter() - start) * 1e3
                row["out_err"], row["grad_err"] = _rel_err(outs, want_out), _rel_err(grads, want_grad)
                row["ok"] = max(row["out_err"], row["grad_err"]) <= 10 * sum(tolerance(dtype))
            except ValueError as exc:  # backend='triton' where it cannot run (backend.resolve)
                row["skipped"] = str(exc).split(";")[0]
            rows.append(row)
    return rows


def format_table(rows: List[dict]) -> str:
    lines = [f"{'op':<12} {'backend':<8} {'dtype':<9} {'fwd+bwd ms':>10} {'out err':>9} "
             f"{'grad err':>9}  status", "-" * 78]
    for row in rows:
        if "skipped" in row:
            lines.append(f"{row['op']:<12} {row['backend']:<8} {row['dtype']:<9} {'-':>10} {'-':>9} "
                         f"{'-':>9}  skipped: {row['skipped']}")
        else:
            lines.append(f"{row['op']:<12} {row['backend']:<8} {row['dtype']:<9} {row['ms']:>10.2f} "
                         f"{row['out_err']:>9.1e} {row['grad_err']:>9.1e}  "
                         f"{'ok' if row['ok'] else 'MISMATCH'}")
    lines.append("errors: max |x - x_fp64| / max |x_fp64| over outputs / over all input gradients")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    rows = compare(args.batch, args.tokens, args.dim, args.prompts, 3, args.device,
                   getattr(torch, args.dtype))
    print(f"avpt-kernels op comparison on {args.device} (B={args.batch}, T={args.tokens}, "
          f"D={args.dim}, K={args.prompts}, R=3); default backend: {backends.get_backend()}")
    print(format_table(rows))
    return 0 if all(row.get("ok", True) for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
