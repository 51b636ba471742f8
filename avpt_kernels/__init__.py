"""avpt-kernels: fused ops for Anatomy-guided Visual Prompt Tuning (A-VPT).

Ops (``avpt_kernels.ops.<op>``: kernels, launchers, custom ops): ``region_pool`` (Eq. 2),
``prompt_bank`` (Eq. 4), ``pim`` / ``pim_packed`` (Eqs. 5-10, the Prompt-token Interaction Module),
``low_rank_project`` (CILMP's per-layer rank-r chain); modules
``RegionPool``, ``LowRankPromptBank``, ``PromptTokenInteraction``. Backend switch in
``avpt_kernels.backend`` (``set_backend``, ``use_backend``); ground truth in
``avpt_kernels.reference``. Drop-in PIM for open_clip, timm and Hugging Face ViTs:
``inject_pim`` / ``remove_pim`` / ``pim_state_dict`` / ``load_pim_state_dict``, ``PIMBlock``
(``avpt_kernels.inject``).
"""
from . import _compat  # noqa: F401  (Triton < 3.8 interpreter with numpy >= 2.4)
from .backend import get_backend, set_backend, use_backend
from .inject import PIMBlock, inject_pim, make_pim_blocks, pim_gates_shut, remove_pim
from .inject_io import load_pim_pretrained, load_pim_state_dict, pim_state_dict, save_pim_pretrained
from .modules import LowRankPromptBank, PromptTokenInteraction, RegionPool, contiguous_stages
from .ops.pim import pack_weights, pim, pim_packed, unpack_weights
from .ops.low_rank_project import low_rank_project
from .ops.prompt_bank import prompt_bank
from .ops.region_pool import region_pool
from .reference import PIMParams

__version__ = "0.1.0"

__all__ = [
    "region_pool", "prompt_bank", "low_rank_project", "pim", "pim_packed", "pack_weights", "unpack_weights", "PIMParams",
    "RegionPool", "LowRankPromptBank", "PromptTokenInteraction", "contiguous_stages",
    "get_backend", "set_backend", "use_backend", "__version__",
    "PIMBlock", "inject_pim", "remove_pim", "pim_state_dict", "load_pim_state_dict",
    "save_pim_pretrained", "load_pim_pretrained",
    "make_pim_blocks", "pim_gates_shut",
]
