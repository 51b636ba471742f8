"""Drop-in ``nn.Module`` wrappers over the ops; each takes ``backend=`` (None: process-wide)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ._autocast import autocast_dtype
from .ops.common import contiguous_stages
from .ops.pim import PIMParams, packed_size, pim, pim_packed, unpack_weights
from .ops.pim.weights import load_linear_layout
from .ops.prompt_bank import prompt_bank
from .ops.region_pool import region_pool

# The ops compute in fp32 whatever autocast says (autocast is off inside them); the modules
# follow nn.Linear instead: under torch.autocast they cast inputs and weights to the autocast
# dtype first, so the outputs come back in that dtype.
_autocast_dtype = autocast_dtype


class RegionPool(nn.Module):
    """Soft region pooling, Eq. 2. ``forward(features [B,T|N,D], maps [B,N,R] | [B,R,H,W]) -> [B,R,D]``."""

    def __init__(self, eps: float = 1e-6, backend: Optional[str] = None):
        super().__init__()
        self.eps, self.backend = eps, backend

    def forward(self, features: Tensor, maps: Tensor) -> Tensor:
        cast = _autocast_dtype(features.device)
        if cast is not None:  # e.g. bf16 patch features from an autocast conv, fp32 maps
            features, maps = features.to(cast), maps.to(cast)
        return region_pool(features, maps, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class LowRankPromptBank(nn.Module):
    """Eq. 4 for all layers: region embeddings [B,R,D] -> prompts [L,B,K,D], K = R * tokens_per_region.

    Parameters: ``token_offset`` [K,D]; stage-shared factors ``U`` [S,D,r], ``V`` [S,r,D];
    per-layer ``layer_bias``, ``ln_weight``, ``ln_bias`` [L,D]. ``layer_stage`` gives the stage
    of each layer (default: ``num_stages`` contiguous groups).
    """

    def __init__(self, dim: int, num_regions: int, tokens_per_region: int, rank: int,
                 num_layers: int, num_stages: int = 1, layer_stage: Optional[Sequence[int]] = None,
                 eps: float = 1e-5, backend: Optional[str] = None):
        super().__init__()
        for name, value in dict(dim=dim, num_regions=num_regions, rank=rank, num_layers=num_layers,
                                tokens_per_region=tokens_per_region, num_stages=num_stages).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_regions, self.num_tokens = num_regions, num_regions * tokens_per_region
        self.layer_stage = list(layer_stage) if layer_stage is not None \
            else contiguous_stages(num_layers, num_stages)
        self.eps, self.backend = eps, backend
        self.token_offset = nn.Parameter(torch.empty(self.num_tokens, dim))
        self.U = nn.Parameter(torch.empty(num_stages, dim, rank))
        self.V = nn.Parameter(torch.empty(num_stages, rank, dim))
        self.layer_bias = nn.Parameter(torch.zeros(num_layers, dim))
        self.ln_weight = nn.Parameter(torch.ones(num_layers, dim))
        self.ln_bias = nn.Parameter(torch.zeros(num_layers, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_offset, std=0.02)
        nn.init.normal_(self.U, std=1.0 / math.sqrt(self.U.shape[1]))
        nn.init.normal_(self.V, std=1.0 / math.sqrt(self.V.shape[1]))
        nn.init.zeros_(self.layer_bias)
        nn.init.ones_(self.ln_weight)
        nn.init.zeros_(self.ln_bias)

    def forward(self, region_emb: Tensor) -> Tensor:
        weights = (self.token_offset, self.U, self.V, self.layer_bias, self.ln_weight, self.ln_bias)
        cast = _autocast_dtype(region_emb.device)
        if cast is not None:  # the weights stay fp32 master weights: the op reads them as they are
            region_emb = region_emb.to(cast)
        return prompt_bank(region_emb, *weights, self.layer_stage, self.eps, backend=self.backend)


class PromptTokenInteraction(nn.Module):
    """PIM, Eqs. 5-10: ``forward(z [B,T,D], p [B,K,D]) -> (z_out [B,T,D], p_tilde [B,K,D])``.

    All 20 weights live in one flat parameter ``packed`` [N] (``ops.pim.pack_weights`` layout:
    t2p q, k, v (Linear D->A), o (A->D), the same four p2t ones, then the gate Linear(2D, G),
    GELU, Linear(G, 1); A = num_heads * head_dim), initialised as those ``nn.Linear`` layers
    would be. The fused kernels read it in place and return its gradient as one tensor: no
    per-weight cast, copy or gradient accumulation. ``params()`` gives the weights as named
    views. ``p2t_o`` starts at zero, so a new layer leaves the tokens unchanged (z_out == z)
    until it is trained: inserting it into a frozen backbone does not disturb the backbone.
    State dicts saved with one ``nn.Linear`` per projection (``t2p_q.weight``, ...,
    ``gate.0.weight``, ``gate.2.bias``) still load.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, gate_hidden: int,
                 t2p_reduce: str = "sum", backend: Optional[str] = None):
        super().__init__()
        for name, value in dict(dim=dim, num_heads=num_heads, head_dim=head_dim,
                                gate_hidden=gate_hidden).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if t2p_reduce not in ("sum", "mean"):
            raise ValueError(f"t2p_reduce must be 'sum' or 'mean', got {t2p_reduce!r}")
        self.dim, self.num_heads, self.head_dim, self.gate_hidden = dim, num_heads, head_dim, gate_hidden
        self.t2p_reduce, self.backend = t2p_reduce, backend
        self.packed = nn.Parameter(torch.empty(packed_size(dim, num_heads * head_dim, gate_hidden)))
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(load_linear_layout, with_module=True)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation per projection, in nn.Linear construction order; p2t_o = 0."""
        w = self.params()
        with torch.no_grad():
            for i in range(0, len(w), 2):
                weight, bias = w[i], w[i + 1]
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                bound = 1.0 / math.sqrt(weight.shape[1])
                nn.init.uniform_(bias, -bound, bound)
            w.p2t_o_w.zero_()
            w.p2t_o_b.zero_()

    def params(self) -> PIMParams:
        """The weights as PIMParams of views of ``packed`` (for the functional ``pim``)."""
        return unpack_weights(self.packed, self.dim, self.num_heads * self.head_dim,
                              self.gate_hidden)

    def forward(self, z: Tensor, p: Tensor, return_attn: bool = False):
        """z [B,T,D], p [B,K,D] -> (z_out [B,T,D], p_tilde [B,K,D][, attn_p2t [B,H,K,T]]).
        Under torch.autocast, z and p are cast to the autocast dtype (the outputs come back in
        it); the weights stay as they are (fp32 master weights: the ops compute in fp32)."""
        z, p = _to_autocast(z, p)
        return pim_packed(z, p, self.packed, self.num_heads, self.head_dim, self.gate_hidden,
                          self.t2p_reduce, return_attn, backend=self.backend)

    def forward_with(self, params: PIMParams, z: Tensor, p: Tensor, return_attn: bool = False):
        """``forward`` with other weights (e.g. ``params()`` with one tensor replaced), cast under
        autocast exactly as ``forward`` casts. The attention comes back in fp32 (fp64 for fp64
        inputs) whatever the dtype of z_out and p_tilde."""
        z, p = _to_autocast(z, p)
        return pim(z, p, params, self.num_heads, self.t2p_reduce, return_attn, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"gate_hidden={self.gate_hidden}, t2p_reduce={self.t2p_reduce!r}")


def _to_autocast(z: Tensor, p: Tensor):
    cast = _autocast_dtype(z.device)
    return (z, p) if cast is None else (z.to(cast), p.to(cast))
