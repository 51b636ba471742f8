"""A tiny A-VPT model that looks trained, shared by the model-level tests."""
import warnings

import torch

from avpt import backbone as bb
from avpt.methods import build_method


def train_gates(model):
    """A trained-looking A-VPT: every PIM weight ~ N(0, 1/fan_in) (p2t_o starts at zero, which
    would leave the tokens unchanged) and prompt-token offsets of order one, so the K prompts of
    an image differ and the softmaxes over prompts are neither uniform nor one-hot (nearly equal
    prompts make the key gradients pure cancellation, which no fp32 path reproduces to 1e-5)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.pims:
            for p in m.params():  # named views of the packed vector, in nn.Linear order
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        model.prompt_bank.token_offset.copy_(
            torch.randn(model.prompt_bank.token_offset.shape, generator=g))
    return model


def triton_device(backend_name):
    """Where a test of ``backend_name`` runs: backend='triton' on CUDA tensors when a GPU is
    present (tests/conftest.py sets TRITON_INTERPRET=1 only without one, and the Triton backend
    refuses CPU tensors without the interpreter); everything else on the CPU."""
    return "cuda" if backend_name == "triton" and torch.cuda.is_available() else "cpu"


def trained_looking_tiny_avpt(backend_name, **overrides):
    """``train_gates`` of A-VPT on the tiny backbone (random frozen weights, warning silenced);
    ``overrides`` go to ``build_method`` (queue_size 16 unless given). On CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bb.RandomWeightsWarning)
        model = build_method("avpt", model_name=bb.TINY_MODEL, backend=backend_name,
                             **{"queue_size": 16, **overrides})
    return train_gates(model)
