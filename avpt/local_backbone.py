"""Open_clip models from a local folder (``local-dir:PATH``), BiomedCLIP first.

The folder is open_clip's own layout, as BiomedCLIP is published
(``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``): ``open_clip_config.json``
(``model_cfg``, ``preprocess_cfg``) beside ``open_clip_pytorch_model.bin`` or
``open_clip_model.safetensors``. A Hugging Face text tower (BiomedCLIP's PubMedBERT) also needs
its ``config.json`` and tokenizer files in the folder: open_clip would otherwise fetch the text
config by its hub name. Nothing is downloaded: Hugging Face is switched offline while loading.

A timm vision trunk (open_clip ``TimmModel``, BiomedCLIP's ViT-B/16) is wrapped in
``TimmViTTower``, which shows the methods the same parts as open_clip's ``VisionTransformer``
(``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer.resblocks``,
``ln_post``, ``proj``, ``_pool``); its blocks are found through ``avpt_kernels.vit_adapters``, the
adapters ``inject_pim`` uses. Parameter names stay ``visual.trunk.*`` / ``visual.head.*``, so the
folder's weights load strictly.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterator, Optional, Tuple
from unittest import mock

import torch
from torch import Tensor, nn

LOCAL_DIR_PREFIX = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def is_local_dir(name) -> bool:
    return isinstance(name, str) and name.startswith(LOCAL_DIR_PREFIX)


def local_dir_path(name: str) -> Path:
    return Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()


def check_local_dir(name: str) -> Tuple[Path, Dict]:
    """(folder, open_clip_config.json contents) of ``local-dir:PATH``; ValueError (one line,
    naming --backbone and the file) when the folder is not an open_clip model folder."""
    folder = local_dir_path(name)
    where = f"--backbone {name!r}"
    if not folder.is_dir():
        raise ValueError(f"{where}: {folder} is not a folder (expected an open_clip model folder "
                         f"with {CONFIG_FILE} and {' or '.join(WEIGHT_FILES)})")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{where}: {config_path} is missing (open_clip's folder layout, as "
                         f"BiomedCLIP is published)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: {config_path} is not readable JSON ({exc})") from None
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not {"vision_cfg", "text_cfg"} <= set(model_cfg):
        raise ValueError(f"{where}: {config_path} has no model_cfg with vision_cfg and text_cfg")
    if "hf_model_name" in model_cfg["text_cfg"] and not (folder / "config.json").is_file():
        raise ValueError(f"{where}: the Hugging Face text tower "
                         f"{model_cfg['text_cfg']['hf_model_name']!r} needs its config.json in "
                         f"{folder} (nothing is downloaded)")
    return folder, config


def weights_file(name: str) -> Optional[Path]:
    """The folder's open_clip weights file (safetensors first), or None (random weights)."""
    folder = local_dir_path(name)
    for file in WEIGHT_FILES:
        if (folder / file).is_file():
            return folder / file
    return None


def has_folder_weights(name) -> bool:
    """Whether ``name`` is a ``local-dir:`` backbone whose folder holds its weights."""
    return is_local_dir(name) and weights_file(name) is not None


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """Hugging Face hub and transformers offline for the block (restored after)."""
    with mock.patch.dict(os.environ, _OFFLINE_ENV):
        yield


def get_tokenizer(name: str):
    """open_clip's tokenizer for ``name``; for ``local-dir:`` the folder's own (offline)."""
    import open_clip

    if not is_local_dir(name):
        return open_clip.get_tokenizer(name)
    check_local_dir(name)
    with hf_offline():
        return open_clip.get_tokenizer(name)


def create_local_model(name: str, quick_gelu: bool = False, device="cpu") -> nn.Module:
    """The open_clip model of the folder ``local-dir:PATH`` (weights from the folder, strict),
    its timm trunk wrapped in ``TimmViTTower``. Not frozen: ``avpt.backbone`` freezes it."""
    import open_clip

    folder, config = check_local_dir(name)
    text_cfg = dict(config["model_cfg"]["text_cfg"])
    overrides = {}
    if "hf_model_name" in text_cfg:
        # the text tower's HF config from the folder itself; its weights come with the
        # folder's checkpoint (or stay random without one), never from the hub
        text_cfg.update(hf_model_name=str(folder), hf_model_pretrained=False)
        overrides["text_cfg"] = text_cfg
    with hf_offline():
        model = open_clip.create_model(name, force_quick_gelu=quick_gelu, device=device,
                                       **overrides)
    if _is_timm_model(model.visual):
        model.visual = TimmViTTower(model.visual, name)
    return model


