"""What every method shares: the config base class, the output record, the frozen backbone with
the task heads, and the registry by name (PEFT-style: config dataclass + module + name)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Type

from torch import Tensor, nn

from .. import vit
from ..backbone import VIT_B16, load_backbone
from ..heads import ClassificationHead, SegDecoder
from ..losses import MethodLoss
from ..recipes import Recipe


@dataclass
class MethodConfig:
    """Fields every method has. ``pretrained``: local open_clip checkpoint path or None (random
    weights, with a warning)."""
    model_name: str = VIT_B16
    pretrained: Optional[str] = None
    quick_gelu: bool = False
    num_classes: int = 2
    seg: bool = True          # build the segmentation decoder (Eq. 15)
    seg_hidden: int = 32
    lambda_seg: float = 1.0   # weight of L_SEG in Eq. 17 (all methods train CLS + SEG)
    seg_bce_weight: float = 1.0  # beta of Eq. 15
    # "default" or a name in the config class's PRESETS: the preset's values replace the fields
    # still at their defaults (a field given a non-default value keeps it)
    preset: str = "default"
    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {}

    def __post_init__(self):
        if self.preset == "default":
            return
        if self.preset not in self.PRESETS:
            raise ValueError(f"preset must be one of {preset_names(type(self))}, got {self.preset!r}")
        fields = {f.name: f for f in dataclasses.fields(self)}
        for k, v in self.PRESETS[self.preset].items():
            f = fields[k]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if getattr(self, k) == default:
                setattr(self, k, v)

    def to_dict(self) -> Dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Dict) -> "MethodConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        fixed = {}
        for k, v in values.items():
            default = names[k].default if names[k].default is not dataclasses.MISSING else None
            if names[k].default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = names[k].default_factory()  # type: ignore[misc]
            fixed[k] = tuple(v) if isinstance(v, list) and isinstance(default, tuple) else v
        return cls(**fixed)


def preset_names(config_class: Type[MethodConfig]) -> List[str]:
    """The presets a method config takes: "default" and its ``PRESETS``."""
    return ["default", *config_class.PRESETS]


@dataclass
class MethodOutput:
    """What a method's forward returns. logits [B, C]; seg_logits [B, 1, H, W] or None;
    features [B, E] (= encode_image for an unchanged backbone); pooled [B, D] (ln_post class
    token); tokens [B, N, D] (ln_post patch tokens). A-VPT also fills region_emb [B, R, D],
    prompts [L_inj, B, K, D], maps [B, R, h, w], region_contrast [B, R, d_c] (Eq. 11) and
    region_text [B, R, E] (the t_k of Eq. 13) when its loss uses them, and, on request, attn
    (one [B, H, K, T] per injected layer)."""
    logits: Optional[Tensor]
    seg_logits: Optional[Tensor]
    features: Tensor
    pooled: Tensor
    tokens: Tensor
    region_emb: Optional[Tensor] = None
    prompts: Optional[Tensor] = None
    maps: Optional[Tensor] = None
    attn: Optional[List[Tensor]] = None
    region_contrast: Optional[Tensor] = None
    region_text: Optional[Tensor] = None


class Method(nn.Module):
    """A frozen open_clip backbone plus heads. Subclasses implement ``encode`` (images ->
    final tokens [B, T, D] and extras) and decide what is trainable.

    What differs between methods is asked of the method, never decided by its name: the hooks
    ``forward_maps`` (inputs from a batch), ``make_loss`` (the training objective), ``prepare``
    (state computed from the training set before training), ``report_sections`` (extra
    figures) and the class attributes ``display_name`` (tables and reports),
    ``reference_recipe`` (its authors' training recipe, ``avpt.recipes``),
    ``has_report_sections``, ``param_breakdown_title`` and ``param_budget_percent`` (parameter
    reports). Their defaults fit a method that needs nothing beyond images; a method overrides
    what it does differently.
    """

    name = ""
    # how tables and reports name the method (e.g. "A-VPT"); ``register`` sets it to the
    # registered name where a class gives none of its own
    display_name = ""
    config_class: Type[MethodConfig] = MethodConfig
    # True when ``report_sections`` draws figures (``avpt explain`` refuses other methods)
    has_report_sections = False
    # ``avpt params``: print the trainable-parameter breakdown under this title (None: no breakdown)
    param_breakdown_title: Optional[str] = None
    # ``avpt params`` on ViT-B/16 exits 1 when the trainable share of the visual tower (in %)
    # exceeds this budget (None: no budget)
    param_budget_percent: Optional[float] = None
    # the most classes the method can tell apart (None: any number, ``num_classes``)
    max_classes: Optional[int] = None
    # its authors' training recipe, ``recipe: reference`` (``avpt.recipes``; None: none known here)
    reference_recipe: Optional[Recipe] = None

    def __init__(self, config: MethodConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config
        self.backbone = load_backbone(config.model_name, config.pretrained, config.quick_gelu)
        width = vit.width(self.visual)
        self.head = ClassificationHead(width, config.num_classes) if self.uses_linear_head else None
        self.seg_decoder = SegDecoder(width, config.seg_hidden) if config.seg else None

    uses_linear_head = True

    @property
    def visual(self) -> nn.Module:
        return self.backbone.visual

    def row_label(self) -> str:
        """How this run's rows are named: ``display_name``, plus what a method's configuration
        makes worth naming (CILMP: its knowledge source)."""
        return self.display_name

    def train(self, mode: bool = True):
        """The backbone always stays in eval mode (dropout off), trainable or not."""
        super().train(mode)
        self.backbone.eval()
        return self

    def encode(self, images: Tensor, maps=None, modality=None, return_attn: bool = False) -> Dict:
        """-> dict with ``z`` (final tokens [B, T, D], batch-first) and optional extras."""
        raise NotImplementedError

    def classify(self, pooled: Tensor, features: Tensor) -> Tensor:
        return self.head(pooled)

    def forward(self, images: Tensor, maps: Optional[Tensor] = None, modality=None,
                return_attn: bool = False) -> MethodOutput:
        vit.check_images(self.visual, images)
        extras = self.encode(images, maps=maps, modality=modality, return_attn=return_attn)
        pooled, tokens, features = vit.pool(self.visual, extras.pop("z"))
        seg = None
        if self.seg_decoder is not None:
            seg = self.seg_decoder(tokens, self.visual.grid_size, tuple(images.shape[2:]))
        return MethodOutput(logits=self.classify(pooled, features), seg_logits=seg,
                            features=features, pooled=pooled, tokens=tokens, **extras)

    def trainable_state_dict(self) -> Dict[str, Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    # -- hooks: what the trainer, the report and ``avpt params`` ask of a method ----------------
    def forward_maps(self, batch: Dict[str, Tensor]) -> Optional[Tensor]:
        """What ``forward`` takes as ``maps`` from a loader batch (keys ``image`` [B, 3, H, W],
        ``maps`` [B, R, H, W], ``mask``, ``label``, ``modality``, ``index``). Default: None (the
        method reads images only)."""
        return None

    def make_loss(self, **options: Any) -> nn.Module:
        """The training objective, a module called as ``loss(out, labels [B], masks [B, 1, H, W],
        modality [B], update_state: bool) -> {term: scalar tensor}`` with every active term and
        their weighted total under ``"loss"``; ``update_state`` (training) lets the loss update
        its own buffers (queues, centroids), saved in the training checkpoint (``loss_state``).
        The loss holds no model: what it needs of the method comes in ``out`` (a method adds
        fields to its ``MethodOutput`` for that, as A-VPT does). ``options``: the
        run's loss settings (e.g. ``rcl_positives``); a method ignores those it does not use.
        Default: CLS + lambda_seg * SEG (``avpt.losses.MethodLoss``)."""
        return MethodLoss(self.config)

    def prepare(self, train_set, device, dtype=None, batch_size: int = 64) -> None:
        """Called by the trainer before the first training step of every start (fresh run and
        resume, every DDP rank), after the data are built: state the method computes from the
        training data (e.g. BiomedAP's visual prototypes). ``train_set``: the whole training set
        un-augmented (eval transforms), a sequence of items as a ``BreastDataset``'s (``image``
        [3, H, W], ``label`` [], ...; the trainer's also has ``labels`` [N]; iterate it with
        ``unaugmented_batches``);
        ``device`` the run's device, ``dtype`` its autocast dtype (None: full precision),
        ``batch_size`` the run's evaluation batch size. Whatever it sets must be deterministic
        (a resume recomputes it). Default: nothing."""
        return None

    def make_epoch_averager(self, epochs: int) -> Optional[Any]:
        """An averager of the trainable weights over the epochs of a run of ``epochs`` epochs, or
        None (default: the last epoch's weights are the result). The trainer calls its
        ``update(model, epoch)`` after each epoch (1-based), saves ``state_dict()`` in the
        training checkpoint and ``load_state_dict`` on resume, and ``load_into(model)`` before
        the final evaluation and saving."""
        return None

    def report_sections(self, dataset, indices: List[int], device, fig_dir: str
                        ) -> Dict[str, Optional[str]]:
        """Figures only this method has, for ``report.html`` and ``avpt explain``: {caption: PNG
        path under ``fig_dir``, or None where a figure could not be drawn}, of the images
        ``dataset[i]`` for ``i`` in ``indices``. Default: none."""
        return {}


def unaugmented_batches(dataset, batch_size: int, device) -> Iterator[Dict[str, Tensor]]:
    """The items of ``dataset`` in order, ``batch_size`` at a time, collated and on ``device``
    (``image`` [B, 3, H, W], ``label`` [B], ...). No DataLoader: draws nothing from the RNG."""
    from torch.utils.data import default_collate

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(dataset), batch_size):
        batch = default_collate([dataset[i] for i in range(start, min(start + batch_size,
                                                                      len(dataset)))])
        yield {k: v.to(device) for k, v in batch.items()}


def frozen_encode(method: Method, images: Tensor) -> Dict:
    """The unchanged backbone's blocks: images [B, 3, H, W] -> dict(z=final tokens [B, T, D])."""
    visual = method.visual
    z = vit.embed(visual, vit.patch_embed(visual, images))
    for layer in range(vit.num_layers(visual)):
        z = vit.block(visual, layer, z)
    return dict(z=z)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
# Filled by ``@register`` as ``avpt.methods`` imports each method's module.
_REGISTRY: Dict[str, Type[Method]] = {}


def register(name: str):
    """Class decorator: make a ``Method`` subclass buildable by ``name``."""
    def wrap(cls: Type[Method]) -> Type[Method]:
        cls.name = name
        if not cls.__dict__.get("display_name"):   # not inherited: a subclass names itself
            cls.display_name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def method_names() -> List[str]:
    return list(_REGISTRY)


def get_method_class(name: str) -> Type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {list(_REGISTRY)}")
    return _REGISTRY[name]


def get_config_class(name: str) -> Type[MethodConfig]:
    return get_method_class(name).config_class


def build_method(name: str, config: Optional[MethodConfig] = None, **overrides) -> Method:
    """``build_method("avpt", model_name="avpt-tiny", num_classes=3)``: the method ``name`` with
    its config (defaults, updated by ``overrides``)."""
    cls = get_method_class(name)
    if config is None:
        config = cls.config_class(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return cls(config)


__all__ = ["MethodConfig", "preset_names", "MethodOutput", "Method", "frozen_encode", "unaugmented_batches", "register", "build_method", "method_names",
           "get_method_class", "get_config_class"]
