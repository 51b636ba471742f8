"""The training loop and evaluation, as timm's train.py has them: ``train_one_epoch`` (AdamW with
a per-step warm-up + cosine schedule, gradient clipping, optional mixed precision with a
GradScaler for fp16, or the compiled ``WholeStep``) and ``evaluate`` (predictions of a data set)
with ``score`` (AUC, F1, Dice, IoU, HD95)."""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import metrics as M
from .compiled_step import check_compile_mode

log = logging.getLogger("avpt.train")

# The progress bar shows the loss every LOG_EVERY steps (one host sync each time); the epoch's
# mean loss terms are accumulated on the device and read once per epoch.
LOG_EVERY = 25


def make_loader(dataset, batch_sizes, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
    """(DataLoader, ModalityBatchSampler): single-modality batches, ``batch_sizes`` an int or
    {modality or "default": size}; rank ``rank`` of ``world`` gets every world-th batch."""
    from torch.utils.data import DataLoader

    from .data import ModalityBatchSampler

    sampler = ModalityBatchSampler(dataset.modalities, batch_sizes, shuffle=shuffle, seed=seed,
                                   rank=rank, world_size=world)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=0), sampler


def model_inputs(model, batch: Dict[str, torch.Tensor], amp_dtype=None):
    """(images [B, 3, H, W], maps or None, modality [B]) of a batch already on the device, as the
    method's forward takes them (``Method.forward_maps``). Under autocast the images come in the
    autocast dtype: A-VPT casts the region maps to the images' dtype and region_pool wants them in
    the dtype of the (autocast) patch features."""
    images = batch["image"]
    if amp_dtype is not None:
        images = images.to(amp_dtype)
    return images, model.forward_maps(batch), batch["modality"]


class TrainStep(nn.Module):
    """Forward + loss in one module, so DistributedDataParallel sees every trainable parameter
    used by the loss. ``forward(batch) -> {term: scalar}`` (``loss_fn``'s terms, total "loss")."""

    def __init__(self, model, loss_fn, amp_dtype=None):
        super().__init__()
        self.model, self.loss_fn, self.amp_dtype = model, loss_fn, amp_dtype

    def forward(self, batch):
        images, maps, modality = model_inputs(self.model, batch, self.amp_dtype)
        out = self.model(images, maps=maps, modality=modality)
        return self.loss_fn(out, batch["label"], batch["mask"], batch["modality"], update_state=True)


def make_optimizer(params, lr: float, weight_decay: float, compile_mode: str = "none",
                   device=None, optimizer: str = "adamw",
                   momentum: float = 0.0) -> torch.optim.Optimizer:
    """The trainer's optimizer (a recipe's ``optimizer``): AdamW, eager or for a compiled step
    ``capturable=True`` with the learning rate as a 0-d tensor on ``device`` (the scheduler
    fills it in place); or SGD with ``momentum`` (eager only, as the CoOp family's Dassl
    trainer: no dampening, no Nesterov; weight decay as L2 in the gradient)."""
    if optimizer == "sgd":
        if check_compile_mode(compile_mode) != "none":
            raise ValueError(f"compile={compile_mode} compiles the AdamW update; optimizer sgd "
                             f"needs compile=none")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer != "adamw":
        raise ValueError(f"optimizer must be adamw or sgd, got {optimizer!r}")
    if check_compile_mode(compile_mode) == "none":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=torch.tensor(float(lr), device=device),
                             weight_decay=weight_decay, capturable=True)


