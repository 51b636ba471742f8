"""CILMP (conditional intervention of LLM-derived knowledge into multimodal prompts), all of it
in this package:

* ``config.py``        ``CILMPConfig`` (the paper's ViT-B/16 setting);
* ``model.py``         ``CILMP`` (registered as ``"cilmp"``): deep visual prompts, deep text
                       context, the per-(image, class) knowledge interventions, epoch averaging;
* ``knowledge.py``     the per-class knowledge states h_c (from descriptions or user files);
* ``descriptions.py``  the per-class description texts (BiomedAP's a_high uses them too).

CILMP trains the shared CLS + SEG objective (``avpt.losses.MethodLoss``).
"""
from .config import CILMPConfig
from .model import CILMP, Intervention, PromptAveraging, project_knowledge

__all__ = ["CILMP", "CILMPConfig", "Intervention", "PromptAveraging", "project_knowledge"]
