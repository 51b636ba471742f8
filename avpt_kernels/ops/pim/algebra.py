"""The per-image algebra of PIM as Triton kernels: one launch each for the small matrices before
and between the token passes (``kernels``), and one each for their backward.

Per image b (P [K,D] prompts, weights in nn.Linear layout packed in one flat vector, A = H*dh
attention width, columns c = h*K + k padded to HKP, scale = 1/sqrt(dh)):

  ``_t2p_small_kernel``      k1 = P W_k^T + b_k [K,A];  Mq = scale W_q^T K1x [D,HKP],
                             cq = scale b_q . K1x [HKP]  (K1x [A,HKP]: k1 spread over the
                             columns of its head, ``_expand``); zeroes G and colsum for pass 1.
  ``_p2t_small_kernel``      msg = (G W_v^T + colsum b_v) / T|1 gathered per (k, head) [K,A];
                             p_tilde = P + msg W_o^T + b_o;  q2, v2 = p_tilde W'_{q,v}^T + b';
                             alpha = sigmoid(w2 . gelu(W1 [mean_k p_tilde, z_0] + b1) + b2);
                             Qexp = scale Q2x [A,HKP] (2-read path: logits2 = K2 Qexp) or
                             Mk = W'_k^T Qexp [D,HKP] (3-read path);  Nv = V2x^T W'_o^T [HKP,D].
  ``_p2t_small_grad_kernel`` the chain rule of ``_p2t_small_kernel`` from pass A's reductions
                             (E, F1, F2, G1, delta, sum_t dY): dG, dcolsum, dz_0 and dP~ for the
                             token kernels, and the gradients of every weight it reads.
  ``_t2p_small_grad_kernel`` the chain rule of ``_t2p_small_kernel`` from dMq, dcq: dP, and the
                             gradients of W_q, b_q, W_k, b_k.

One program per image (grid (B,)); the weight gradients, summed over images, are fp32 atomic adds
into one zeroed flat buffer laid out like the weights. Every product of two fp32 operands is a
split dot (``dots._mm_split``: ~fp32 accuracy on 16-bit tensor cores, IEEE fp32 for fp32 inputs),
a product with the exact 16-bit prompts P a two-part one; the 0/1 gathers (``_expand``,
``_collapse``) are IEEE fp32 dots, exact. Shapes: K <= KP = 16 prompts, A <= AP <= 64,
gate hidden G <= GP = 64 (``launch.triton_unsupported_reason`` routes anything larger to torch).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dots import _mm_split

# Field indices of PIMParams in the flat weight vector (``launch.weight_shapes`` is the Python twin).
T2P_Q_W, T2P_Q_B, T2P_K_W, T2P_K_B = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
T2P_V_W, T2P_V_B, T2P_O_W, T2P_O_B = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
P2T_Q_W, P2T_Q_B, P2T_K_W, P2T_K_B = tl.constexpr(8), tl.constexpr(9), tl.constexpr(10), tl.constexpr(11)
P2T_V_W, P2T_V_B, P2T_O_W, P2T_O_B = tl.constexpr(12), tl.constexpr(13), tl.constexpr(14), tl.constexpr(15)
GATE_W1, GATE_B1, GATE_W2, GATE_B2 = tl.constexpr(16), tl.constexpr(17), tl.constexpr(18), tl.constexpr(19)


@triton.jit
def _w(field: tl.constexpr, D, A, GH):
    """Offset of PIMParams field ``field`` in the flat weights: per side (t2p, p2t) the q, k, v
    pairs (W [A,D], b [A]) then o (W [D,A], b [D]); then W1 [G,2D], b1 [G], w2 [1,G], b2 [1]."""
    qkv = A * D + A
    side = 3 * qkv + D * A + D
    if field < 16:
        return (field // 8) * side + ((field % 8) // 2) * qkv + ((field % 8) % 2) * A * D
    else:
        base = 2 * side
        if field == 16:
            return base
        elif field == 17:
            return base + 2 * GH * D
        elif field == 18:
            return base + 2 * GH * D + GH
        else:
            return base + 2 * GH * D + 2 * GH


@triton.jit
def _load_wt(w_ptr, field: tl.constexpr, D, A, GH, dd, d_ok, AP: tl.constexpr):
    """[BLOCK_D, AP] fp32 block (rows dd) of W^T for a D->A weight W [A,D] (zero-padded)."""
    a = tl.arange(0, AP)
    ptrs = w_ptr + _w(field, D, A, GH) + a[None, :] * D + dd[:, None]
    return tl.load(ptrs, mask=d_ok[:, None] & (a < A)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_w(w_ptr, field: tl.constexpr, D, A, GH, dd, d_ok, AP: tl.constexpr):
    """[AP, BLOCK_D] fp32 block (columns dd) of a D->A weight W [A,D] (zero-padded)."""
    a = tl.arange(0, AP)
    ptrs = w_ptr + _w(field, D, A, GH) + a[:, None] * D + dd[None, :]
    return tl.load(ptrs, mask=(a < A)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_wo(w_ptr, field: tl.constexpr, D, A, GH, dd, d_ok, AP: tl.constexpr):
    """[BLOCK_D, AP] fp32 block (rows dd) of an A->D weight W [D,A] (zero-padded)."""
    a = tl.arange(0, AP)
    ptrs = w_ptr + _w(field, D, A, GH) + dd[:, None] * A + a[None, :]
    return tl.load(ptrs, mask=d_ok[:, None] & (a < A)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_vec(w_ptr, field: tl.constexpr, D, A, GH, idx, n):
    return tl.load(w_ptr + _w(field, D, A, GH) + idx, mask=idx < n, other=0.0).to(tl.float32)


@triton.jit
def _add_w(dw_ptr, field: tl.constexpr, D, A, GH, rows, row_n, rstride, cols, col_n, cstride, x):
    """Atomic add of the tile x [rows, cols] into field ``field`` of the flat fp32 gradient."""
    ptrs = dw_ptr + _w(field, D, A, GH) + rows[:, None] * rstride + cols[None, :] * cstride
    tl.atomic_add(ptrs, x, mask=(rows < row_n)[:, None] & (cols < col_n)[None, :], sem="relaxed")


@triton.jit
def _add_vec(dw_ptr, field: tl.constexpr, D, A, GH, idx, n, x):
    tl.atomic_add(dw_ptr + _w(field, D, A, GH) + idx, x, mask=idx < n, sem="relaxed")


@triton.jit
def _selector(K, H, KP: tl.constexpr, HKP: tl.constexpr):
    """[KP, HKP] fp32: 1 where column c = h*K + k belongs to prompt k (real columns only)."""
    ks = tl.arange(0, KP)
    cols = tl.arange(0, HKP)
    return (((cols[None, :] % K) == ks[:, None]) & (cols < H * K)[None, :]).to(tl.float32)


@triton.jit
def _head_mask(K, H, dh, AP: tl.constexpr, HKP: tl.constexpr):
    """[AP, HKP]: feature a belongs to the head of column c (real features and columns only)."""
    a = tl.arange(0, AP)
    cols = tl.arange(0, HKP)
    return ((a[:, None] // dh) == (cols[None, :] // K)) & (a < H * dh)[:, None] & \
        (cols < H * K)[None, :]


@triton.jit
def _expand(x, K, H, dh, KP: tl.constexpr, AP: tl.constexpr, HKP: tl.constexpr):
    """x [KP, AP] (prompt, feature) -> [AP, HKP]: column c = h*K + k holds x[k, :] on the
    features of head h, zeros elsewhere (an exact 0/1 gather)."""
    out = tl.dot(tl.trans(x), _selector(K, H, KP, HKP), input_precision="ieee")
    return tl.where(_head_mask(K, H, dh, AP, HKP), out, 0.0)


@triton.jit
def _collapse(y, K, H, dh, KP: tl.constexpr, AP: tl.constexpr, HKP: tl.constexpr):
    """y [HKP, AP] -> [KP, AP] with x[k, a] = y[h(a)*K + k, a], the adjoint of ``_expand``."""
    y = tl.where(tl.trans(_head_mask(K, H, dh, AP, HKP)), y, 0.0)
    return tl.dot(_selector(K, H, KP, HKP), y, input_precision="ieee")


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + \
        x * tl.exp(-0.5 * x * x) * 0.3989422804014327


@triton.jit
def _program_axes(K, H, dh, KP: tl.constexpr, AP: tl.constexpr, HKP: tl.constexpr):
    """A program's image b, the width A, and its axes: prompt rows (with the real-prompt mask),
    attention features, head-prompt columns."""
    ks = tl.arange(0, KP)
    return (tl.program_id(0).to(tl.int64), H * dh, ks, ks < K, tl.arange(0, AP),
            tl.arange(0, HKP))


@triton.jit
def _t2p_small_kernel(p_ptr, w_ptr, mq_ptr, cq_ptr, k1_ptr, g_ptr, colsum_ptr, D, K, H, dh, GH,
                      scale, BLOCK_D: tl.constexpr, HKP: tl.constexpr, KP: tl.constexpr,
                      AP: tl.constexpr, DOT_MODE: tl.constexpr):
    """Grid (B,). p [B,K,D] (input dtype), w flat -> mq [B,D,HKP], cq [B,HKP], k1 [B,KP,AP]
    (fp32); zeroes g [B,HKP,D] and colsum [B,HKP], the accumulators of pass 1."""
    b, A, ks, k_ok, a, cols = _program_axes(K, H, dh, KP, AP, HKP)
    k1 = tl.zeros((KP, AP), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        pt = tl.load(p_ptr + b * K * D + ks[:, None] * D + dd[None, :],
                     mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        k1 += _mm_split(pt, _load_wt(w_ptr, T2P_K_W, D, A, GH, dd, d_ok, AP), 1, DOT_MODE)
    k1 += _load_vec(w_ptr, T2P_K_B, D, A, GH, a, A)[None, :]
    k1 = tl.where(k_ok[:, None], k1, 0.0)
    tl.store(k1_ptr + b * KP * AP + ks[:, None] * AP + a[None, :], k1)
    k1x = _expand(k1, K, H, dh, KP, AP, HKP) * scale  # [AP, HKP]
    cq = tl.sum(_load_vec(w_ptr, T2P_Q_B, D, A, GH, a, A)[:, None] * k1x, axis=0)
    tl.store(cq_ptr + b * HKP + cols, cq)
    tl.store(colsum_ptr + b * HKP + cols, tl.zeros((HKP,), dtype=tl.float32))
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        mq = _mm_split(_load_wt(w_ptr, T2P_Q_W, D, A, GH, dd, d_ok, AP), k1x, 0, DOT_MODE)
        tl.store(mq_ptr + b * D * HKP + dd[:, None] * HKP + cols[None, :], mq, mask=d_ok[:, None])
        tl.store(g_ptr + b * HKP * D + cols[:, None] * D + dd[None, :],
                 tl.zeros((HKP, BLOCK_D), dtype=tl.float32), mask=d_ok[None, :])


@triton.jit
def _p2t_small_kernel(p_ptr, z_ptr, w_ptr, g_ptr, colsum_ptr, p_tilde_ptr, pt32_ptr, msg_ptr,
                      q2_ptr, v2_ptr, pre_ptr, alpha_ptr, qexp_ptr, mk_ptr, nv_ptr, T, D, K, H, dh, GH,
                      key_cols, scale, inv_tokens, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
                      KP: tl.constexpr, AP: tl.constexpr, GP: tl.constexpr,
                      DOT_MODE: tl.constexpr):
    """Grid (B,). From pass 1's G [B,HKP,D], colsum [B,HKP] (fp32), p [B,K,D], z [B,T,D], w:
    p_tilde [B,K,D] (p dtype) and, fp32, what the token passes and the backward need:
    pt32 [B,KP,D] (p_tilde), msg, q2, v2 [B,KP,AP], pre [B,GP] (gate pre-activation),
    alpha [B], nv [B,HKP,D], mk = Mk [B,D,HKP] and, with key_cols > 0 (the 2-read path, whose
    logits2 = K2 Qexp), qexp [B,key_cols,HKP] (key_cols <= AP)."""
    b, A, ks, k_ok, a, cols = _program_axes(K, H, dh, KP, AP, HKP)
    gg = tl.arange(0, GP)
    small = b * KP * AP + ks[:, None] * AP + a[None, :]
    # msg[k, a] = (G W_v^T + colsum b_v)[h(a)*K + k, a] * inv_tokens
    gw = tl.zeros((HKP, AP), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        gt = tl.load(g_ptr + b * HKP * D + cols[:, None] * D + dd[None, :], mask=d_ok[None, :], other=0.0)
        gw += _mm_split(gt, _load_wt(w_ptr, T2P_V_W, D, A, GH, dd, d_ok, AP), 0, DOT_MODE)
    colsum = tl.load(colsum_ptr + b * HKP + cols)
    gw += colsum[:, None] * _load_vec(w_ptr, T2P_V_B, D, A, GH, a, A)[None, :]
    msg = _collapse(gw, K, H, dh, KP, AP, HKP) * inv_tokens
    tl.store(msg_ptr + small, msg)
    # p_tilde = P + msg W_o^T + b_o, and what reduces p_tilde over D: q2, v2, the gate input
    q2 = tl.zeros((KP, AP), dtype=tl.float32)
    v2 = tl.zeros((KP, AP), dtype=tl.float32)
    pre = tl.zeros((GP,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        tile = ks[:, None] * D + dd[None, :]
        kd_ok = k_ok[:, None] & d_ok[None, :]
        pin = tl.load(p_ptr + b * K * D + tile, mask=kd_ok, other=0.0).to(tl.float32)
        wo = _load_wo(w_ptr, T2P_O_W, D, A, GH, dd, d_ok, AP)  # [BLOCK_D, AP]
        pt = pin + _mm_split(msg, tl.trans(wo), 0, DOT_MODE) + \
            _load_vec(w_ptr, T2P_O_B, D, A, GH, dd, D)[None, :]
        pt = tl.where(k_ok[:, None], pt, 0.0)
        tl.store(p_tilde_ptr + b * K * D + tile, pt.to(p_tilde_ptr.dtype.element_ty), mask=kd_ok)
        tl.store(pt32_ptr + b * KP * D + tile, pt, mask=d_ok[None, :])
        q2 += _mm_split(pt, _load_wt(w_ptr, P2T_Q_W, D, A, GH, dd, d_ok, AP), 0, DOT_MODE)
        v2 += _mm_split(pt, _load_wt(w_ptr, P2T_V_W, D, A, GH, dd, d_ok, AP), 0, DOT_MODE)
        mean = tl.sum(pt, axis=0) / K
        z0 = tl.load(z_ptr + b * T * D + dd, mask=d_ok, other=0.0).to(tl.float32)
        w1 = w_ptr + _w(GATE_W1, D, A, GH) + gg[:, None] * 2 * D + dd[None, :]
        g_ok = (gg < GH)[:, None] & d_ok[None, :]
        pre += tl.sum(tl.load(w1, mask=g_ok, other=0.0).to(tl.float32) * mean[None, :], axis=1)
        pre += tl.sum(tl.load(w1 + D, mask=g_ok, other=0.0).to(tl.float32) * z0[None, :], axis=1)
    q2 = tl.where(k_ok[:, None], q2 + _load_vec(w_ptr, P2T_Q_B, D, A, GH, a, A)[None, :], 0.0)
    v2 = tl.where(k_ok[:, None], v2 + _load_vec(w_ptr, P2T_V_B, D, A, GH, a, A)[None, :], 0.0)
    tl.store(q2_ptr + small, q2)
    tl.store(v2_ptr + small, v2)
    pre += _load_vec(w_ptr, GATE_B1, D, A, GH, gg, GH)
    tl.store(pre_ptr + b * GP + gg, pre)
    logit = tl.sum(_load_vec(w_ptr, GATE_W2, D, A, GH, gg, GH) * _gelu(pre), axis=0) + \
        tl.load(w_ptr + _w(GATE_B2, D, A, GH)).to(tl.float32)
    tl.store(alpha_ptr + b, 1.0 / (1.0 + tl.exp(-logit)))  # b2 = -inf (gates shut): exactly 0
    qexp = _expand(q2, K, H, dh, KP, AP, HKP) * scale  # [AP, HKP]
    v2x = tl.trans(_expand(v2, K, H, dh, KP, AP, HKP))  # [HKP, AP]
    if key_cols > 0:
        tl.store(qexp_ptr + b * key_cols * HKP + a[:, None] * HKP + cols[None, :], qexp,
                 mask=(a < key_cols)[:, None])
    for d0 in range(0, D, BLOCK_D):  # Mk: the 3-read path's logits2 and, on both, the dZ kernel's
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        mk = _mm_split(_load_wt(w_ptr, P2T_K_W, D, A, GH, dd, d_ok, AP), qexp, 0, DOT_MODE)
        tl.store(mk_ptr + b * D * HKP + dd[:, None] * HKP + cols[None, :], mk, mask=d_ok[:, None])
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        wo2 = _load_wo(w_ptr, P2T_O_W, D, A, GH, dd, d_ok, AP)  # [BLOCK_D, AP]
        nv = _mm_split(v2x, tl.trans(wo2), 0, DOT_MODE)
        tl.store(nv_ptr + b * HKP * D + cols[:, None] * D + dd[None, :], nv, mask=d_ok[None, :])


@triton.jit
def _p2t_small_grad_kernel(z_ptr, w_ptr, gpt_ptr, has_gpt, e_ptr, f1_ptr, f2_ptr, g1_ptr, delta_ptr,
                           ysum_ptr, g_ptr, colsum_ptr, pt32_ptr, msg_ptr, q2_ptr, v2_ptr,
                           pre_ptr, alpha_ptr, dg_ptr, dcolsum_ptr, dz0_ptr, dpt_ptr, dw_ptr,
                           T, D, K, H, dh, GH, scale, inv_tokens,
                           BLOCK_D: tl.constexpr, HKP: tl.constexpr, KP: tl.constexpr,
                           AP: tl.constexpr, GP: tl.constexpr, DOT_MODE: tl.constexpr):
    """Grid (B,). Backward of _p2t_small_kernel and of z_out = Z + alpha (S2^T Nv + b'o), from
    pass A's e, f1, f2, g1 [B,HKP,D], delta [B,HKP], ysum [B,D] and gpt = dL/dp_tilde [B,K,D]:
      dNv = alpha E,  dMk = alpha (F1 + G1 - delta F2)^T,  dalpha = sum delta + ysum . b'o;
    writes dG [B,HKP,D], dcolsum [B,HKP], dz0 [B,D] (the gate's class-token input), dpt
    [B,KP,D] (dL/dp_tilde in full, for _t2p_small_grad_kernel), and adds the gradients of the
    t2p v/o, p2t q/k/v/o and gate weights into dw (flat fp32, zeroed; b'k gets none)."""
    b, A, ks, k_ok, a, cols = _program_axes(K, H, dh, KP, AP, HKP)
    gg = tl.arange(0, GP)
    small = b * KP * AP + ks[:, None] * AP + a[None, :]
    alpha = tl.load(alpha_ptr + b)
    delta = tl.load(delta_ptr + b * HKP + cols)
    big = b * HKP * D + cols[:, None] * D  # [HKP, BLOCK_D] tiles of a [B,HKP,D] matrix
    # 1. reductions over D (one [HKP, AP] accumulator per pass, to stay in registers): dalpha,
    # dv2 = (dNv W'o) gathered, dq2 = scale (dMk^T W'k) gathered
    dalpha = tl.sum(delta, axis=0)
    acc = tl.zeros((HKP, AP), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        ysum = tl.load(ysum_ptr + b * D + dd, mask=d_ok, other=0.0)
        dalpha += tl.sum(ysum * _load_vec(w_ptr, P2T_O_B, D, A, GH, dd, D), axis=0)
        _add_vec(dw_ptr, P2T_O_B, D, A, GH, dd, D, alpha * ysum)
        dnv = alpha * tl.load(e_ptr + big + dd[None, :], mask=d_ok[None, :], other=0.0)
        acc += _mm_split(dnv, _load_wo(w_ptr, P2T_O_W, D, A, GH, dd, d_ok, AP), 0, DOT_MODE)
    dv2 = _collapse(acc, K, H, dh, KP, AP, HKP)
    acc = tl.zeros((HKP, AP), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        m = d_ok[None, :]
        dmk = alpha * (tl.load(f1_ptr + big + dd[None, :], mask=m, other=0.0)
                       + tl.load(g1_ptr + big + dd[None, :], mask=m, other=0.0)
                       - delta[:, None] * tl.load(f2_ptr + big + dd[None, :], mask=m, other=0.0))
        acc += _mm_split(dmk, _load_wt(w_ptr, P2T_K_W, D, A, GH, dd, d_ok, AP), 0, DOT_MODE)
    dq2 = _collapse(acc, K, H, dh, KP, AP, HKP) * scale
    _add_vec(dw_ptr, P2T_V_B, D, A, GH, a, A, tl.sum(dv2, axis=0))
    _add_vec(dw_ptr, P2T_Q_B, D, A, GH, a, A, tl.sum(dq2, axis=0))
    # 2. the gate: alpha = sigmoid(w2 . gelu(pre) + b2), pre = W1 [mean_k p_tilde, z0] + b1
    pre = tl.load(pre_ptr + b * GP + gg)
    d_logit = dalpha * alpha * (1.0 - alpha)
    _add_vec(dw_ptr, GATE_W2, D, A, GH, gg, GH, d_logit * _gelu(pre))
    _add_vec(dw_ptr, GATE_B2, D, A, GH, gg, 1, tl.where(gg == 0, d_logit, 0.0))
    d_pre = d_logit * _load_vec(w_ptr, GATE_W2, D, A, GH, gg, GH) * _gelu_grad(pre)
    d_pre = tl.where(gg < GH, d_pre, 0.0)
    _add_vec(dw_ptr, GATE_B1, D, A, GH, gg, GH, d_pre)
    # 3a. the gate's input [mean_k p_tilde, z0]: W1's gradient, dz0, and dp_tilde's gate term
    # (parked in dpt, which 3b completes)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        g_ok = (gg < GH)[:, None] & d_ok[None, :]
        w1 = w_ptr + _w(GATE_W1, D, A, GH) + gg[:, None] * 2 * D + dd[None, :]
        d_mean = tl.sum(d_pre[:, None] * tl.load(w1, mask=g_ok, other=0.0).to(tl.float32), axis=0)
        d_z0 = tl.sum(d_pre[:, None] * tl.load(w1 + D, mask=g_ok, other=0.0).to(tl.float32), axis=0)
        tl.store(dz0_ptr + b * D + dd, d_z0, mask=d_ok)
        tile = ks[:, None] * D + dd[None, :]
        pt = tl.load(pt32_ptr + b * KP * D + tile, mask=d_ok[None, :], other=0.0)
        z0 = tl.load(z_ptr + b * T * D + dd, mask=d_ok, other=0.0).to(tl.float32)
        _add_w(dw_ptr, GATE_W1, D, A, GH, gg, GH, 2 * D, dd, D, 1,
               d_pre[:, None] * (tl.sum(pt, axis=0) / K)[None, :])
        _add_w(dw_ptr, GATE_W1, D, A, GH, gg, GH, 2 * D, D + dd, 2 * D, 1,
               d_pre[:, None] * z0[None, :])
        tl.store(dpt_ptr + b * KP * D + tile, tl.where(k_ok[:, None], d_mean[None, :] / K, 0.0),
                 mask=d_ok[None, :])
    # 3b. per D block: dp_tilde (full), the weight gradients, and dmsg = dp_tilde W_o (over D)
    msg = tl.load(msg_ptr + small)
    dmsg = tl.zeros((KP, AP), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        tile = ks[:, None] * D + dd[None, :]
        pt = tl.load(pt32_ptr + b * KP * D + tile, mask=d_ok[None, :], other=0.0)
        dpt = tl.load(dpt_ptr + b * KP * D + tile, mask=d_ok[None, :], other=0.0)
        if has_gpt:
            dpt += tl.load(gpt_ptr + b * K * D + tile, mask=k_ok[:, None] & d_ok[None, :],
                           other=0.0).to(tl.float32)
        dpt += _mm_split(dv2, _load_w(w_ptr, P2T_V_W, D, A, GH, dd, d_ok, AP), 0, DOT_MODE)
        dpt += _mm_split(dq2, _load_w(w_ptr, P2T_Q_W, D, A, GH, dd, d_ok, AP), 0, DOT_MODE)
        dpt = tl.where(k_ok[:, None], dpt, 0.0)
        tl.store(dpt_ptr + b * KP * D + tile, dpt, mask=d_ok[None, :])
        # W' gradients [A, BLOCK_D] (stride D) and [BLOCK_D, A] (stride A)
        _add_w(dw_ptr, P2T_V_W, D, A, GH, a, A, D, dd, D, 1,
               _mm_split(tl.trans(dv2), pt, 0, DOT_MODE))
        _add_w(dw_ptr, P2T_Q_W, D, A, GH, a, A, D, dd, D, 1,
               _mm_split(tl.trans(dq2), pt, 0, DOT_MODE))
        _add_w(dw_ptr, T2P_O_W, D, A, GH, dd, D, A, a, A, 1,
               _mm_split(tl.trans(dpt), msg, 0, DOT_MODE))
        _add_vec(dw_ptr, T2P_O_B, D, A, GH, dd, D, tl.sum(dpt, axis=0))
        dmsg += _mm_split(dpt, _load_wo(w_ptr, T2P_O_W, D, A, GH, dd, d_ok, AP), 0, DOT_MODE)
    # 4. W'k and W'o gradients (passes of their own: fewer tiles live at once)
    q2x = _expand(tl.load(q2_ptr + small), K, H, dh, KP, AP, HKP) * scale  # [AP, HKP]
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = (dd < D)[None, :]
        dmk = alpha * (tl.load(f1_ptr + big + dd[None, :], mask=m, other=0.0)
                       + tl.load(g1_ptr + big + dd[None, :], mask=m, other=0.0)
                       - delta[:, None] * tl.load(f2_ptr + big + dd[None, :], mask=m, other=0.0))
        _add_w(dw_ptr, P2T_K_W, D, A, GH, a, A, D, dd, D, 1, _mm_split(q2x, dmk, 0, DOT_MODE))
    v2x_t = tl.trans(_expand(tl.load(v2_ptr + small), K, H, dh, KP, AP, HKP))  # [HKP, AP]
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dnv = alpha * tl.load(e_ptr + big + dd[None, :], mask=(dd < D)[None, :], other=0.0)
        _add_w(dw_ptr, P2T_O_W, D, A, GH, dd, D, A, a, A, 1,
               _mm_split(tl.trans(dnv), v2x_t, 0, DOT_MODE))
    # 5. msg = (G W_v^T + colsum b_v) gathered, * inv_tokens: dG, dcolsum, W_v and b_v gradients
    dmsgx = _expand(dmsg * inv_tokens, K, H, dh, KP, AP, HKP)  # [AP, HKP]
    bv = _load_vec(w_ptr, T2P_V_B, D, A, GH, a, A)
    tl.store(dcolsum_ptr + b * HKP + cols, tl.sum(dmsgx * bv[:, None], axis=0))
    colsum = tl.load(colsum_ptr + b * HKP + cols)
    _add_vec(dw_ptr, T2P_V_B, D, A, GH, a, A, tl.sum(dmsgx * colsum[None, :], axis=1))
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        gt = tl.load(g_ptr + big + dd[None, :], mask=d_ok[None, :], other=0.0)
        _add_w(dw_ptr, T2P_V_W, D, A, GH, a, A, D, dd, D, 1, _mm_split(dmsgx, gt, 0, DOT_MODE))
    dmsgx_t = tl.trans(dmsgx)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        dg = _mm_split(dmsgx_t, _load_w(w_ptr, T2P_V_W, D, A, GH, dd, d_ok, AP), 0, DOT_MODE)
        tl.store(dg_ptr + big + dd[None, :], dg, mask=d_ok[None, :])


@triton.jit
def _t2p_small_grad_kernel(p_ptr, w_ptr, dmq_ptr, dcq_ptr, k1_ptr, dpt_ptr, dp_ptr, dw_ptr,
                           D, K, H, dh, GH, scale,
                           BLOCK_D: tl.constexpr, HKP: tl.constexpr, KP: tl.constexpr,
                           AP: tl.constexpr, DOT_MODE: tl.constexpr):
    """Grid (B,). Backward of _t2p_small_kernel from dMq [B,D,HKP], dcq [B,HKP] (fp32): adds the
    gradients of W_q, b_q, W_k, b_k into dw, and writes dp [B,K,D] (p dtype) = dpt (the
    p_tilde path, [B,KP,D] fp32) + dk1 W_k."""
    b, A, ks, k_ok, a, cols = _program_axes(K, H, dh, KP, AP, HKP)
    k1x = _expand(tl.load(k1_ptr + b * KP * AP + ks[:, None] * AP + a[None, :]), K, H, dh, KP, AP,
                  HKP) * scale  # [AP, HKP]
    dcq = tl.load(dcq_ptr + b * HKP + cols)
    bq = _load_vec(w_ptr, T2P_Q_B, D, A, GH, a, A)
    _add_vec(dw_ptr, T2P_Q_B, D, A, GH, a, A, tl.sum(k1x * dcq[None, :], axis=1))
    dk1 = dcq[:, None] * bq[None, :]  # [HKP, AP]
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        dmq_t = tl.load(dmq_ptr + b * D * HKP + dd[None, :] * HKP + cols[:, None], mask=d_ok[None, :],
                        other=0.0)  # [HKP, BLOCK_D]
        dk1 += _mm_split(dmq_t, _load_wt(w_ptr, T2P_Q_W, D, A, GH, dd, d_ok, AP), 0, DOT_MODE)
        _add_w(dw_ptr, T2P_Q_W, D, A, GH, a, A, D, dd, D, 1, _mm_split(k1x, dmq_t, 0, DOT_MODE))
    dk1 = _collapse(dk1, K, H, dh, KP, AP, HKP) * scale  # [KP, AP]
    _add_vec(dw_ptr, T2P_K_B, D, A, GH, a, A, tl.sum(dk1, axis=0))
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        tile = ks[:, None] * D + dd[None, :]
        kd_ok = k_ok[:, None] & d_ok[None, :]
        pt = tl.load(p_ptr + b * K * D + tile, mask=kd_ok, other=0.0)
        _add_w(dw_ptr, T2P_K_W, D, A, GH, a, A, D, dd, D, 1, _mm_split(tl.trans(dk1), pt, 2, DOT_MODE))
        dp = tl.load(dpt_ptr + b * KP * D + tile, mask=d_ok[None, :], other=0.0)
        dp += _mm_split(dk1, _load_w(w_ptr, T2P_K_W, D, A, GH, dd, d_ok, AP), 0, DOT_MODE)
        tl.store(dp_ptr + b * K * D + tile, dp.to(dp_ptr.dtype.element_ty), mask=kd_ok)
