"""CILMP's settings: ``CILMPConfig`` (the paper's ViT-B/16 setting) and the names its fields
take."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..base import MethodConfig

AVERAGING_MODES = ("paper", "code", "off")
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
    fast_path: bool = True           # rank-r path whenever dropout is inactive (exact)
    averaging: str = "paper"         # Gaussian epoch averaging: paper | code | off
    averaging_mean: float = 100.0
    averaging_std: float = 30.0
    backend: Optional[str] = None    # avpt_kernels backend of project_knowledge (None: process-wide)


__all__ = ["AVERAGING_MODES", "CILMPConfig", "INTERVENTION_PARAMS"]
