"""CILMP's settings: ``CILMPConfig`` (the paper's ViT-B/16 setting) and the names its fields
take."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from ..base import MethodConfig

AVERAGING_MODES = ("code", "all", "off")
# configs saved before the defaults followed the authors' code called the "all" reading "paper"
# (the abstract says no more than "Gaussian averaging of prompts")
_LEGACY_AVERAGING = {"paper": "all"}
# the authors' run: N(100, 30) over 100 epochs; scaled to the run's epochs when not given
AVERAGING_MEAN_SHARE, AVERAGING_STD_SHARE = 1.0, 0.3
# Trainable tensors the reference code's epoch averaging leaves at their last value ("code").
INTERVENTION_PARAMS = ("R", "W_s", "b_s", "W_a", "b_a", "W_b", "b_b", "A", "B")


@dataclass
class CILMPConfig(MethodConfig):
    """CILMP settings (defaults: the paper's ViT-B/16 setting). ``knowledge_dir``: folder of
    ``<class name>.safetensors`` states (e.g. an LLM's, any width); None: the description texts
    through the frozen text tower (d_k = text width). ``knowledge_texts`` / ``knowledge_hash``
    are filled in at build (the texts used and their hash); a given hash must match."""
    class_names: Tuple[str, ...] = ("benign lesion", "malignant lesion")
    visual_prompts: int = 4          # K_v tokens replaced before each vision block
    text_context: int = 4            # K text context tokens per text layer
    context_init: str = "a photo of a"
    rank: int = 8                    # r
    prefix_length: int = 4           # knowledge tokens through the prefix intervention
    suffix_length: int = 4           # knowledge tokens through the suffix intervention
    phi_dropout: float = 0.1
    knowledge_dir: Optional[str] = None
    knowledge_width: Optional[int] = None   # d_k; None: the source's width
    knowledge_length: int = 16       # description tokens kept per class (description source)
    fit_context: bool = True         # description source: cut knowledge_length (and prefix and
                                     # suffix to half of it each) to what the text context holds;
                                     # the values used are written back to the config
    knowledge_texts: Optional[Dict[str, List[str]]] = None
    knowledge_hash: Optional[str] = None
    knowledge_source: Optional[str] = None  # filled at build: "CLIP-text" or the LM's name
    fast_path: bool = True           # rank-r path whenever dropout is inactive (exact)
    averaging: str = "code"          # Gaussian epoch averaging: code | all | off
    averaging_mean: Optional[float] = None  # in epochs; None: the run's epochs (authors: 100 of 100)
    averaging_std: Optional[float] = None   # None: 0.3 x the run's epochs (authors: 30 of 100)
    # "abstract-reading": every trainable tensor averaged (the abstract's "averaging of prompts")
    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {"abstract-reading": {"averaging": "all"}}
    backend: Optional[str] = None    # avpt_kernels backend of project_knowledge (None: process-wide)


__all__ = ["AVERAGING_MODES", "AVERAGING_MEAN_SHARE", "AVERAGING_STD_SHARE", "CILMPConfig",
           "INTERVENTION_PARAMS"]
