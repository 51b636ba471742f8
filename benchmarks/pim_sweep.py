"""Launch-parameter sweep of the fused PIM on a GPU, one axis at a time from the defaults: the
token-row GEMM tiles with their warps and pipeline stages (``PROJ``, ``OUTPUT``, ``GRAD_Z``,
``GRAD_O2``, ``WGRAD``; the sm_90 tiles: run it on an H100/H200), the head kernels' token block (``ATTN_BT``), and the programs the weight gradients aim for
(``TARGET_PROGRAMS``: each value changes the chunk count at B=32), at the model's shape (B=32,
T=197, D=768, K=6, 4 heads x 16, gate 16, bf16). Each configuration is checked against the
default one (outputs and gradients, relative to their size) before it is timed
(``triton.testing.do_bench``, forward and forward+backward). A configuration that wins must then
join ``aot_configs`` and pass ``make aot`` (spills)::

    python -m benchmarks.pim_sweep [--out DIR]     # JSON rows + a table on stdout

Without a GPU it runs one small shape through the interpreter, as a smoke test (no timing).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import avpt_kernels as ak  # noqa: E402
from avpt_kernels.ops.pim import launch  # noqa: E402
from avpt_kernels.ops.pim import pack_weights  # noqa: E402
from avpt_kernels.ops.pim.weights import random_pim_params  # noqa: E402

HEADS, HEAD_DIM, GATE = 4, 16, 16
SHAPE = (32, 197, 768, 6) if ON_GPU else (2, 17, 64, 3)  # B, T, D, K
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
DEVICE = "cuda" if ON_GPU else "cpu"
AXES = dict(
    PROJ=(dict(BM=32, BK=32, num_warps=8, num_stages=3), dict(BM=16, BK=64, num_warps=4, num_stages=2)),
    OUTPUT=(dict(BM=64, BN=128, BKA=32, num_warps=8, num_stages=2),
            dict(BM=32, BN=32, BKA=32, num_warps=8, num_stages=1)),
    # 64x64: dx re-read from L2 by half as many column tiles as the default's 64x32
    GRAD_Z=(dict(BM=64, BN=64, BKA=32, num_warps=8, num_stages=2),
            dict(BM=64, BN=64, BKA=16, num_warps=4, num_stages=3)),
    GRAD_O2=(dict(BM=16, BK=128, num_warps=8, num_stages=2), dict(BM=16, BK=32, num_warps=4, num_stages=3)),
    WGRAD=(dict(BNA=64, BNB=64, BR=32, num_warps=8, num_stages=3),),
    ATTN_BT=({16: 128, 32: 64, 64: 32}, {16: 64, 32: 64, 64: 32}),
    TARGET_PROGRAMS=(132, 528),
)


def _configs():
    """The default, then each axis's other values with every other axis at its default."""
    yield {}
    for name, values in AXES.items():
        for value in values:
            yield {name: value}


def _inputs():
    b, t, d, k = SHAPE
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, t, d, generator=g).to(DEVICE, DTYPE).requires_grad_(True)
    p = torch.randn(b, k, d, generator=g).to(DEVICE, DTYPE).requires_grad_(True)
    w = random_pim_params(d, HEADS * HEAD_DIM, GATE, dtype=torch.float32, generator=g)
    with torch.no_grad():
        w.p2t_o_w.normal_(0, 0.05)  # p2t_o starts at zero: make the update path matter
    flat = pack_weights(w).to(DEVICE).requires_grad_(True)
    return z, p, flat


def _run(z, p, flat):
    z_out, p_tilde = ak.pim_packed(z, p, flat, HEADS, HEAD_DIM, GATE, backend="triton")
    return z_out, p_tilde


def _fwd_bwd(z, p, flat, gz, gp):
    outs = _run(z, p, flat)
    return (*outs, *torch.autograd.grad(outs, (z, p, flat), (gz, gp)))


def _apply(config):
    for name, value in config.items():
        setattr(launch, name, value)
    launch._layout.cache_clear()  # layouts read these when built


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join("benchmarks", "results"))
    args = ap.parse_args(argv)
    z, p, flat = _inputs()
    default = {name: getattr(launch, name) for name in AXES}
    gz = torch.randn_like(z)
    gp = torch.randn_like(p)
    want = _fwd_bwd(z, p, flat, gz, gp)
    rows = []
    for config in _configs():
        _apply(dict(default, **config))
        row = dict(changed=config or "default", shape=dict(zip("BTDK", SHAPE)), dtype=str(DTYPE),
                   device=DEVICE)
        try:
            got = _fwd_bwd(z, p, flat, gz, gp)
            row["max_rel_diff_vs_default"] = max(
                float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                for a, b in zip(got, want))
            if ON_GPU:
                from triton.testing import do_bench

                with torch.no_grad():
                    row["fwd_ms"] = do_bench(lambda: _run(z, p, flat))
                row["fwd_bwd_ms"] = do_bench(lambda: _fwd_bwd(z, p, flat, gz, gp))
            row["status"] = "ok"
        except Exception as e:  # a configuration that does not compile or run: recorded, not fatal
            row["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print({k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in row.items()
               if k not in ("shape", "dtype", "device")}, flush=True)
    _apply(default)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"pim_sweep_{DEVICE}_{time.strftime('%Y-%m-%d_%H%M%S')}.json")
    with open(path, "w") as fh:
        json.dump(dict(default=default, rows=rows), fh, indent=1)
    print(f"pim_sweep: {len(rows)} configurations -> {path}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
