"""BiomedAP's settings (``BiomedAPConfig``), the output record its loss reads
(``BiomedAPOutput``) and where its fusion layers go (``resolve_fusion_layers``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

from torch import Tensor

from ..base import MethodOutput
from ..coop import CoOpConfig

PAPER_FUSION_LAYERS, PAPER_DEPTH = (5, 8), 12
FUSION_INPUTS = ("code", "image-tokens")
LOW_ANCHORS = ("code", "visual-prototypes")
# configs saved in earlier versions named the readings "paper" (the paper does not say them)
_LEGACY = {"fusion_input": {"paper": "image-tokens"}, "low_anchor": {"paper": "visual-prototypes"}}



@dataclass
class BiomedAPConfig(CoOpConfig):
    """BiomedAP settings (defaults: the authors' code, its BUSI config; docs/methods/biomedap.md).

    ``ctx_init``/``template``: ``{modality}`` is replaced by ``modality_word`` (None: the
    trainer sets it from the data, ``avpt.data.modality_word``; "medical" without data); ``ctx_init=None``
    starts the context at N(0, 0.02^2) like ``coop``. ``fusion_layers``: 0-based block indices
    (fusion runs before that block); None = (5, 8) of 12 blocks scaled to the backbone's depth
    (round(i * depth / 12)); () = no fusion. ``fusion_input``: "code" (zeros, default) or
    "image-tokens" (a reading: the image's tokens at the prompt positions). ``fusion_broadcast``: in "code" mode compute the
    fusion once and broadcast (False: per image; equal results, kept for tests/benchmarks).
    ``low_anchor``: "code" (default: bare class-name text features) or "visual-prototypes"
    (a reading: visual prototypes of the training images, set by
    ``prepare``/``set_visual_prototypes``).
    ``descriptions_hash``: filled at build with the hash of the a_high texts; a different value
    given is refused."""
    num_context: int = 4
    modality_word: Optional[str] = None
    ctx_init: Optional[str] = "a {modality} photo of a"
    template: str = "a {modality} photo of a {class} in the breast."
    num_visual_prompts: int = 4
    fusion_layers: Optional[Tuple[int, ...]] = None
    fusion_heads: int = 8
    fusion_dropout: float = 0.1
    fusion_input: str = "code"
    fusion_broadcast: bool = True
    low_anchor: str = "code"
    lambda_high: float = 18.75
    lambda_kl: float = 1.0
    lambda_low: float = 1.0
    lambda_align: float = 0.1
    descriptions_hash: Optional[str] = None
    # "authors-busi": the authors' BUSI config as their code runs it (N_CTX 5 with a random
    # start: their prompt learner reads CTX_INIT only when N_CTX <= 4); "abstract-reading":
    # both readings of the abstract
    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {
        "authors-busi": {"num_context": 5, "ctx_init": None, "context_init": ""},
        "abstract-reading": {"fusion_input": "image-tokens", "low_anchor": "visual-prototypes"}}


@dataclass
class BiomedAPOutput(MethodOutput):
    """``MethodOutput`` plus text_features [C, E] (normalised t^) and text_out [L_f, B, M, d_t]
    (the text side of each fusion layer; None without fusion or with lambda_align = 0)."""
    text_features: Optional[Tensor] = None
    text_out: Optional[Tensor] = None


def resolve_fusion_layers(layers: Optional[Tuple[int, ...]], depth: int) -> Tuple[int, ...]:
    """The fusion block indices for a tower of ``depth`` blocks (see ``BiomedAPConfig``)."""
    if layers is None:
        return tuple(sorted({round(i * depth / PAPER_DEPTH) for i in PAPER_FUSION_LAYERS}))
    layers = tuple(layers)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < depth]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"fusion_layers must be distinct block indices in [0, {depth}) for this "
                         f"{depth}-block backbone, got {list(layers)}")
    return tuple(sorted(layers))


__all__ = ["BiomedAPConfig", "BiomedAPOutput", "FUSION_INPUTS", "LOW_ANCHORS",
           "resolve_fusion_layers"]
