"""The fused ops, one module (or package) each, as in Liger-Kernel's ``ops/``: its Triton kernels,
thin launchers, ``torch.library`` custom ops with autograd, its argument checks, its dispatch
rule (``triton_unsupported_reason``, decided by ``avpt_kernels.backend.resolve``), its traffic
floor (``*_min_bytes``) and its AOT list (``aot_configs``).

``region_pool`` (Eq. 2), ``prompt_bank`` (Eq. 4), ``pim`` (Eqs. 5-10: the Prompt-token
Interaction Module; ``avpt_kernels.modules.PromptTokenInteraction`` is its ``nn.Module``),
``low_rank_project`` (CILMP's per-layer rank-r chain ``x A_l^T B_l^T``). The
torch references live in ``avpt_kernels.reference``; the package re-exports the public functions
(``avpt_kernels.pim`` etc. are the functions; the modules are ``avpt_kernels.ops.<op>``)."""
