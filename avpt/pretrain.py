"""``avpt pretrain``: CLIP-style contrastive pretraining of a tiny open_clip backbone, offline.

Nothing can be downloaded, so the CPU demo makes its own pretrained backbone the way CLIP was made:
both towers of the open_clip model (``avpt-tiny-p8`` by default) are trained from scratch with
the symmetric InfoNCE objective (``open_clip.loss.ClipLoss``, learned logit scale) on phantom
images and their short reports: ``--captions findings`` (default) the finding only, modality and
label-bearing morphology words (``phantom_finding_caption``); ``full`` adds the position on a 3x3
grid and the size (``phantom_caption``). Each batch is augmented (random horizontal flips and one
random shift of up to ``--max-shift`` pixels), which the tiny ViT needs not to memorise the
images. The recipe was chosen on the held-out probe seed (never on an evaluation set), one
thread each, 1,000 patients per modality, 40 epochs, lr 5e-4, flips + shifts: held-out probe AUC
0.892 with finding captions, 0.818 with full captions; patch 16 instead of 8 (100-400 patients,
lr 2e-3, no augmentation) 0.55-0.64. The phantom seed (default ``PRETRAIN_SEED``) is
disjoint from every evaluation seed (the demo, ``avpt train`` and ``avpt cv`` use small seeds;
``avpt.demo`` refuses an evaluation seed equal to the weights' recorded seed), and the lesion
size is drawn per patient from a wider range than the demo's (a wider phantom family).

Images are preprocessed as the downstream loader does (CLAHE, per-modality standardisation,
grey repeated to 3 channels), so the image tower sees the same input distribution after.
Deterministic: seeded data, seeded init and batch order, ``torch.use_deterministic_algorithms``.
The weights file is an open_clip state dict (safetensors, fp16 by default) that
``avpt.backbone.load_backbone(name, pretrained=PATH)`` / ``--pretrained PATH`` loads; a JSON
sidecar ``PATH.json`` records the command's settings, the probe AUCs and the file's sha256.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .backbone import TINY_P8_MODEL
from .data import transforms as T
from .data.modalities import MODALITIES
from .data.phantom import make_phantom, phantom_finding_caption

PRETRAIN_SEED = 90_210          # phantom seed of the pretraining images (evaluations use 0..999)
# The shipped weights (what ``avpt demo`` uses): read-only to the CLI, never pretrain's output.
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights",
                               "avpt-tiny-p8-phantom-clip.safetensors")
SHIPPED_WEIGHTS = DEFAULT_WEIGHTS
# pretrain's default output: under the working directory, never inside the package
DEFAULT_OUT = os.path.join("runs", "pretrain", "avpt-tiny-p8-phantom-clip.safetensors")
LESION_SCALE = (1.0, 2.4)       # per-patient lesion scale range (the demo uses 1.8)
CAPTIONS = ("findings", "full")
PROBE_PATIENTS = 60             # per modality, 2 views: the held-out probe set (seed + 1)


def make_pretrain_data(seed: int = PRETRAIN_SEED, num_patients: int = 200, views: int = 2,
                       image_size: int = 64, modalities: Sequence[str] = MODALITIES,
                       lesion_scale: Tuple[float, float] = LESION_SCALE, progress: bool = False,
                       captions: str = "findings") -> Dict:
    """Phantom images with captions: ``images`` [N, 3, S, S] float32 (CLAHE, per-modality
    standardised), ``captions`` list of N str (``captions``: "findings" or "full", see the module
    docstring), ``labels`` [N] int64 (1 malignant), ``modalities`` list of N str.
    N = len(modalities) * num_patients * views."""
    from tqdm import tqdm

    if captions not in CAPTIONS:
        raise ValueError(f"captions must be one of {CAPTIONS}, got {captions!r}")
    items = [(m, p, v) for m in modalities for p in range(num_patients) for v in range(views)]
    imgs, caps, labels, mods = [], [], [], []
    for m, p, v in tqdm(items, desc="phantom images", disable=not progress, leave=False):
        scale = np.random.default_rng((seed, 77, MODALITIES.index(m), p)).uniform(*lesion_scale)
        s = make_phantom(seed, m, p, v, size=image_size, lesion_scale=float(scale))
        imgs.append(T.clahe(s.image).astype(np.float32))
        caps.append(s.caption if captions == "full" else phantom_finding_caption(m, s.label))
        labels.append(s.label)
        mods.append(m)
    stats = T.modality_stats({m: [i for i, mm in zip(imgs, mods) if mm == m] for m in set(mods)})
    arr = np.stack([(i - stats[m][0]) / stats[m][1] for i, m in zip(imgs, mods)])
    images = torch.from_numpy(arr).float().unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return dict(images=images, captions=caps, labels=torch.tensor(labels), modalities=mods)


def _param_groups(model: torch.nn.Module, weight_decay: float):
    """CLIP's rule: no weight decay on gains, biases, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def augment(images: Tensor, gen: torch.Generator, max_shift: int) -> Tensor:
    """images [B, 3, S, S] -> the same, each flipped left-right with probability 1/2, then the
    batch shifted by one random (dy, dx) in [-max_shift, max_shift] (circular)."""
    flip = torch.rand(images.shape[0], 1, 1, 1, generator=gen) < 0.5
    images = torch.where(flip, images.flip(-1), images)
    if max_shift:
        dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
        images = torch.roll(images, shifts=(dy, dx), dims=(-2, -1))
    return images


