"""PIM forward kernels: five GEMM-shaped passes (the algorithm and its costs: ``ops.pim``).

Rows: MZ = B*T token rows, MP = B*K prompt rows (row r of image r // T, resp. r // K). A = H*dh,
padded to AP (dh to DHP, K to KP, G to GP: powers of two >= 16, the tensor-core minimum).
Weights: the flat fp32 vector (``weights.field_offsets``), read with the offsets passed in.
Every product with an fp32 operand is a split dot (``dots._mm_split``); nothing is atomic.
"""
import triton
import triton.language as tl

from .dots import _mm_split


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _project_kernel(z_ptr, p_ptr, w_ptr, x_ptr, k1_ptr, MZ, MP, D, A,
                    off_wq, off_bq, off_wv, off_bv, off_wk2, off_wk, off_bk,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    DOT_MODE: tl.constexpr):
    """Grid (cdiv(MZ, BM) * cdiv(A, BN) + cdiv(MP, BM) * cdiv(A, BN),): the token rows'
    projections x [MZ, 3A] = z [Wq; Wv; W'k]^T + [bq; bv; 0] (fp32; b'k shifts every logit of a
    prompt->token softmax row by one constant, so it drops out exactly), all three from one read
    of each z tile, then the prompt rows' keys k1 [MP, A] = p Wk^T + bk (fp32; the second and
    third weights masked off). z, p in the input dtype (exact: two-part dots)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(A, BN)
    z_programs = tl.cdiv(MZ, BM) * n_tiles
    is_z = pid < z_programs
    q = tl.where(is_z, pid, pid - z_programs)
    row0 = (q // n_tiles) * BM
    col0 = (q % n_tiles) * BN
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < tl.where(is_z, MZ, MP)
    cols = col0 + tl.arange(0, BN)
    col_ok = cols < A
    rows64 = rows.to(tl.int64)
    src = tl.where(is_z, z_ptr, p_ptr)
    off_w0 = tl.where(is_z, off_wq, off_wk)
    w_ok = col_ok & is_z  # the second and third weights: token rows only
    acc0 = tl.zeros((BM, BN), dtype=tl.float32)
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        k_ok = kk < D
        xt = tl.load(src + rows64[:, None] * D + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0)
        w_tile = cols[None, :] * D + kk[:, None]
        wt = tl.load(w_ptr + off_w0 + w_tile, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc0 += _mm_split(xt, wt, 1, DOT_MODE)
        wt = tl.load(w_ptr + off_wv + w_tile, mask=w_ok[None, :] & k_ok[:, None], other=0.0)
        acc1 += _mm_split(xt, wt, 1, DOT_MODE)
        wt = tl.load(w_ptr + off_wk2 + w_tile, mask=w_ok[None, :] & k_ok[:, None], other=0.0)
        acc2 += _mm_split(xt, wt, 1, DOT_MODE)
    acc0 += tl.load(w_ptr + tl.where(is_z, off_bq, off_bk) + cols, mask=col_ok, other=0.0)[None, :]
    acc1 += tl.load(w_ptr + off_bv + cols, mask=w_ok, other=0.0)[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if pid < z_programs:
        dst = x_ptr + rows64[:, None] * (3 * A) + cols[None, :]
        tl.store(dst, acc0, mask=out_mask)
        tl.store(dst + A, acc1, mask=out_mask)
        tl.store(dst + 2 * A, acc2, mask=out_mask)
    else:
        tl.store(k1_ptr + rows64[:, None] * A + cols[None, :], acc0, mask=out_mask)


@triton.jit
def _head_tile(ptr, rows, row_ok, stride, col0, DHP: tl.constexpr, dh):
    """[len(rows), DHP] fp32 tile of one head's dh columns starting at col0 (zero-padded)."""
    js = tl.arange(0, DHP)
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride + col0 + js[None, :],
                   mask=row_ok[:, None] & (js < dh)[None, :], other=0.0)


@triton.jit
def _store_head_tile(ptr, rows, row_ok, stride, col0, x, DHP: tl.constexpr, dh):
    js = tl.arange(0, DHP)
    tl.store(ptr + rows.to(tl.int64)[:, None] * stride + col0 + js[None, :], x,
             mask=row_ok[:, None] & (js < dh)[None, :])


