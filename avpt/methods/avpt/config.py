"""A-VPT's settings: ``AVPTConfig`` (paper defaults) and the names its fields take."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..base import MethodConfig
from .anatomy import REGION_NAMES

SCHEDULES = ("early", "middle", "late", "all", "hierarchical")
NUM_STAGES = 3
# The paper's claim: A-VPT trains under 2% of the ViT-B/16 visual tower's parameters.
BUDGET_PERCENT = 2.0


@dataclass
class AVPTConfig(MethodConfig):
    """A-VPT hyper-parameters (paper defaults: K=6, R=3, r=8; Eq. 17 weights)."""
    num_regions: int = 3            # R: glandular, fatty, ductal
    num_prompts: int = 6            # K = R * tokens per region
    rank: int = 8                   # r of the low-rank prompt maps (Eq. 4)
    schedule: str = "hierarchical"  # Table 8: early | middle | late | all | hierarchical
    pim_heads: int = 4              # PIM attention: heads x head width = A = 64
    pim_head_dim: int = 16
    gate_hidden: int = 16           # G of the gate MLP (Eq. 9)
    pim_sharing: str = "stage"      # "stage": one PIM per stage; "layer": one per injected layer
    t2p_reduce: str = "mean"        # Eq. 6 token reduction: "mean" keeps P~ at the scale of P
    region_source: str = "given"    # given | prior | learned
    prior_modality: str = "MG"      # modality for tissue priors when forward gets none
    anatomy_hidden: int = 64        # hidden width of the Anatomy MLP (Eq. 3)
    extractor_hidden: int = 16      # channels of the learned region extractor
    contrast_dim: int = 128         # d_c of the contrastive projector h_phi (Eq. 11)
    region_names: Tuple[str, ...] = REGION_NAMES
    text_phrases: Tuple[str, ...] = ("glandular tissue", "fatty tissue", "ductal structure")
    lambda_rcl: float = 0.2
    lambda_txt: float = 0.1
    lambda_lap: float = 0.05
    tau: float = 0.07               # RCL temperature (Eq. 12)
    tau_txt: float = 0.07           # TXT temperature (Eq. 13)
    region_types: str = "atlas"     # "atlas": slot k is type k; "ema": nearest EMA centroid
    ema_momentum: float = 0.99
    queue_size: int = 256           # per-modality memory queue of region embeddings (0: none)
    gate_shut: bool = False         # force every PIM gate alpha = 0 (drop-in check)
    rollout_gamma: float = 1.0      # gamma of Eq. 18
    backend: Optional[str] = None   # avpt_kernels backend of the ops (None: process-wide)


__all__ = ["AVPTConfig", "BUDGET_PERCENT", "NUM_STAGES", "SCHEDULES"]