def pretrain(data: Dict, model_name: str = TINY_P8_MODEL, epochs: int = 40, batch_size: int = 64,
             lr: float = 5e-4, weight_decay: float = 0.1, seed: int = 0, progress: bool = True,
             max_shift: int = 4):
    """Train both towers of a fresh open_clip ``model_name`` with the CLIP loss on ``data``
    (``make_pretrain_data``), every batch through ``augment`` (``max_shift`` pixels); AdamW,
    linear warm-up (one epoch) then cosine decay, gradient clipping 1.0, logit scale clamped to
    ln(100) as in CLIP. Returns (model in eval mode, history list of per-epoch mean losses)."""
    import open_clip
    from open_clip.loss import ClipLoss

    torch.manual_seed(seed)
    model = open_clip.create_model(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    tokens = tokenizer(data["captions"])                      # [N, context]
    images = data["images"]
    n = images.shape[0]
    steps_per_epoch = max(1, n // batch_size)                  # drop the last partial batch
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * s / total)))
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for epoch in range(epochs):
        t0, order, total_loss = time.time(), torch.randperm(n, generator=gen), 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            img_f, txt_f, scale = model(augment(images[idx], gen, max_shift), tokens[idx])
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            total_loss += float(loss.detach())
        history.append({"epoch": epoch + 1, "loss": total_loss / steps_per_epoch,
                        "logit_scale": float(model.logit_scale.detach().exp()), "time_s": time.time() - t0})
        if progress:
            h = history[-1]
            print(f"[pretrain] epoch {epoch + 1}/{epochs} clip loss {h['loss']:.4f} "
                  f"(chance {math.log(batch_size):.2f}) scale {h['logit_scale']:.1f} "
                  f"{h['time_s']:.1f} s", flush=True)
    return model.eval(), history


@torch.no_grad()
def pooled_features(model, images: Tensor, batch_size: int = 256) -> np.ndarray:
    """Image-tower embeddings (open_clip ``encode_image``, L2-normalised): [N, 3, S, S] -> [N, E]."""
    model.eval()
    feats = [model.encode_image(images[i:i + batch_size], normalize=True)
             for i in range(0, images.shape[0], batch_size)]
    return torch.cat(feats).float().cpu().numpy()


