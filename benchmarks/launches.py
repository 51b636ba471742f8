"""Kernel launches and host syncs per method, counted without a GPU.

``count_method(row, method, overrides, model_name, batch)`` builds the method with random
weights on the CPU, turns every parameter and buffer into a fake CUDA tensor
(``torch._subclasses.fake_tensor.FakeTensorMode``: shapes, dtypes and devices, no storage, no
compute) and runs, under bf16 autocast for CUDA, with a ``TorchDispatchMode`` that sees every
aten op below autograd and autocast. Under bf16 autocast the frozen backbone's weights are
stored in bf16 first, as a CUDA run prepares its model (``avpt.frozen_weights``; row field
``frozen_weights``), so their per-forward casts are not counted:

* **inference**: one forward under ``torch.no_grad()`` (``encode_image`` for the backbone row);
* **training step**: forward + loss (CLS + SEG as Table 10's rows, or A-VPT's Eq. 17 loss with
  ``loss="avpt"``) under autocast, backward outside it, ``AdamW(foreach=True)`` step (what
  AdamW picks by default for CUDA parameters). A warm-up forward/step runs first, uncounted, so
  the counts are the steady state (optimizer state created, caches filled).

What is counted, per section (``blocks`` the frozen transformer blocks, ``pim``, ``pooling``
region pooling, ``anatomy`` the Anatomy MLP, ``bank`` the prompt bank, ``heads`` classification
head + segmentation decoder, ``other`` the rest of the forward (patch embedding, positions,
ln_pre/ln_post, VPT prompt concatenation, casts outside modules), ``loss``, ``optimizer``):

* ``aten``: aten ops that launch a kernel on a GPU. An op counts once unless it is
  metadata-only: a view (``OpOverload.is_view``: view, _reshape_alias, t, transpose, expand,
  permute, slice, select, unsqueeze, squeeze, split, unbind, alias, detach, as_strided, ...;
  ``reshape``/``contiguous`` reach the dispatcher as a view, ``_unsafe_view`` or ``clone``),
  ``_unsafe_view``, an allocation (``empty*``, ``new_empty*``), ``lift_fresh``, ``sym_*``,
  ``prim::*`` (``prim.device`` etc.), or
  an op whose tensors are all on the CPU (host work: e.g. AdamW's CPU step counters). A
  ``_foreach_*`` op counts as the launches of ``multi_tensor_apply`` (chunks of 65536 elements,
  at most 320 blocks and 110/64/48/36/30 tensors per launch for 1-5 tensor lists). Everything
  else is one launch (cuBLAS/cuDNN/flash-attention may launch a few kernels for one op: not
  modelled).
* ``triton``: Triton kernel launches. The fused ops are ``torch.library.custom_op``s; under
  FakeTensorMode they would run their ``register_fake`` impl, which launches nothing, so the
  counter runs their real launcher code instead (on fake tensors: its torch algebra is counted
  as aten ops of the same section) with ``JITFunction.run`` / ``InterpretedFunction.run``
  replaced by a counter (nothing compiles or runs). CUDA device queries of the launchers get an
  H100's answers (132 SMs, sm_90) when no GPU is present.
* ``syncs``: host syncs: ``_local_scalar_dense`` of a non-CPU tensor (``.item()``, ``float()``,
  ``bool()``, ``int()``, ``.tolist()``), data-dependent output shapes (``nonzero``, ``unique``,
  boolean-mask indexing) and host-to-device copies (``_to_copy``/``copy_`` from a CPU tensor to
  a CUDA tensor, e.g. ``torch.as_tensor(list, device="cuda")``: blocking for pageable memory).
  A sync does not stop the count: ``_local_scalar_dense`` answers True / 1.0 / 0 and a
  data-dependent op raises ``HostSync`` (its output shape is unknown).

Backward: PyTorch's autograd engine needs a CUDA runtime for CUDA tensors, even fake ones. Where
there is none (``backward_on == "cpu-fake"``), the training step runs a second time on fake
*CPU* tensors under CPU bf16 autocast (Triton backend through ``TRITON_INTERPRET=1``, still
counted, never run); its backward counts are taken per section and corrected for the autocast
difference: + the grad-carrying dtype casts the CUDA forward made, - those the CPU forward made
(the backward of each such cast is one cast). Backward ops are given the section of the forward
op that created their autograd node (by autograd sequence number). On a machine with a GPU the
backward runs on the fake CUDA tensors directly (``backward_on == "cuda-fake"``).

``python -m benchmarks.launches [--model ViT-B-16|avpt-tiny] [--batch 32] [--json PATH]
[--markdown PATH]`` (``benchmarks/results/LAUNCHES.md`` is that table at ViT-B/16, batch 32)
prints the table; ``benchmarks/test_table10.py`` adds the rows (``kind="launches"``) to the
benchmark JSON and ``benchmarks/table10.py`` renders them in TABLE10.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from collections import Counter
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from avpt.frozen_weights import store_frozen_weights
from benchmarks.launch_counter import (  # noqa: F401  (the tests reach them through here)
    SECTIONS, HostSync, LaunchCounter, _env, _triton_counted, autocast_for, fake_copy,
    tensor_ctor_copies_dispatched)

# (row name, method, config overrides): the rows of Table 10 whose launches issue 11 budgets.
METHODS = [
    ("backbone", "linear", {}),
    ("linear", "linear", {}),
    ("vpt", "vpt", {}),
    ("avpt-eager", "avpt", {"backend": "torch"}),
    ("avpt-fused", "avpt", {"backend": "triton"}),
]

# ----------------------------------------------------------------------------------------------
# One method
# ----------------------------------------------------------------------------------------------
def _build(method_name: str, overrides: Dict, model_name: str, loss: str):
    from avpt.methods import build_method

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = build_method(method_name, model_name=model_name, **overrides)
    loss_fn = None
    if loss == "avpt" and method.name == "avpt":
        from avpt.methods.avpt import AVPTLoss
        loss_fn = AVPTLoss(method)
    return method, loss_fn


def _inputs(method, batch: int, device: str):
    size = method.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    images = torch.randn(batch, 3, *size, device=device)
    maps = torch.rand(batch, 3, *size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    masks = torch.zeros(batch, 1, *size, device=device)
    modality = torch.zeros(batch, dtype=torch.long, device=device)
    return images, maps, labels, masks, modality


def _forward(row: str, method, images, maps):
    if row == "backbone":
        return method.backbone.encode_image(images)
    return method(images, maps=method.forward_maps({"maps": maps}))


def _loss(method, loss_fn, out, labels, masks, modality):
    from avpt.losses import method_loss

    if loss_fn is not None:
        return loss_fn(out, labels=labels, masks=masks, modality=modality, update_state=True)["loss"]
    return method_loss(method, out, labels, masks)["loss"]


def _train_pass(row, method, loss_fn, inputs, device: str, dtype, counter: Optional[LaunchCounter],
                backward: bool = True):
    """Forward + loss (+ backward) of one step, counted by ``counter`` when given."""
    images, maps, labels, masks, modality = inputs
    ctx = counter if counter is not None else contextlib.nullcontext()
    loss_section = counter.section("loss") if counter is not None else contextlib.nullcontext()
    with ctx:
        with autocast_for(device, dtype):
            out = _forward(row, method, images, maps)
            with loss_section:
                loss = _loss(method, loss_fn, out, labels, masks, modality)
        if backward:
            if counter is not None:
                counter.start_backward()
            loss.backward()
    return loss


def count_method(row: str, method_name: str, overrides: Dict, model_name: str, batch: int,
                 dtype: Optional[torch.dtype] = torch.bfloat16, loss: str = "method",
                 train: bool = True) -> Dict[str, Any]:
    """Launch counts of one method (see the module docstring): a dict with ``inference`` and,
    unless ``train`` is False or the row is the backbone, ``train`` = {forward, backward,
    optimizer, step} totals, each with ``by_section``; plus timing and how backward was run."""
    t0 = time.perf_counter()
    method, loss_fn = _build(method_name, overrides, model_name, loss)
    # as a CUDA run prepares its model: frozen weights in bf16 under bf16 autocast
    frozen = store_frozen_weights(method, dtype, "cuda")
    built = time.perf_counter() - t0
    result: Dict[str, Any] = dict(kind="launches", method=row, model=model_name, batch=batch,
                                  autocast=str(dtype).replace("torch.", "") if dtype else "off",
                                  device="cuda (fake tensors)", loss=loss, build_s=built,
                                  frozen_weights="bf16" if frozen else "fp32")

    # -- inference forward on fake CUDA tensors ----------------------------------------------
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fmethod, floss = fake_copy((method, loss_fn) if loss_fn is not None else (method, nn.Identity()),
                               mode, "cuda")
    floss = floss if loss_fn is not None else None
    with mode, tensor_ctor_copies_dispatched():
        inputs = _inputs(fmethod, batch, "cuda")
        counter = LaunchCounter("cuda").attach(fmethod)
        fmethod.eval()
        warm = LaunchCounter("cuda")  # warm-up (caches), launchers run as in the counted pass
        with torch.no_grad(), _triton_counted(warm), warm, autocast_for("cuda", dtype):
            _forward(row, fmethod, inputs[0], inputs[1])
        with torch.no_grad(), _triton_counted(counter), counter, autocast_for("cuda", dtype):
            _forward(row, fmethod, inputs[0], inputs[1])
        counter.detach()
    result["inference"] = dict(counter.totals(), by_section=counter.by_section(),
                               sync_ops=counter.sync_ops)
    if row == "backbone" or not train:
        result["time_s"] = time.perf_counter() - t0
        return result

    # -- training step: forward (+ backward) on fake CUDA --------------------------------------
    with mode, tensor_ctor_copies_dispatched():
        fmethod.train()
        params = [p for p in fmethod.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, foreach=True)
        fwd = LaunchCounter("cuda").attach(fmethod)
        backward_on = "cuda-fake"
        try:
            warm = LaunchCounter("cuda")
            with _triton_counted(warm):  # warm-up
                _train_pass(row, fmethod, floss, inputs, "cuda", dtype, warm)
            with _triton_counted(fwd):
                _train_pass(row, fmethod, floss, inputs, "cuda", dtype, fwd)
        except RuntimeError as exc:  # no CUDA runtime: the autograd engine refuses fake CUDA
            if isinstance(exc, HostSync):
                raise
            backward_on = "cpu-fake"
            fwd.detach()
            warm = LaunchCounter("cuda")
            with _triton_counted(warm):  # warm-up (its backward failed: forward only)
                _train_pass(row, fmethod, floss, inputs, "cuda", dtype, warm, backward=False)
            fwd = LaunchCounter("cuda").attach(fmethod)
            with _triton_counted(fwd):
                _train_pass(row, fmethod, floss, inputs, "cuda", dtype, fwd, backward=False)
        fwd.detach()
        fwd_counts = {s: dict(aten=fwd.aten[s], triton=fwd.triton[s], syncs=fwd.syncs[s])
                      for s in SECTIONS}
        bwd_counts = {s: dict(aten=0, triton=0, syncs=0) for s in SECTIONS}
        if backward_on == "cuda-fake":  # split the counter's forward and backward phases
            fwd_counts, bwd_counts = _split_phases(row, fmethod, floss, inputs, dtype)
        # optimizer: fake gradients where the backward ran elsewhere
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        with _triton_counted(LaunchCounter("cuda")):
            opt.step()  # warm-up: creates the AdamW state
        optc = LaunchCounter("cuda")
        with optc, optc.section("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
    if backward_on == "cpu-fake":
        bwd_counts = _backward_on_cpu(row, method, loss_fn, batch, dtype, fwd.grad_casts)

    def total(counts):
        return {k: sum(c[k] for c in counts.values()) for k in ("aten", "triton", "syncs")}

    def nonzero(counts):
        return {s: c for s, c in counts.items() if any(c.values())}

    opt_counts = {"optimizer": dict(aten=optc.aten["optimizer"], triton=0,
                                    syncs=optc.syncs["optimizer"])}
    step = {s: {k: fwd_counts.get(s, {}).get(k, 0) + bwd_counts.get(s, {}).get(k, 0)
                + opt_counts.get(s, {}).get(k, 0) for k in ("aten", "triton", "syncs")}
            for s in SECTIONS}
    result["train"] = dict(
        forward=dict(total(fwd_counts), by_section=nonzero(fwd_counts)),
        backward=dict(total(bwd_counts), by_section=nonzero(bwd_counts)),
        optimizer=total(opt_counts),
        step=dict(total(step), by_section=nonzero(step)),
        sync_ops=fwd.sync_ops, backward_on=backward_on)
    result["time_s"] = time.perf_counter() - t0
    return result


def _split_phases(row, fmethod, floss, inputs, dtype):
    """With a CUDA runtime: one more counted step, forward and backward counted apart."""
    fwd = LaunchCounter("cuda").attach(fmethod)
    with _triton_counted(fwd):
        loss = _train_pass(row, fmethod, floss, inputs, "cuda", dtype, fwd, backward=False)
    fwd.detach()
    bwd = LaunchCounter("cuda")
    bwd._timeline, bwd._stack = fwd._timeline, ["other"]
    with _triton_counted(bwd), bwd:
        bwd.start_backward()
        loss.backward()
    pick = lambda c: {s: dict(aten=c.aten[s], triton=c.triton[s], syncs=c.syncs[s])  # noqa: E731
                      for s in SECTIONS}
    return pick(fwd), pick(bwd)


def _backward_on_cpu(row, method, loss_fn, batch, dtype, cuda_grad_casts: Counter):
    """Backward counts per section from a step on fake CPU tensors under CPU autocast, with the
    grad-carrying casts of the CUDA forward in place of the CPU forward's."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    objs = (method, loss_fn) if loss_fn is not None else (method, nn.Identity())
    cmethod, closs = fake_copy(objs, mode, "cpu")
    closs = closs if loss_fn is not None else None
    with mode, _env(TRITON_INTERPRET="1"), tensor_ctor_copies_dispatched():
        cmethod.train()
        inputs = _inputs(cmethod, batch, "cpu")
        warm = LaunchCounter("cpu")
        with _triton_counted(warm):  # warm-up (caches)
            _train_pass(row, cmethod, closs, inputs, "cpu", dtype, warm, backward=False)
        fwd = LaunchCounter("cpu").attach(cmethod)
        with _triton_counted(fwd):
            loss = _train_pass(row, cmethod, closs, inputs, "cpu", dtype, fwd, backward=False)
        fwd.detach()
        bwd = LaunchCounter("cpu")
        bwd._timeline = fwd._timeline
        with _triton_counted(bwd), bwd:
            bwd.start_backward()
            loss.backward()
    out = {}
    for s in SECTIONS:
        aten_ = bwd.aten[s] + cuda_grad_casts[s] - fwd.grad_casts[s]
        out[s] = dict(aten=max(aten_, 0), triton=bwd.triton[s], syncs=bwd.syncs[s])
    return out


