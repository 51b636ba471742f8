"""Independent compositions of Eqs. 2, 4 and 5-10, written from the paper without reusing
``avpt_kernels.ops.<op>.reference``: per-head loops with weight slices, explicit exp-normalise softmax,
F.layer_norm, explicit low-rank products. The reference is tested against these."""
import math

import torch
import torch.nn.functional as F


def region_pool(features, maps_tokens, eps):
    """features [B,T|N,D], maps_tokens [B,N,R] -> [B,R,D], one region at a time."""
    n = maps_tokens.shape[1]
    patches = features[:, -n:]
    rows = []
    for k in range(maps_tokens.shape[2]):
        a = maps_tokens[:, :, k]  # [B, N]
        rows.append((a.unsqueeze(-1) * patches).sum(1) / (a.sum(1, keepdim=True) + eps))
    return torch.stack(rows, dim=1)


def area_downsample(maps_pixels, factor):
    """[B,R,H,W] -> [B,N,R] by averaging each factor x factor block (reshape + mean)."""
    b, r, h, w = maps_pixels.shape
    blocks = maps_pixels.reshape(b, r, h // factor, factor, w // factor, factor)
    return blocks.mean(dim=(3, 5)).reshape(b, r, -1).transpose(1, 2)


def prompt_bank(region_emb, token_offset, U, V, layer_bias, ln_weight, ln_bias, layer_stage, eps):
    """Layer by layer: W_p = U V, tokens from regions, F.layer_norm. -> [L,B,K,D]."""
    k, r = token_offset.shape[0], region_emb.shape[1]
    per_region = k // r
    tokens = torch.stack([region_emb[:, i // per_region] for i in range(k)], 1) + token_offset
    layers = []
    for layer, stage in enumerate(layer_stage):
        w_p = U[stage] @ V[stage]
        x = tokens @ w_p + layer_bias[layer]
        layers.append(F.layer_norm(x, (x.shape[-1],), ln_weight[layer], ln_bias[layer], eps))
    return torch.stack(layers)


def _softmax(x, dim):
    e = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def pim(z, p, w, num_heads, t2p_reduce="sum"):
    """Eqs. 5-10 with a loop over heads; w is a PIMParams. Returns (z_out, p_tilde, attn_p2t)."""
    a = w.t2p_q_w.shape[0]
    dh = a // num_heads
    scale = 1.0 / math.sqrt(dh)
    msgs = []
    for h in range(num_heads):
        s = slice(h * dh, (h + 1) * dh)
        q = z @ w.t2p_q_w[s].T + w.t2p_q_b[s]
        key = p @ w.t2p_k_w[s].T + w.t2p_k_b[s]
        v = z @ w.t2p_v_w[s].T + w.t2p_v_b[s]
        attn = _softmax(torch.einsum("btd,bkd->btk", q, key) * scale, dim=2)  # over prompts
        msg = torch.einsum("btk,btd->bkd", attn, v)
        msgs.append(msg / z.shape[1] if t2p_reduce == "mean" else msg)
    p_tilde = p + torch.cat(msgs, -1) @ w.t2p_o_w.T + w.t2p_o_b
    infusions, attns = [], []
    for h in range(num_heads):
        s = slice(h * dh, (h + 1) * dh)
        q = p_tilde @ w.p2t_q_w[s].T + w.p2t_q_b[s]
        key = z @ w.p2t_k_w[s].T + w.p2t_k_b[s]
        v = p_tilde @ w.p2t_v_w[s].T + w.p2t_v_b[s]
        attn = _softmax(torch.einsum("bkd,btd->bkt", q, key) * scale, dim=2)  # over tokens
        attns.append(attn)
        infusions.append(torch.einsum("bkt,bkd->btd", attn, v))
    z_hat = z + torch.cat(infusions, -1) @ w.p2t_o_w.T + w.p2t_o_b
    g = torch.cat([p_tilde.mean(1), z[:, 0]], -1) @ w.gate_w1.T + w.gate_b1
    g = 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))  # exact GELU
    alpha = torch.sigmoid(g @ w.gate_w2.T + w.gate_b2).unsqueeze(-1)
    return (1 - alpha) * z + alpha * z_hat, p_tilde, torch.stack(attns, 1)
