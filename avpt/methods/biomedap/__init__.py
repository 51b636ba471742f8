"""BiomedAP (vision-informed dual-anchor prompt tuning with gated cross-modal fusion), all of it
in this package:

* ``config.py``  ``BiomedAPConfig`` (paper defaults), ``BiomedAPOutput``, the fusion layers;
* ``model.py``   ``BiomedAP`` (registered as ``"biomedap"``): CoOp text context, visual prompts,
                 the anchors (a_high from the class descriptions, a_low visual prototypes);
* ``fusion.py``  ``GatedCrossModalFusion``;
* ``loss.py``    ``BiomedAPLoss`` and ``loss_terms`` (SEG is shared: ``avpt.losses``).

The class descriptions behind a_high are CILMP's (``avpt.methods.cilmp.descriptions``).
"""
from .config import BiomedAPConfig, BiomedAPOutput, resolve_fusion_layers
from .fusion import GatedCrossModalFusion
from .loss import BiomedAPLoss, alignment_loss, loss_terms
from .model import BiomedAP

__all__ = ["BiomedAP", "BiomedAPConfig", "BiomedAPLoss", "BiomedAPOutput", "GatedCrossModalFusion",
           "alignment_loss", "loss_terms", "resolve_fusion_layers"]
