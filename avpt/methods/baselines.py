"""Old import path of the six baselines, each in its own module of ``avpt.methods`` now:
``linear``, ``full``, ``vpt``, ``lora``, ``adapter``, ``coop``."""
from .adapter import Adapter, AdapterConfig, AdapterTuning  # noqa: F401
from .base import frozen_encode as _frozen_encode  # noqa: F401
from .coop import CoOp, CoOpConfig  # noqa: F401
from .full import FullConfig, FullFineTune  # noqa: F401
from .linear import LinearConfig, LinearProbe  # noqa: F401
from .lora import LoRA, LoRAConfig, LoRAMultiheadAttention  # noqa: F401
from .vpt import VPTConfig, VPTDeep  # noqa: F401
