"""PIM's weights: the weight type ``PIMParams`` (nn.Linear layout), the packed layout (the 20
fields in one flat vector per layer: what ``PromptTokenInteraction`` stores and the kernels read)
with the offset of each field in it, the legacy state-dict names (one ``nn.Linear`` per
projection), and the sizes the Triton path takes (the one statement of PIM's limits).

Notation: D hidden size, K prompt tokens, H heads of width dh, A = H * dh, G gate hidden width.
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

# The sizes the Triton path takes (anything else: ValueError for backend="triton", the torch
# path for "auto"; ``op.unsupported_sizes`` applies them). K, dh and G are padded to one
# power-of-two tile (>= 16, the tensor-core minimum) in the per-(image, head) attention kernels;
# A to one in the prompt-row kernels. D and T: any.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_PROMPTS = 16          # 1 <= K <= 16
HEAD_WIDTHS = (8, 64)     # 8 <= dh <= 64
MAX_WIDTH = 64            # A = H * dh <= 64
MAX_GATE_HIDDEN = 64      # G <= 64


class PIMParams(NamedTuple):
    """Every weight of a PIM layer, in ``nn.Linear`` layout (weight [out, in], bias [out]).

    t2p_*: token->prompt attention (Eqs. 5-6), p2t_*: prompt->token attention (Eqs. 7-8);
    q/k/v weights are [A, D], o weights [D, A]; gate: Linear(2D, G) -> GELU -> Linear(G, 1).
    """
    t2p_q_w: Tensor
    t2p_q_b: Tensor
    t2p_k_w: Tensor
    t2p_k_b: Tensor
    t2p_v_w: Tensor
    t2p_v_b: Tensor
    t2p_o_w: Tensor
    t2p_o_b: Tensor
    p2t_q_w: Tensor
    p2t_q_b: Tensor
    p2t_k_w: Tensor
    p2t_k_b: Tensor
    p2t_v_w: Tensor
    p2t_v_b: Tensor
    p2t_o_w: Tensor
    p2t_o_b: Tensor
    gate_w1: Tensor
    gate_b1: Tensor
    gate_w2: Tensor
    gate_b2: Tensor


def weight_shapes(d: int, a: int, gate_hidden: int) -> List[Tuple[int, ...]]:
    """Shapes of the PIMParams fields in order: per side (t2p, p2t) q, k, v (W [A,D], b [A]) and
    o (W [D,A], b [D]); then the gate W1 [G,2D], b1 [G], w2 [1,G], b2 [1]."""
    side = [(a, d), (a,)] * 3 + [(d, a), (d,)]
    return side + side + [(gate_hidden, 2 * d), (gate_hidden,), (1, gate_hidden), (1,)]


def packed_size(d: int, a: int, gate_hidden: int) -> int:
    """Elements of the flat weight vector of a layer with width D, attention width A, gate G."""
    return sum(math.prod(s) for s in weight_shapes(d, a, gate_hidden))


def pack_weights(params: PIMParams) -> Tensor:
    """PIMParams -> one flat vector [N] (``weight_shapes`` layout); differentiable."""
    return torch.cat([w.reshape(-1) for w in params])


def unpack_weights(flat: Tensor, d: int, a: int, gate_hidden: int) -> PIMParams:
    """Views of a flat weight vector [N] as PIMParams (a ``split``: its backward is one cat)."""
    shapes = weight_shapes(d, a, gate_hidden)
    parts = flat.split([math.prod(s) for s in shapes])
    return PIMParams(*(x.view(s) for x, s in zip(parts, shapes)))


def field_offsets(d: int, a: int, gate_hidden: int) -> Dict[str, int]:
    """Field name -> element offset in the flat layout (the kernels index the vector with these;
    memoised, except for symbolic sizes while tracing)."""
    if all(type(n) is int for n in (d, a, gate_hidden)):
        return _field_offsets(d, a, gate_hidden)
    return _field_offsets.__wrapped__(d, a, gate_hidden)


@functools.lru_cache(maxsize=64)
def _field_offsets(d: int, a: int, gate_hidden: int) -> Dict[str, int]:
    offsets, at = {}, 0
    for name, shape in zip(PIMParams._fields, weight_shapes(d, a, gate_hidden)):
        offsets[name] = at
        at += math.prod(shape)
    return offsets


# The legacy layout: one nn.Linear per projection (``t2p_q.weight``, ..., ``gate.0.weight``,
# ``gate.2.bias``), in PIMParams order; state dicts saved that way still load.
LINEAR_NAMES = ("t2p_q", "t2p_k", "t2p_v", "t2p_o", "p2t_q", "p2t_k", "p2t_v", "p2t_o", "gate.0",
                 "gate.2")


def load_linear_layout(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook of ``PromptTokenInteraction``: pack a state dict saved with one
    nn.Linear per projection (``LINEAR_NAMES``) into ``packed``, in place."""
    keys = [f"{prefix}{n}.{part}" for n in LINEAR_NAMES for part in ("weight", "bias")]
    if prefix + "packed" not in state_dict and all(k in state_dict for k in keys):
        state_dict[prefix + "packed"] = torch.cat([state_dict.pop(k).reshape(-1) for k in keys])


def random_pim_params(dim: int, width: int, gate_hidden: int, dtype=torch.float32,
                      device="cpu", requires_grad: bool = True,
                      generator: Optional[torch.Generator] = None):
    """PIMParams with weights ~ N(0, 1/fan_in) and biases ~ N(0, 0.1^2): attention logits of
    order one, so softmaxes are neither uniform nor one-hot and every gradient is exercised."""
    shapes = {}
    for side in ("t2p", "p2t"):
        for proj in "qkv":
            shapes[f"{side}_{proj}_w"], shapes[f"{side}_{proj}_b"] = (width, dim), (width,)
        shapes[f"{side}_o_w"], shapes[f"{side}_o_b"] = (dim, width), (dim,)
    shapes.update(gate_w1=(gate_hidden, 2 * dim), gate_b1=(gate_hidden,),
                  gate_w2=(1, gate_hidden), gate_b2=(1,))
    tensors = []
    for name in PIMParams._fields:
        shape = shapes[name]
        std = shape[1] ** -0.5 if len(shape) == 2 else 0.1
        t = torch.randn(shape, generator=generator, dtype=torch.float64) * std
        tensors.append(t.to(dtype=dtype, device=device).requires_grad_(requires_grad))
    return PIMParams(*tensors)