def probe_auc(model, data: Dict, train_frac: float = 0.5, seed: int = 0) -> float:
    """Linear probe: logistic regression on ``pooled_features`` of the first ``train_frac`` of
    the patients' images (per modality), ROC AUC on the rest (held out)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    x = pooled_features(model, data["images"])
    y = data["labels"].numpy()
    mods = np.array(data["modalities"])
    train = np.zeros(len(y), bool)
    for m in np.unique(mods):  # images are ordered patient-major: a prefix is whole patients
        where = np.flatnonzero(mods == m)
        train[where[:int(len(where) * train_frac)]] = True
    scaler = StandardScaler().fit(x[train])
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    clf.fit(scaler.transform(x[train]), y[train])
    return float(roc_auc_score(y[~train], clf.predict_proba(scaler.transform(x[~train]))[:, 1]))


def save_weights(model, path: str, fp16: bool = True, meta: Optional[Dict] = None) -> str:
    """The open_clip state dict as safetensors (``.safetensors``) or torch (``.pt``) at ``path``,
    fp16 unless ``fp16=False``, plus ``path + '.json'`` with ``meta`` and the file's sha256.
    Each file whole or not at all (``avpt_kernels._files.write_atomic``): a kill or a full disk
    leaves the earlier file and no temporary one; a failure is one line naming the path."""
    import io

    from avpt_kernels._files import write_bytes_atomic

    state = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous().clone()
             for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save
        data = save(state)
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    write_bytes_atomic(path, data)
    sha = hashlib.sha256(data).hexdigest()
    write_bytes_atomic(path + ".json", json.dumps(dict(meta or {}, sha256=sha, fp16=fp16),
                                                  indent=1).encode())
    return path


def read_meta(path: str) -> Dict:
    """The sidecar JSON of a weights file written by ``save_weights`` ({} when absent)."""
    side = path + ".json"
    if not os.path.isfile(side):
        return {}
    with open(side) as f:
        return json.load(f)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``avpt pretrain`` on an argparse subparsers object; returns the parser."""
    p = subparsers.add_parser(
        "pretrain", help="CLIP-style pretraining of the tiny backbone on phantom images + reports",
        description="avpt pretrain: contrastive image-text pretraining (CLIP objective) of both "
                    "towers of a tiny open_clip model on phantom images and their reports; writes "
                    "a weights file for --pretrained")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"weights file (.safetensors or .pt; default {DEFAULT_OUT}, under the "
                        f"working directory; never inside the package, whose shipped weights "
                        f"avpt demo uses)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (refused otherwise)")
    p.add_argument("--backbone", default=TINY_P8_MODEL,
                   help=f"open_clip config name (default {TINY_P8_MODEL})")
    p.add_argument("--seed", type=int, default=PRETRAIN_SEED,
                   help=f"phantom seed, disjoint from evaluation seeds (default {PRETRAIN_SEED})")
    p.add_argument("--patients", type=int, default=1000, help="patients per modality (default 1000)")
    p.add_argument("--views", type=int, default=2, help="views per patient (default 2)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--captions", choices=CAPTIONS, default="findings",
                   help="findings (default): modality + morphology words; full: + position, size")
    p.add_argument("--max-shift", type=int, default=4,
                   help="random shift augmentation in pixels (default 4; 0: flips only)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--fp32", action="store_true", help="store fp32 weights (default fp16)")
    p.set_defaults(func=main)
    return p


def _check(args) -> None:
    import open_clip

    from .errors import ConfigError

    for name, lo in (("patients", 4), ("views", 1), ("epochs", 1), ("batch_size", 2), ("threads", 1),
                     ("max_shift", 0)):
        if getattr(args, name) < lo:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {lo}, "
                              f"got {getattr(args, name)}")
    if not args.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    if args.seed < 1000:
        raise ConfigError(f"--seed must be >= 1000 (seeds 0-999 are evaluation seeds), got {args.seed}")
    if args.backbone not in open_clip.list_models():
        raise ConfigError(f"--backbone {args.backbone!r} is not an open_clip config")
    if not args.out.endswith((".safetensors", ".pt")):
        raise ConfigError(f"--out {args.out!r}: expected a file ending in .safetensors or .pt")
    _check_out_file(args.out, getattr(args, "overwrite", False))
    n = 3 * args.patients * args.views
    if n < args.batch_size:
        raise ConfigError(f"--batch-size {args.batch_size} exceeds the {n} pretraining images")


