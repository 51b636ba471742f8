"""A-VPT (Anatomy-guided Visual Prompt Tuning), all of it in this package:

* ``config.py``   ``AVPTConfig`` (paper defaults), schedules, the parameter budget;
* ``model.py``    ``AVPT`` (registered as ``"avpt"``): region maps, ARE, prompt bank, PIMs, heads;
* ``anatomy.py``  region sources, the learned extractor, the Anatomy MLP (Eq. 3), region adjacency;
* ``loss.py``     ``AVPTLoss`` (Eq. 17) and its terms RCL, TXT, LAP with the region queues and
                  EMA centroids (CLS and SEG are shared: ``avpt.losses``);
* ``rollout.py``  prompt-guided attention rollout (Eq. 18) and A-VPT's report figures.
"""
from .config import BUDGET_PERCENT, NUM_STAGES, SCHEDULES, AVPTConfig
from .loss import AVPTLoss
from .model import AVPT, injection_plan

__all__ = ["AVPT", "AVPTConfig", "AVPTLoss", "BUDGET_PERCENT", "NUM_STAGES", "SCHEDULES",
           "injection_plan"]
