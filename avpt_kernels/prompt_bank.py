"""Low-rank, stage-shared prompt bank (Eq. 4): public entry point, checks and dispatch.

``prompt_bank(region_emb[B,R,D], token_offset[K,D], U[S,D,r], V[S,r,D], layer_bias[L,D],
ln_weight[L,D], ln_bias[L,D], layer_stage[L]) -> prompts[L,B,K,D]`` (all layers, one call).
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from . import _checks, reference
from .backend import resolve

# Set to True by the kernel issue that adds this op's Triton kernels.
HAS_TRITON = False


def check_args(region_emb, token_offset, U, V, layer_bias, ln_weight, ln_bias, layer_stage,
               eps) -> None:
    _checks.tensor(region_emb, "region_emb", 3, "[B, R, D]")
    b, r, d = region_emb.shape
    _checks.nonempty(b, "region_emb", "image (B)")
    _checks.nonempty(r, "region_emb", "region (R)")
    _checks.nonempty(d, "region_emb", "channel (D)")
    _checks.tensor(token_offset, "token_offset", 2, "[K, D]")
    k = token_offset.shape[0]
    _checks.nonempty(k, "token_offset", "prompt token (K)")
    if k % r:
        raise ValueError(f"token_offset has K={k} tokens, which is not a multiple of R={r} "
                         f"regions: each region expands to K/R tokens")
    _checks.shape(token_offset, "token_offset", (k, d), "[K, D]")
    _checks.tensor(U, "U", 3, "[S, D, r]")
    s, _, rank = U.shape
    _checks.nonempty(s, "U", "stage (S)")
    _checks.nonempty(rank, "U", "rank (r)")
    _checks.shape(U, "U", (s, d, rank), "[S, D, r]")
    _checks.tensor(V, "V", 3, "[S, r, D]")
    _checks.shape(V, "V", (s, rank, d), "[S, r, D]")
    _checks.tensor(layer_bias, "layer_bias", 2, "[L, D]")
    n_layers = layer_bias.shape[0]
    _checks.nonempty(n_layers, "layer_bias", "layer (L)")
    for name, t in (("layer_bias", layer_bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _checks.tensor(t, name, 2, "[L, D]")
        _checks.shape(t, name, (n_layers, d), "[L, D]")
    _checks.same_dtype_device("region_emb", region_emb, token_offset=token_offset, U=U, V=V,
                              layer_bias=layer_bias, ln_weight=ln_weight, ln_bias=ln_bias)
    stages = list(layer_stage) if not isinstance(layer_stage, (str, bytes)) else None
    if stages is None or len(stages) != n_layers or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < s for x in stages):
        raise ValueError(f"layer_stage must be {n_layers} ints (one per layer), each a stage "
                         f"index in [0, {s}), got {layer_stage!r}")
    _checks.positive(eps, "eps")


def prompt_bank(region_emb: Tensor, token_offset: Tensor, U: Tensor, V: Tensor,
                layer_bias: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                layer_stage: Sequence[int], eps: float = 1e-5, *,
                backend: Optional[str] = None) -> Tensor:
    """Eq. 4 for all L layers at once: ``P[l] = LN_l((E_tok U[s(l)]) V[s(l)] + b[l])``.

    region_emb [B,R,D]; token_offset [K,D] with K = R*m (token k belongs to region k // m);
    U [S,D,r], V [S,r,D] stage-shared factors; layer_bias, ln_weight, ln_bias [L,D];
    layer_stage: L stage indices. Returns prompts [L,B,K,D] in the dtype of ``region_emb``.
    """
    check_args(region_emb, token_offset, U, V, layer_bias, ln_weight, ln_bias, layer_stage, eps)
    resolve("prompt_bank", region_emb.device, backend, has_triton=HAS_TRITON)
    return reference.prompt_bank(region_emb, token_offset, U, V, layer_bias, ln_weight, ln_bias,
                                 [int(x) for x in layer_stage], eps)
