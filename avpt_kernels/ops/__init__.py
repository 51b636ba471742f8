"""The fused ops, one package each, as in Liger-Kernel's ``ops/``, and their registry ``OPS``.

``OPS[name]`` is the op's package ``avpt_kernels.ops.<name>``; every package carries the same
parts: its Triton kernels, thin launchers, ``torch.library`` custom ops with autograd, its
argument checks and dispatch rule (``triton_unsupported_reason``, decided by
``avpt_kernels.backend.resolve``) in ``op``; its pure-PyTorch ground truth in ``reference``; its
description ``SPEC`` (inputs at a ``Shape``, reference, public op, traffic floor ``*_min_bytes``)
in ``spec``; its AOT list ``aot_configs()``. The AOT check, ``avpt_kernels.compare``, the
benchmarks (``benchmarks/ops/test_<name>.py``) and the tests (``tests/ops/test_<name>.py``) go
through ``OPS``; adding an op: ``docs/adding-an-op.md``.

``region_pool`` (Eq. 2), ``prompt_bank`` (Eq. 4), ``low_rank_project`` (CILMP's per-layer
rank-r chain ``x A_l^T B_l^T``), ``pim`` (Eqs. 5-10: the Prompt-token Interaction Module).
Shared: ``common`` (the references' compute dtype, the layers' stages), ``opspec`` (``Shape``,
``OpSpec``), ``kernel_config`` (``KernelConfig`` of the AOT lists). The public functions are
re-exported by the package (``avpt_kernels.pim`` etc.); the ``nn.Module`` wrappers live in
``avpt_kernels.modules``.
"""
from . import low_rank_project, pim, prompt_bank, region_pool

OPS = {package.SPEC.name: package for package in (region_pool, prompt_bank, low_rank_project, pim)}

__all__ = ["OPS"]