def lr_lambda(warmup_steps: int, total_steps: int, warmup: str = "linear",
              warmup_factor: float = 0.0, schedule: str = "cosine") -> Callable[[int], float]:
    """The learning-rate factor of optimizer step ``step`` (``LambdaLR``): a warm-up of
    ``warmup_steps`` steps, linear from 0 to the base rate or ``constant`` at ``warmup_factor``
    x the base rate (the CoOp family's ``WARMUP_CONS_LR`` / ``LR``), then cosine annealing to 0
    over the remaining steps (``schedule="cosine"``) or the base rate (``"constant"``)."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return warmup_factor if warmup == "constant" else (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


@dataclass
class Optimization:
    """What one optimizer step needs: the AdamW optimizer, its per-step scheduler, the fp16
    GradScaler (disabled otherwise), the trainable parameters for clipping, and the compiled
    ``WholeStep`` when ``compile != none`` (it then does forward to update itself)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    trainable: List[nn.Parameter]
    grad_clip: float
    whole_step: Optional[Callable] = None

    def step(self, step_module: nn.Module, batch: Dict[str, torch.Tensor], device,
             amp_dtype) -> Dict[str, torch.Tensor]:
        """Forward, loss, backward, clipping, AdamW and the scheduler for one batch; returns the
        loss terms."""
        if self.whole_step is not None:  # forward, loss, backward, clipping, AdamW: one graph
            terms = self.whole_step(batch)
        else:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                terms = step_module(batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(terms["loss"]).backward()
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with warnings.catch_warnings():  # fp16: GradScaler skips steps with inf gradients
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return terms


def train_one_epoch(step_module: nn.Module, opt: Optimization, loader, steps: int, device,
                    amp_dtype=None, desc: str = "", progress: bool = True
                    ) -> Tuple[Dict[str, float], int, float]:
    """One pass over ``loader`` (``steps`` batches): ({term: sum over images}, images seen,
    seconds). The sums stay on the device until the end of the epoch (one host sync per term)."""
    from tqdm import tqdm

    sums: Dict[str, torch.Tensor] = {}
    seen, t0 = 0, time.time()
    bar = tqdm(loader, total=steps, desc=desc, disable=not progress, leave=False,
               dynamic_ncols=True)
    for step_in_epoch, batch in enumerate(bar, 1):
        batch = {k: v.to(device) for k, v in batch.items()}
        terms = opt.step(step_module, batch, device, amp_dtype)
        n = batch["image"].shape[0]
        seen += n
        for k, v in terms.items():
            v = v.detach().float() * n
            sums[k] = sums[k] + v if k in sums else v
        if step_in_epoch % LOG_EVERY == 0 and not bar.disable:  # one sync every LOG_EVERY
            bar.set_postfix(loss=f"{float(terms['loss'].detach()):.4f}",
                            img_s=f"{seen / max(time.time() - t0, 1e-9):.1f}")
    return {k: float(v) for k, v in sums.items()}, seen, time.time() - t0


def eval_forward(model) -> Callable:
    """``(images, maps, modality) -> (logits [B, C], seg_logits [B, 1, H, W] or None)``: what
    evaluation reads of the method's forward, as ``GraphedInference`` replays it."""
    def forward(images, maps, modality):
        out = model(images, maps=maps, modality=modality)
        return out.logits, out.seg_logits
    return forward


@torch.no_grad()
def evaluate(model, dataset, cfg: Dict, device, dtype=None) -> Dict[str, np.ndarray]:
    """Predictions of ``dataset`` in its order: malignant (last-class) probabilities ``probs``
    [N], with C > 2 classes also ``class_probs`` [N, C]; predicted masks ``preds`` [N, S, S]
    bool and their logits ``seg_logits`` [N, S, S] float32 (None without a segmentation head),
    truths ``gts`` [N, S, S] at the model's input size S and ``labels`` [N], ``modalities`` [N]
    names; ``native`` [N] the truths at the original sizes with their spacings
    (``avpt.data.native.NativeMask``; None when the dataset has none), ``patients`` [N] and
    ``breasts`` [N] (patient and laterality; None where the laterality is unknown). On a CUDA
    device the forward replays a CUDA graph per batch shape (``avpt.graphed.GraphedInference``;
    the last batch of a modality padded), elsewhere it runs eagerly."""
    from .graphed import GraphedInference

    loader, _ = make_loader(dataset, cfg["eval_batch_size"], False, cfg["seed"])
    model.eval()
    size = cfg["eval_batch_size"]
    forward = GraphedInference(eval_forward(model), device, dtype,
                               batch_size=size if isinstance(size, int) else 0)
    probs, logits, gts, labels, order = [], [], [], [], []
    for batch in loader:
        images, maps, modality = model_inputs(model, {k: v.to(device) for k, v in batch.items()},
                                              dtype)
        class_logits, seg_logits = forward(images, maps, modality)
        probs.append(torch.softmax(class_logits.float(), -1).cpu())
        if seg_logits is not None:
            logits.append(seg_logits.float().squeeze(1).cpu())
        gts.append(batch["mask"].squeeze(1) > 0.5)
        labels.append(batch["label"])
        order.append(batch["index"])
    order_t = torch.cat(order).argsort()
    class_probs = torch.cat(probs)[order_t].numpy()
    res = dict(probs=class_probs[:, -1], labels=torch.cat(labels)[order_t].numpy(),
               gts=torch.cat(gts)[order_t].numpy())
    if class_probs.shape[1] > 2:
        res["class_probs"] = class_probs
    res["seg_logits"] = torch.cat(logits)[order_t].numpy() if logits else None
    res["preds"] = res["seg_logits"] > 0 if logits else None
    res["modalities"] = np.array(dataset.modalities)
    res["native"] = getattr(dataset, "native", None)
    records = dataset.records
    res["patients"] = [r.patient_id for r in records]
    res["breasts"] = [f"{r.patient_id}/{r.laterality}" if getattr(r, "laterality", "") else None
                      for r in records]
    return res


def segmentation_per_image(pred: Dict, settings: Optional[Dict] = None) -> Optional[Dict]:
    """Per-image Dice, IoU, HD95 (``avpt.metrics.image_segmentation_scores``) of ``evaluate``'s
    predictions, at each image's original size when ``pred`` has ``native`` truths (the logits
    resized back, ``avpt.data.native.to_native``; HD95 in mm where every spacing is known), else
    at the model's input size in pixels; ``resolution`` says which. None without a segmentation
    head. Cached in ``pred`` per (convention, empty-prediction rule)."""
    if pred.get("preds") is None:
        return None
    settings = M.metric_settings(settings)
    native, logits = pred.get("native"), pred.get("seg_logits")
    rule = (settings["hd95"], settings["empty_prediction"])
    # the arrays' identities too: a copy of ``pred`` with other arrays shares this cache
    key = (*rule, id(native), id(logits), id(pred["preds"]), id(pred["gts"]))
    cache = pred.setdefault("_seg_cache", {})
    if key in cache:
        return cache[key]
    if native is not None and logits is not None:
        from .data.native import to_native

        pairs = ((to_native(lg, m.shape), m.full()) for lg, m in zip(logits, native))
        spacings, resolution = [m.spacing for m in native], "native"
    else:
        pairs, resolution = zip(pred["preds"], pred["gts"]), "input"
        spacings = [None] * len(pred["gts"])
    per = M.image_segmentation_scores(pairs, spacings, *rule)
    per["resolution"] = resolution
    if resolution == "native" and per["unit"] == "px" and per["spacing_missing"] < len(spacings):
        log.warning("HD95 in pixels: %d of %d test images have no pixel spacing in their header",
                    per["spacing_missing"], len(spacings))
    cache[key] = per
    return per


def score(pred: Dict[str, np.ndarray], settings: Optional[Dict] = None) -> Dict[str, float]:
    """Test metrics of ``evaluate``'s predictions: auc, f1, accuracy, ..., dice, iou, hd95 with
    ``hd95_unit``, ``resolution`` and the counts of ``avpt.metrics.summarise_segmentation``, n.
    Two classes: of the malignant probability; C > 2 (``class_probs``): AUC one-vs-rest macro,
    F1 macro (``avpt.metrics.metric_kind``). ``settings``: the config's ``metrics.`` section."""
    settings = M.metric_settings(settings)
    if pred.get("class_probs") is not None:
        out = M.multiclass_metrics(pred["labels"], pred["class_probs"])
    else:
        out = M.classification_metrics(pred["labels"], pred["probs"])
    per = segmentation_per_image(pred, settings)
    if per is not None:
        out.update(M.summarise_segmentation(per, settings["hd95"], settings["empty_prediction"],
                                            per["resolution"]))
    else:
        out.update(dice=float("nan"), iou=float("nan"), hd95=float("nan"))
    out["n"] = int(len(pred["labels"]))
    return out


def score_groups(pred: Dict, settings: Optional[Dict] = None) -> Dict[str, Dict]:
    """{group: metrics} for each of ``settings['groups']`` (patient, breast): the images of a
    patient, or of one breast (a patient's views of one side), scored together
    (``avpt.metrics.group_metrics``). An image of unknown laterality is its own breast."""
    settings = M.metric_settings(settings)
    out: Dict[str, Dict] = {}
    probs = pred["class_probs"] if pred.get("class_probs") is not None else pred["probs"]
    per = segmentation_per_image(pred, settings)
    for group in settings["groups"]:
        if group == "patient":
            keys = list(pred["patients"])
        else:
            keys = [b if b is not None else f"{p}/image{i}"
                    for i, (p, b) in enumerate(zip(pred["patients"], pred["breasts"]))]
            unknown = sum(b is None for b in pred["breasts"])
            if unknown:
                log.warning("per-breast scores: %d of %d test images have no laterality; each "
                            "is its own breast", unknown, len(keys))
        out[group] = M.group_metrics(keys, pred["labels"], probs, per)
    return out


def grouped_record(pred: Dict, settings: Optional[Dict] = None) -> Dict:
    """metrics.json's ``test_by`` entry: {"test_by": {patient|breast: metrics}} when
    ``metrics.groups`` asks for groups, else {}."""
    groups = score_groups(pred, settings)
    return {"test_by": groups} if groups else {}


def _has_lesion(pred: Dict) -> bool:
    native = pred.get("native")
    if native is not None:
        return any(not m.empty for m in native)
    return bool(np.asarray(pred["gts"]).any())


def _undefined(value) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def undefined_metrics(pred: Dict[str, np.ndarray], metrics: Dict) -> Dict[str, str]:
    """Why each undefined (NaN -> null) test metric is undefined; each reason is also warned."""
    reasons: Dict[str, str] = {}
    labels = np.asarray(pred["labels"])
    classes = sorted({int(v) for v in labels})
    needed = pred["class_probs"].shape[1] if pred.get("class_probs") is not None else 2
    if needed > 2 and len(classes) < needed:
        reasons["auc"] = (f"the test set has classes {classes} of {needed} ({len(labels)} images): "
                          f"one-vs-rest AUC needs every class")
    elif len(classes) < 2:
        names = {0: "benign", 1: "malignant"}
        reasons["auc"] = (f"the test set has one class only ({', '.join(names.get(c, str(c)) for c in classes) or 'no images'}, "
                          f"{len(labels)} images): ROC AUC needs both classes")
    if pred["preds"] is None:
        for k in ("dice", "iou", "hd95"):
            reasons[k] = "the method has no segmentation head"
    elif not _has_lesion(pred):
        for k in ("dice", "iou", "hd95"):
            if _undefined(metrics.get(k)):
                reasons[k] = "no test image has a lesion mask"
    elif metrics.get("empty_prediction_images") == metrics.get("seg_images"):
        reasons["hd95"] = ("every lesion image has an empty predicted mask and "
                           "metrics.empty_prediction=skip leaves those out")
    undefined = {k: why for k, why in reasons.items() if _undefined(metrics.get(k))}
    for k, why in undefined.items():
        log.warning("test %s is undefined: %s", k, why)
    return undefined