def tower_sizes(name: str) -> Dict[str, int]:
    """The folder model's tower sizes without loading weights: depth and width of the vision
    tower, grid (number of patch tokens), text_width. A timm trunk is built on the meta
    device (no memory, no weights)."""
    folder, config = check_local_dir(name)
    vis, txt = config["model_cfg"]["vision_cfg"], config["model_cfg"]["text_cfg"]
    if "timm_model_name" in vis:
        import timm

        with torch.device("meta"):
            trunk = timm.create_model(vis["timm_model_name"], pretrained=False)
        gh, gw = trunk.patch_embed.grid_size
        sizes = dict(depth=len(trunk.blocks), grid=gh * gw, vision_width=int(trunk.embed_dim))
    else:
        image, patch = vis.get("image_size", 224), vis["patch_size"]
        image = image if isinstance(image, int) else image[0]
        sizes = dict(depth=vis["layers"], grid=(image // patch) ** 2, vision_width=vis["width"])
    if "hf_model_name" in txt:
        hf = json.loads((folder / "config.json").read_text())
        sizes["text_width"] = int(hf.get("hidden_size", hf.get("d_model", 0)))
    else:
        sizes["text_width"] = txt["width"]
    return sizes


def _is_timm_model(visual: nn.Module) -> bool:
    from open_clip.timm_model import TimmModel

    return isinstance(visual, TimmModel)


class TimmViTTower(nn.Module):
    """An open_clip ``TimmModel`` (timm ViT ``trunk`` + ``head``) seen as open_clip's
    ``VisionTransformer``, so that every method runs on it unchanged.

    ``forward(images [B, 3, H, W]) -> [B, E]`` is the TimmModel's own forward. The parts
    (views of the trunk's own modules and parameters, nothing copied):
      conv1                 trunk.patch_embed.proj (Conv2d 3 -> D)
      class_embedding [D]   trunk.cls_token;  positional_embedding [T, D]  trunk.pos_embed
      patch_dropout, ln_pre trunk.patch_drop, trunk.norm_pre (Identity for a plain ViT)
      transformer           .resblocks = the trunk's blocks (via the timm ViTAdapter),
                            .batch_first = True, .width = D
      ln_post               trunk.norm;  proj [D, E]  head.proj.weight^T (no bias)
    Refused (ValueError naming --backbone) when the trunk is not a plain class-token ViT.
    """

    def __init__(self, timm_model: nn.Module, name: str = "local-dir"):
        super().__init__()
        from avpt_kernels.vit_adapters import find_adapter

        trunk = timm_model.trunk
        self.trunk, self.head = trunk, timm_model.head
        self.image_size = tuple(timm_model.image_size)
        adapter, tower = find_adapter(trunk)
        problem = self._unsupported(trunk, timm_model.head)
        native = tuple(getattr(trunk.patch_embed, "img_size", self.image_size))
        if not problem and native != self.image_size:
            problem = (f"its config's image_size {self.image_size} differs from the trunk's "
                       f"{native}")
        if adapter.name != "timm" or tower is not trunk or problem:
            why = problem or "not a timm ViT"
            raise ValueError(f"--backbone {name!r}: its timm vision trunk {type(trunk).__name__} "
                             f"is not supported ({why}); a plain class-token timm ViT with a "
                             f"linear projection is")
        self._adapter = adapter  # a dataclass, not a module: the blocks stay named trunk.blocks
        # the head's Linear is read as a matrix (``proj``) outside autocast-cast ops:
        # avpt.frozen_weights keeps it fp32
        self.head.reads_frozen_weights = True

    @staticmethod
    def _unsupported(trunk: nn.Module, head: nn.Module) -> str:
        if getattr(trunk, "cls_token", None) is None or getattr(trunk, "num_prefix_tokens", 1) != 1:
            return "it needs exactly one class token and no register tokens"
        if getattr(trunk, "no_embed_class", False) or getattr(trunk, "pos_embed", None) is None:
            return "its positional embedding must cover the class token"
        if getattr(trunk, "global_pool", "token") != "token":
            return f"pooling {trunk.global_pool!r} (the class token is read)"
        if not isinstance(getattr(trunk.patch_embed, "norm", nn.Identity()), nn.Identity):
            return "a normalised patch embedding"
        if not isinstance(getattr(trunk, "fc_norm", nn.Identity()), nn.Identity):
            return "a pooled-feature norm (fc_norm)"
        proj = getattr(head, "proj", None)
        if not isinstance(proj, nn.Linear) or proj.bias is not None \
                or any(k not in ("drop", "proj") for k, _ in head.named_children()):
            return "the head must be one linear projection without bias"
        return ""

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.trunk(images))

    # -- open_clip VisionTransformer's parts ------------------------------------------------------
    @property
    def conv1(self) -> nn.Conv2d:
        return self.trunk.patch_embed.proj

    @property
    def patch_size(self) -> Tuple[int, int]:
        return tuple(self.trunk.patch_embed.patch_size)

    @property
    def grid_size(self) -> Tuple[int, int]:
        return tuple(self.trunk.patch_embed.grid_size)

    @property
    def class_embedding(self) -> Tensor:
        return self.trunk.cls_token.view(-1)

    @property
    def positional_embedding(self) -> Tensor:
        return self.trunk.pos_embed[0]

    @property
    def patch_dropout(self) -> nn.Module:
        return self.trunk.patch_drop

    @property
    def ln_pre(self) -> nn.Module:
        return self.trunk.norm_pre

    @property
    def ln_post(self) -> nn.Module:
        return self.trunk.norm

    @property
    def proj(self) -> Tensor:
        return self.head.proj.weight.t()

    @property
    def transformer(self) -> SimpleNamespace:
        return SimpleNamespace(resblocks=self._adapter.blocks(self.trunk), batch_first=True,
                               width=self._adapter.dim(self.trunk))

    def _pool(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Final tokens [B, T, D] -> (class token [B, D], patch tokens [B, N, D]) after the norm."""
        x = self.trunk.norm(x)
        return x[:, 0], x[:, 1:]


__all__ = ["LOCAL_DIR_PREFIX", "is_local_dir", "check_local_dir", "weights_file",
           "has_folder_weights", "hf_offline", "get_tokenizer", "create_local_model", "tower_sizes", "TimmViTTower"]
