"""The Table 10 setting, shared by the model-level benchmark rows (``benchmarks/test_table10.py``)
and the GPU profile (``benchmarks/gpu_profile.py``): device, backbone, batch, autocast, the rows
(name, method, config overrides), and how a row prepares its method, makes its batch and runs
its forward and its CLS + SEG training step.

GPU: ViT-B/16, batch 32, 224x224, bf16 autocast, frozen weights stored in bf16. CPU: the tiny
config, batch 2 (smoke run).
"""
import torch

from avpt.backbone import TINY_MODEL, VIT_B16
from avpt.frozen_weights import store_frozen_weights
from avpt.losses import method_loss
from benchmarks.harness import ON_GPU

DEVICE = "cuda" if ON_GPU else "cpu"
MODEL, BATCH = (VIT_B16, 32) if ON_GPU else (TINY_MODEL, 2)
AUTOCAST = dict(device_type=DEVICE, dtype=torch.bfloat16, enabled=ON_GPU)
# (row name, method, config overrides)
METHODS = [
    ("backbone", "linear", {}),
    ("full", "full", {}),
    ("adapter", "adapter", {}),
    ("lora", "lora", {}),
    ("vpt", "vpt", {}),
    ("avpt-eager", "avpt", {"backend": "torch"}),
    ("avpt-fused", "avpt", {"backend": "triton"}),
    ("cilmp", "cilmp", {}),
    ("biomedap", "biomedap", {}),
]


def prepare_method(method) -> dict:
    """The method as a run prepares it (frozen weights in bf16 under bf16 autocast on a GPU);
    the row fields that say so."""
    cast = store_frozen_weights(method, AUTOCAST["dtype"] if ON_GPU else None, DEVICE)
    return {"frozen_weights": "bf16" if cast else "fp32"}


def make_batch(method):
    """(images [B, 3, H, W], maps [B, 3, H, W], labels [B], masks [B, 1, H, W]) on DEVICE at the
    method's image size, the same every call (seed 0)."""
    size = method.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, *size, generator=g).to(DEVICE)
    maps = torch.rand(BATCH, 3, *size, generator=g).to(DEVICE)
    labels = torch.randint(0, 2, (BATCH,), generator=g).to(DEVICE)
    masks = (torch.rand(BATCH, 1, *size, generator=g) > 0.5).float().to(DEVICE)
    return images, maps, labels, masks


def row_forward(row_name, method, images, maps):
    """A row's forward: the frozen backbone's ``encode_image`` for "backbone", else the method
    (with the maps it takes)."""
    if row_name == "backbone":  # the frozen backbone alone: open_clip's encode_image
        return method.backbone.encode_image(images)
    return method(images, maps=method.forward_maps({"maps": maps}))


def graph_forward(row_name, method):
    """``(images, maps) -> outputs`` (batch on dim 0) of a row, as GraphedInference takes it."""
    if row_name == "backbone":
        return lambda images, maps: (method.backbone.encode_image(images),)

    def forward(images, maps):
        out = row_forward(row_name, method, images, maps)
        return out.logits, out.seg_logits
    return forward


class MethodLossStep(torch.nn.Module):
    """TrainStep's interface (batch dict -> loss terms) around the benchmark's CLS + SEG step."""

    def __init__(self, row_name, method):
        super().__init__()
        self.row_name, self.method = row_name, method

    def forward(self, batch):
        out = row_forward(self.row_name, self.method, batch["image"], batch["maps"])
        return method_loss(self.method, out, batch["label"], batch["mask"])