@triton.jit
def _prompt_softmax(q, k1t, k_ok, scale, DOT_MODE: tl.constexpr):
    """Token->prompt attention of a block of tokens: softmax over the K prompts of
    scale * q k1^T; q [BT, DHP], k1t [DHP, KP] -> [BT, KP] (padded prompts get 0)."""
    logits = _mm_split(q, k1t, 0, DOT_MODE) * scale
    logits = tl.where(k_ok[None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _t2p_block(x_ptr, b, t0, T, A, h, dh, k1t, k_ok, scale, BT: tl.constexpr, DHP: tl.constexpr,
               DOT_MODE: tl.constexpr):
    """One token block of head h's token->prompt attention: the block's tokens, their mask, Q1
    and V1 [BT, DHP] (x's first two A-column groups) and S1 [BT, KP] (0 past T)."""
    ts = t0 + tl.arange(0, BT)
    t_ok = ts < T
    q = _head_tile(x_ptr, b * T + ts, t_ok, 3 * A, h * dh, DHP, dh)
    v = _head_tile(x_ptr, b * T + ts, t_ok, 3 * A, A + h * dh, DHP, dh)
    s1 = tl.where(t_ok[:, None], _prompt_softmax(q, k1t, k_ok, scale, DOT_MODE), 0.0)
    return ts, t_ok, q, v, s1


@triton.jit
def _t2p_attn_kernel(x_ptr, k1_ptr, msg_ptr, T, K, A, dh, scale, inv_tokens,
                     BT: tl.constexpr, KP: tl.constexpr, DHP: tl.constexpr,
                     DOT_MODE: tl.constexpr):
    """Grid (B, H). Eqs. 5-6 for head h of image b: S1 = softmax over prompts of
    scale Q1 K1^T (per token), msg_h = S1^T V1 * inv_tokens [K, dh]. Q1, V1 from x [MZ, 3A],
    K1 from k1 [MP, A]; msg [MP, A] (fp32)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ks = tl.arange(0, KP)
    k_ok = ks < K
    k1 = _head_tile(k1_ptr, b * K + ks, k_ok, A, h * dh, DHP, dh)
    k1t = tl.trans(k1)
    acc = tl.zeros((KP, DHP), dtype=tl.float32)
    for t0 in range(0, T, BT):
        ts, t_ok, q, v, s1 = _t2p_block(x_ptr, b, t0, T, A, h, dh, k1t, k_ok, scale, BT, DHP,
                                        DOT_MODE)
        acc += _mm_split(tl.trans(s1), v, 0, DOT_MODE)
    _store_head_tile(msg_ptr, b * K + ks, k_ok, A, h * dh, acc * inv_tokens, DHP, dh)


@triton.jit
def _prompt_axes(MP, D, A, GH, BMP: tl.constexpr, BD: tl.constexpr, AP: tl.constexpr,
                 GP: tl.constexpr):
    """A prompt-row program's axes: its BMP rows (mask, int64), its BD columns of D (mask), the
    padded attention features and gate units (masks)."""
    rows = tl.program_id(0) * BMP + tl.arange(0, BMP)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    aa = tl.arange(0, AP)
    gg = tl.arange(0, GP)
    return rows, rows < MP, rows.to(tl.int64), dd, dd < D, aa, aa < A, gg, gg < GH


@triton.jit
def _p2t_logits(q2, x_ptr, b, t0, T, A, h, dh, scale, BT: tl.constexpr, DHP: tl.constexpr,
                DOT_MODE: tl.constexpr):
    """One token block of head h's prompt->token logits, scale q2 K2^T [KP, BT] (-inf past T),
    with the block's tokens, their mask and K2 [BT, DHP] (from x's last A columns)."""
    ts = t0 + tl.arange(0, BT)
    t_ok = ts < T
    k2 = _head_tile(x_ptr, b * T + ts, t_ok, 3 * A, 2 * A + h * dh, DHP, dh)
    logits = tl.where(t_ok[None, :], _mm_split(q2, tl.trans(k2), 0, DOT_MODE) * scale,
                      float("-inf"))
    return ts, t_ok, k2, logits


@triton.jit
def _prompt_kernel(p_ptr, z_ptr, w_ptr, msg_ptr, p_tilde_ptr, pt32_ptr, part_ptr, MP, T, K, D,
                   A, GH, off_wo, off_bo, off_wq2, off_wv2, off_w1,
                   BMP: tl.constexpr, BD: tl.constexpr, AP: tl.constexpr, GP: tl.constexpr,
                   DOT_MODE: tl.constexpr):
    """Grid (cdiv(MP, BMP), cdiv(D, BD)): p_tilde = p + msg Wo^T + bo on a [BMP, BD] tile
    (stored in p's dtype and in fp32, pt32 [MP, D]), and this D tile's partial sums of what
    reduces p_tilde over D, in part [n_dtiles, MP, 2AP + 2GP]: q2 = p_tilde W'q^T, v2 =
    p_tilde W'v^T (columns 0..2AP), the gate's p_tilde W1[:, :D]^T (summed over prompts and
    divided by K later: the mean over prompts) and, on each image's first prompt row, its class
    token's z_0 W1[:, D:]^T. Summed over tiles in a fixed order by ``_p2t_attn_kernel``."""
    rows, r_ok, rows64, dd, d_ok, aa, a_ok, gg, g_ok = _prompt_axes(MP, D, A, GH, BMP, BD, AP, GP)
    tile_ok = r_ok[:, None] & d_ok[None, :]
    msg = tl.load(msg_ptr + rows64[:, None] * A + aa[None, :], mask=r_ok[:, None] & a_ok[None, :],
                  other=0.0)
    wo_t = tl.load(w_ptr + off_wo + dd[None, :] * A + aa[:, None],
                   mask=a_ok[:, None] & d_ok[None, :], other=0.0)  # Wo^T [AP, BD]
    pin = tl.load(p_ptr + rows64[:, None] * D + dd[None, :], mask=tile_ok, other=0.0)
    bo = tl.load(w_ptr + off_bo + dd, mask=d_ok, other=0.0)
    pt = pin.to(tl.float32) + _mm_split(msg, wo_t, 0, DOT_MODE) + bo[None, :]
    pt = tl.where(tile_ok, pt, 0.0)
    tile = rows64[:, None] * D + dd[None, :]
    tl.store(p_tilde_ptr + tile, pt.to(p_tilde_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(pt32_ptr + tile, pt, mask=tile_ok)
    wmask = d_ok[:, None] & a_ok[None, :]
    wq_t = tl.load(w_ptr + off_wq2 + aa[None, :] * D + dd[:, None], mask=wmask, other=0.0)
    wv_t = tl.load(w_ptr + off_wv2 + aa[None, :] * D + dd[:, None], mask=wmask, other=0.0)
    gmask = d_ok[:, None] & g_ok[None, :]
    w1_t = tl.load(w_ptr + off_w1 + gg[None, :] * 2 * D + dd[:, None], mask=gmask, other=0.0)
    w1z_t = tl.load(w_ptr + off_w1 + D + gg[None, :] * 2 * D + dd[:, None], mask=gmask, other=0.0)
    first = r_ok & (rows % K == 0)
    img = (rows // K).to(tl.int64)
    z0 = tl.load(z_ptr + img[:, None] * T * D + dd[None, :], mask=first[:, None] & d_ok[None, :],
                 other=0.0)
    width = 2 * AP + 2 * GP
    out = part_ptr + (tl.program_id(1) * MP + rows64)[:, None] * width
    mask = r_ok[:, None]
    tl.store(out + aa[None, :], _mm_split(pt, wq_t, 0, DOT_MODE), mask=mask)
    tl.store(out + AP + aa[None, :], _mm_split(pt, wv_t, 0, DOT_MODE), mask=mask)
    tl.store(out + 2 * AP + gg[None, :], _mm_split(pt, w1_t, 0, DOT_MODE), mask=mask)
    tl.store(out + 2 * AP + GP + gg[None, :], _mm_split(z0, w1z_t, 1, DOT_MODE), mask=mask)


@triton.jit
def _p2t_attn_kernel(x_ptr, part_ptr, w_ptr, qv2_ptr, o2_ptr, attn_ptr, pre_ptr, alpha_ptr,
                     T, K, A, dh, GH, H, MP, n_dtiles, AP, off_bq2, off_bv2, off_b1,
                     off_w2, off_b2, scale, return_attn,
                     BT: tl.constexpr, KP: tl.constexpr, DHP: tl.constexpr, GP: tl.constexpr,
                     DOT_MODE: tl.constexpr):
    """Grid (B, H). q2, v2 of head h (the prompt kernel's partials summed over D tiles in order,
    plus biases; stored to qv2 [MP, 2A]; AP: the partials' padded A); then Eqs. 7-8: S2 =
    softmax over tokens of scale q2 K2^T [K, T] (two passes: max and sum, then probabilities),
    and o2 = S2^T v2 [T, dh] into o2 [MZ, A] (fp32), S2 into attn [B, H, K, T] when
    return_attn. Head 0 also finishes the gate (Eq. 9): pre [B, GP] and alpha [B]."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ks = tl.arange(0, KP)
    k_ok = ks < K
    js = tl.arange(0, DHP)
    j_ok = js < dh
    prow = b * K + ks
    width = 2 * AP + 2 * GP
    q2 = tl.zeros((KP, DHP), dtype=tl.float32)
    v2 = tl.zeros((KP, DHP), dtype=tl.float32)
    for i in range(0, n_dtiles):
        q2 += _head_tile(part_ptr + i * MP * width, prow, k_ok, width, h * dh, DHP, dh)
        v2 += _head_tile(part_ptr + i * MP * width, prow, k_ok, width, AP + h * dh, DHP, dh)
    kj_ok = k_ok[:, None] & j_ok[None, :]
    q2 = tl.where(kj_ok, q2 + tl.load(w_ptr + off_bq2 + h * dh + js, mask=j_ok)[None, :], 0.0)
    v2 = tl.where(kj_ok, v2 + tl.load(w_ptr + off_bv2 + h * dh + js, mask=j_ok)[None, :], 0.0)
    _store_head_tile(qv2_ptr, prow, k_ok, 2 * A, h * dh, q2, DHP, dh)
    _store_head_tile(qv2_ptr, prow, k_ok, 2 * A, A + h * dh, v2, DHP, dh)
    if h == 0:
        gg = tl.arange(0, GP)
        g_ok = gg < GH
        mean_part = tl.zeros((GP,), dtype=tl.float32)
        z0_part = tl.zeros((GP,), dtype=tl.float32)
        for i in range(0, n_dtiles):
            blk = part_ptr + (i * MP + prow)[:, None] * width + 2 * AP + gg[None, :]
            mean_part += tl.sum(tl.load(blk, mask=k_ok[:, None], other=0.0), axis=0)
            z0_part += tl.sum(tl.load(blk + GP, mask=k_ok[:, None], other=0.0), axis=0)
        pre = mean_part / K + z0_part + tl.load(w_ptr + off_b1 + gg, mask=g_ok, other=0.0)
        pre = tl.where(g_ok, pre, 0.0)
        tl.store(pre_ptr + b * GP + gg, pre)
        logit = tl.sum(tl.load(w_ptr + off_w2 + gg, mask=g_ok, other=0.0) * _gelu(pre), axis=0) + \
            tl.load(w_ptr + off_b2)
        tl.store(alpha_ptr + b, 1.0 / (1.0 + tl.exp(-logit)))  # b2 = -inf (gates shut): exactly 0
    m = tl.full((KP,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((KP,), dtype=tl.float32)
    for t0 in range(0, T, BT):
        ts, t_ok, k2, logits = _p2t_logits(q2, x_ptr, b, t0, T, A, h, dh, scale, BT, DHP, DOT_MODE)
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
    inv_l = 1.0 / l
    for t0 in range(0, T, BT):
        ts, t_ok, k2, logits = _p2t_logits(q2, x_ptr, b, t0, T, A, h, dh, scale, BT, DHP, DOT_MODE)
        s2 = tl.exp(logits - m[:, None]) * inv_l[:, None]
        s2 = tl.where(k_ok[:, None], s2, 0.0)
        _store_head_tile(o2_ptr, b * T + ts, t_ok, A, h * dh,
                         _mm_split(tl.trans(s2), v2, 0, DOT_MODE), DHP, dh)
        if return_attn:
            tl.store(attn_ptr + ((b * H + h) * K + ks[:, None]) * T + ts[None, :], s2,
                     mask=k_ok[:, None] & t_ok[None, :])


@triton.jit
def _output_kernel(z_ptr, o2_ptr, w_ptr, alpha_ptr, out_ptr, MZ, T, D, A, off_wo2, off_bo2,
                   BM: tl.constexpr, BN: tl.constexpr, BKA: tl.constexpr,
                   DOT_MODE: tl.constexpr):
    """Grid (cdiv(MZ, BM), cdiv(D, BN)): Eqs. 8-10's output, z_out = z + alpha (o2 W'o^T + b'o)
    on a [BM, BN] tile (= (1 - alpha) z + alpha (z + update)); alpha of each row's image."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    r_ok = rows < MZ
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    c_ok = cols < D
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for a0 in range(0, A, BKA):
        aa = a0 + tl.arange(0, BKA)
        a_ok = aa < A
        o = tl.load(o2_ptr + rows64[:, None] * A + aa[None, :], mask=r_ok[:, None] & a_ok[None, :],
                    other=0.0)
        wt = tl.load(w_ptr + off_wo2 + cols[None, :] * A + aa[:, None],
                     mask=a_ok[:, None] & c_ok[None, :], other=0.0)
        acc += _mm_split(o, wt, 0, DOT_MODE)
    acc += tl.load(w_ptr + off_bo2 + cols, mask=c_ok, other=0.0)[None, :]
    alpha = tl.load(alpha_ptr + rows // T, mask=r_ok, other=0.0)
    tile = rows64[:, None] * D + cols[None, :]
    mask = r_ok[:, None] & c_ok[None, :]
    z = tl.load(z_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + tile, (z + alpha[:, None] * acc).to(out_ptr.dtype.element_ty), mask=mask)
