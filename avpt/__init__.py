"""avpt: the A-VPT model, baselines, data and trainer on a frozen open_clip ViT-B/16,
built on the ops of ``avpt_kernels``."""

__version__ = "0.1.0"