def _check_out_file(out: str, overwrite: bool) -> None:
    """pretrain's --out: outside the package (the shipped weights are read-only to the CLI), not
    in a folder another avpt command owns (a run's checkpoint.pt), a regular file if it exists,
    and replaced only with --overwrite."""
    from avpt_kernels._files import check_regular_target

    from .owner import WHAT, check_not_in_package, read_owner
    from .errors import ConfigError

    check_not_in_package(out)
    folder = os.path.dirname(os.path.abspath(out))
    owner = read_owner(folder)
    if owner is not None and owner["kind"] is not None:
        raise ConfigError(f"--out {out!r} is inside {folder}, which holds {WHAT[owner['kind']]} "
                          f"(avpt {owner['kind']}): give a weights path in another folder")
    if os.path.exists(folder) and not os.access(folder, os.W_OK):
        raise ConfigError(f"--out {out!r}: folder {folder} is not writable")
    try:
        check_regular_target(out)
    except OSError as exc:
        raise ConfigError(f"--out {exc}") from None
    if os.path.lexists(out) and not overwrite:
        try:
            ours = bool(read_meta(out).get("command"))
        except (OSError, ValueError):
            ours = False
        made = "weights of an earlier avpt pretrain" if ours else "a file avpt pretrain did not make"
        raise ConfigError(f"--out {out!r} exists ({made}): give another --out, or pass "
                          f"--overwrite to replace it")


def main(args) -> int:
    """Run ``avpt pretrain`` from parsed ``args`` (see ``add_parser``); returns the exit code."""
    import open_clip

    _check(args)
    t0 = time.time()
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        size = int(open_clip.get_model_config(args.backbone)["vision_cfg"]["image_size"])
        print(f"[pretrain] {args.backbone}: {3 * args.patients * args.views} phantom images "
              f"(seed {args.seed}) + held-out probe set", flush=True)
        data = make_pretrain_data(args.seed, args.patients, args.views, size, progress=True,
                                  captions=args.captions)
        probe = make_pretrain_data(args.seed + 1, PROBE_PATIENTS, 2, size)
        torch.manual_seed(args.seed)
        random_auc = probe_auc(open_clip.create_model(args.backbone), probe)
        model, history = pretrain(data, args.backbone, args.epochs, args.batch_size, args.lr,
                                  seed=args.seed, max_shift=args.max_shift)
        auc = probe_auc(model, probe)
        print(f"[pretrain] held-out linear probe AUC: random weights {random_auc:.3f}, "
              f"pretrained {auc:.3f}", flush=True)
        cmd = (f"avpt pretrain --backbone {args.backbone} --seed {args.seed} --patients "
               f"{args.patients} --views {args.views} --epochs {args.epochs} --batch-size "
               f"{args.batch_size} --lr {args.lr} --captions {args.captions} --max-shift "
               f"{args.max_shift} --threads {args.threads}"
               + (" --fp32" if args.fp32 else ""))
        meta = dict(command=cmd, backbone=args.backbone, seed=args.seed, probe_seed=args.seed + 1,
                    images=int(data["images"].shape[0]), history=history,
                    probe_auc_random=random_auc, probe_auc=auc, time_s=time.time() - t0,
                    torch=torch.__version__, open_clip=open_clip.__version__)
        path = save_weights(model, args.out, fp16=not args.fp32, meta=meta)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    print(f"[pretrain] wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB) in {time.time() - t0:.0f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    _ap = argparse.ArgumentParser(prog="avpt pretrain")
    _sub = _ap.add_subparsers(dest="command", required=True)
    add_parser(_sub)
    sys.exit(main(_ap.parse_args(["pretrain"] + sys.argv[1:])))