def per_pim_layer(result: Dict[str, Any], num_injected: int) -> Dict[str, Any]:
    """PIM launches per injected layer (inference forward, training forward, backward)."""
    def one(section_counts):
        c = section_counts.get("by_section", {}).get("pim", {})
        return {k: c.get(k, 0) / num_injected for k in ("aten", "triton")}
    out = {"inference": one(result["inference"])}
    if "train" in result:
        out["train_forward"] = one(result["train"]["forward"])
        out["backward"] = one(result["train"]["backward"])
    return out


def count_all(model_name: str, batch: int, methods=METHODS, **kw) -> List[Dict[str, Any]]:
    rows = []
    for row, method_name, overrides in methods:
        rows.append(count_method(row, method_name, overrides, model_name, batch, **kw))
    return rows


def table(rows: List[Dict[str, Any]]) -> str:
    """Markdown: method x (inference, training step) x (aten, Triton, syncs)."""
    lines = ["| method | inference aten | Triton | syncs | train step aten | Triton | syncs "
             "| (fwd / bwd / optimizer aten) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        i = r["inference"]
        t = r.get("train")
        if t is None:
            tr = "- | - | - | -"
        else:
            s = t["step"]
            tr = (f"{s['aten']:,} | {s['triton']} | {s['syncs']} | {t['forward']['aten']:,} / "
                  f"{t['backward']['aten']:,} / {t['optimizer']['aten']}")
        lines.append(f"| {r['method']} | {i['aten']:,} | {i['triton']} | {i['syncs']} | {tr} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from avpt.backbone import TINY_MODEL, VIT_B16

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=VIT_B16, help=f"{VIT_B16} (default) or {TINY_MODEL}")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--loss", default="method", choices=("method", "avpt"))
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--markdown", default=None,
                    help="write the rows as TABLE10.md's launch section here")
    args = ap.parse_args(argv)
    rows = count_all(args.model, args.batch, loss=args.loss)
    print(f"{args.model}, batch {args.batch}, bf16 autocast, fake CUDA tensors "
          f"(backward on {rows[-1].get('train', {}).get('backward_on', '-')})")
    print(table(rows))
    for r in rows:
        print(r["method"], "inference", r["inference"]["by_section"])
        if "train" in r:
            print(r["method"], "step", r["train"]["step"]["by_section"], "syncs:",
                  r["train"]["sync_ops"])
        print(f"  ({r['time_s']:.1f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
    if args.markdown:
        from benchmarks.table10 import launch_section

        with open(args.markdown, "w") as fh:
            fh.write("\n".join(launch_section({"rows": rows})[1:]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
