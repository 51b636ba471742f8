"""Bad input gets a ValueError/TypeError naming the argument and what was expected, before any
compute."""
import pytest
import torch

import avpt_kernels as ak
from avpt_kernels.ops.pim.weights import random_pim_params

# The GPU tier leaves these out: not a device path (argument errors raised before any work).
pytestmark = pytest.mark.cpu_only

F = torch.randn(2, 17, 8)
A = torch.rand(2, 16, 3)
W = random_pim_params(8, 8, 4, requires_grad=False)
Z, P = torch.randn(2, 17, 8), torch.randn(2, 3, 8)
BANK = dict(region_emb=torch.randn(2, 3, 8), token_offset=torch.randn(6, 8), U=torch.randn(2, 8, 4),
            V=torch.randn(2, 4, 8), layer_bias=torch.randn(4, 8), ln_weight=torch.randn(4, 8),
            ln_bias=torch.randn(4, 8), layer_stage=[0, 0, 1, 1])


def _nan_maps():
    a = A.clone()
    a[0, 0, 0] = float("nan")
    return a


def _bank(**over):
    return ak.prompt_bank(**{**BANK, **over})


CASES = [
    # region_pool
    ("features 2-D", lambda: ak.region_pool(F[0], A), ValueError, r"features must be 3-D \[B, T, D\]"),
    ("features list", lambda: ak.region_pool(F.tolist(), A), TypeError, "features must be a torch.Tensor"),
    ("features int", lambda: ak.region_pool(F.long(), A), TypeError, "features must be float16"),
    ("maps 2-D", lambda: ak.region_pool(F, A[0]), ValueError, r"maps must be 3-D or 4-D"),
    ("maps batch", lambda: ak.region_pool(F, A[:1]), ValueError, "maps has batch 1 but features has batch 2"),
    ("maps N", lambda: ak.region_pool(F, torch.rand(2, 10, 3)), ValueError, "has N=10 tokens but features has T=17"),
    ("maps R=0", lambda: ak.region_pool(F, torch.rand(2, 16, 0)), ValueError, r"maps must have at least one region \(R\)"),
    ("maps > 1", lambda: ak.region_pool(F, A + 1), ValueError, r"maps must be finite and in \[0, 1\]"),
    ("maps < 0", lambda: ak.region_pool(F, A - 2), ValueError, r"maps must be finite and in \[0, 1\]"),
    ("maps NaN", lambda: ak.region_pool(F, _nan_maps()), ValueError, r"maps must be finite and in \[0, 1\]"),
    ("maps dtype", lambda: ak.region_pool(F, A.double()), TypeError, "maps has dtype torch.float64 but features"),
    ("maps device", lambda: ak.region_pool(F, A.to("meta")), ValueError, "maps is on meta but features is on cpu"),
    ("pixel grid", lambda: ak.region_pool(F, torch.rand(2, 3, 30, 30)), ValueError, "maps of size 30x30 do not fit features with 17 tokens"),
    ("eps", lambda: ak.region_pool(F, A, eps=0.0), ValueError, "eps must be a positive number"),
    # prompt_bank
    ("bank emb 2-D", lambda: _bank(region_emb=torch.randn(3, 8)), ValueError, r"region_emb must be 3-D \[B, R, D\]"),
    ("bank K % R", lambda: _bank(token_offset=torch.randn(5, 8)), ValueError, "K=5 tokens, which is not a multiple of R=3"),
    ("bank K=0", lambda: _bank(token_offset=torch.randn(0, 8)), ValueError, r"token_offset must have at least one prompt token \(K\)"),
    ("bank offset D", lambda: _bank(token_offset=torch.randn(6, 7)), ValueError, r"token_offset must have shape \(6, 8\)"),
    ("bank V rank", lambda: _bank(V=torch.randn(2, 5, 8)), ValueError, r"V must have shape \(2, 4, 8\) \[S, r, D\]"),
    ("bank U D", lambda: _bank(U=torch.randn(2, 9, 4)), ValueError, r"U must have shape \(2, 8, 4\)"),
    ("bank ln L", lambda: _bank(ln_weight=torch.randn(3, 8)), ValueError, r"ln_weight must have shape \(4, 8\) \[L, D\]"),
    ("bank stage range", lambda: _bank(layer_stage=[0, 0, 1, 2]), ValueError, r"layer_stage must be 4 ints .* in \[0, 2\)"),
    ("bank stage count", lambda: _bank(layer_stage=[0, 1]), ValueError, "layer_stage must be 4 ints"),
    ("bank dtype", lambda: _bank(U=torch.randn(2, 8, 4, dtype=torch.float64)), TypeError, "U has dtype torch.float64 but token_offset"),
    ("bank R=0", lambda: _bank(region_emb=torch.randn(2, 0, 8)), ValueError, r"region_emb must have at least one region \(R\)"),
    # pim
    ("pim z 2-D", lambda: ak.pim(Z[0], P, W, 2), ValueError, r"z must be 3-D \[B, T, D\]"),
    ("pim T=1", lambda: ak.pim(Z[:, :1], P, W, 2), ValueError, "z must have at least 2 tokens"),
    ("pim p batch", lambda: ak.pim(Z, P[:1], W, 2), ValueError, r"p must have shape \(2, K, 8\)"),
    ("pim p D", lambda: ak.pim(Z, torch.randn(2, 3, 4), W, 2), ValueError, r"p must have shape \(2, K, 8\)"),
    ("pim K=0", lambda: ak.pim(Z, torch.randn(2, 0, 8), W, 2), ValueError, r"p must have at least one prompt token \(K\)"),
    ("pim heads", lambda: ak.pim(Z, P, W, 3), ValueError, "A=8 output features, which num_heads=3 must divide"),
    ("pim heads type", lambda: ak.pim(Z, P, W, 2.0), ValueError, "num_heads must be a positive int"),
    ("pim reduce", lambda: ak.pim(Z, P, W, 2, t2p_reduce="max"), ValueError, "t2p_reduce must be one of"),
    ("pim params type", lambda: ak.pim(Z, P, tuple(W), 2), TypeError, "params must be a PIMParams"),
    ("pim weight shape", lambda: ak.pim(Z, P, W._replace(p2t_o_w=torch.randn(8, 4)), 2), ValueError, r"params.p2t_o_w must have shape \(8, 8\)"),
    ("pim gate shape", lambda: ak.pim(Z, P, W._replace(gate_w2=torch.randn(2, 4)), 2), ValueError, r"params.gate_w2 must have shape \(1, 4\)"),
    ("pim dtype mix", lambda: ak.pim(Z, P.half(), W, 2), TypeError, "p has dtype torch.float16 but z has torch.float32"),
    ("pim weight dtype", lambda: ak.pim(Z, P, W._replace(t2p_v_b=W.t2p_v_b.double()), 2), TypeError, "params.t2p_v_b has dtype torch.float64"),
    # modules
    ("module dim", lambda: ak.PromptTokenInteraction(0, 2, 8, 4), ValueError, "dim must be a positive int"),
    ("module reduce", lambda: ak.PromptTokenInteraction(8, 2, 4, 4, t2p_reduce="avg"), ValueError, "t2p_reduce must be 'sum' or 'mean'"),
    ("bank module rank", lambda: ak.LowRankPromptBank(8, 3, 2, 0, 4), ValueError, "rank must be a positive int"),
]


@pytest.mark.parametrize("call,error,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_with_a_clear_message(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_there_are_at_least_twenty_distinct_bad_inputs():
    assert len({c[0] for c in CASES}) >= 20
