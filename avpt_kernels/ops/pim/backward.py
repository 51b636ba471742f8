"""PIM backward kernels (the sequence and its costs: ``ops.pim``). Shapes and conventions as in
``forward``; y = dL/dz_out [MZ, D] in the input dtype. Every weight gradient is a fixed-order
sum (split over rows into chunks, then the chunks added in order): no atomics, so the backward
is deterministic on a GPU too."""
import triton
import triton.language as tl

from .dots import _mm_split
from .forward import (_gelu, _head_tile, _p2t_logits, _prompt_axes, _store_head_tile,
                      _t2p_block)


@triton.jit
def _gelu_grad(x):
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + \
        x * tl.exp(-0.5 * x * x) * 0.3989422804014327


@triton.jit
def _grad_o2_kernel(y_ptr, o2_ptr, w_ptr, alpha_ptr, do2_ptr, dalpha_ptr, MZ, T, D, A, off_wo2,
                    off_bo2, BM: tl.constexpr, BK: tl.constexpr, AP: tl.constexpr,
                    DOT_MODE: tl.constexpr):
    """Grid (cdiv(MZ, BM),): yw = y W'o [BM, A]; do2 = alpha yw [MZ, A] (fp32); and per row
    dalpha_row = o2 . yw + y . b'o [MZ] (the gate's gradient, dalpha = sum over an image's rows
    of y . update, summed in order by ``_p2t_attn_bwd_kernel``)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    r_ok = rows < MZ
    rows64 = rows.to(tl.int64)
    aa = tl.arange(0, AP)
    a_ok = aa < A
    acc = tl.zeros((BM, AP), dtype=tl.float32)
    ydotb = tl.zeros((BM,), dtype=tl.float32)
    for d0 in range(0, D, BK):
        kk = d0 + tl.arange(0, BK)
        k_ok = kk < D
        y = tl.load(y_ptr + rows64[:, None] * D + kk[None, :], mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + off_wo2 + kk[:, None] * A + aa[None, :],
                    mask=k_ok[:, None] & a_ok[None, :], other=0.0)
        acc += _mm_split(y, w, 1, DOT_MODE)
        bo = tl.load(w_ptr + off_bo2 + kk, mask=k_ok, other=0.0)
        ydotb += tl.sum(y.to(tl.float32) * bo[None, :], axis=1)
    small = rows64[:, None] * A + aa[None, :]
    mask = r_ok[:, None] & a_ok[None, :]
    o2 = tl.load(o2_ptr + small, mask=mask, other=0.0)
    tl.store(dalpha_ptr + rows, tl.sum(o2 * acc, axis=1) + ydotb, mask=r_ok)
    alpha = tl.load(alpha_ptr + rows // T, mask=r_ok, other=0.0)
    tl.store(do2_ptr + small, alpha[:, None] * acc, mask=mask)


@triton.jit
def _p2t_attn_bwd_kernel(x_ptr, qv2_ptr, do2_ptr, dalpha_ptr, alpha_ptr, pre_ptr, w_ptr,
                         dx_ptr, dqv2_ptr, dpre_ptr, dlogit_ptr, T, K, A, dh, GH, off_w2, scale,
                         BT: tl.constexpr, KP: tl.constexpr, DHP: tl.constexpr,
                         GP: tl.constexpr, DOT_MODE: tl.constexpr):
    """Grid (B, H). Backward of Eqs. 7-8 for head h of image b, from do2 [MZ, A], in two passes
    over T. Pass 1 rebuilds the softmax over T of scale q2 K2^T with its own running max and sum
    (not the forward's statistics: a logit rounded one ulp differently from the forward's would
    make a saturated row sum to 1 + 2e-3 at |logits| ~1e4) and accumulates, rescaled as the max
    moves, dv2 = S2 do2 and delta = rowsum(S2 * dS2) with dS2 = v2 do2^T. Pass 2: dL2 =
    S2 (dS2 - delta) from the same dS2 values (a saturated row gives exactly 0, as torch's
    softmax backward), dq2 = scale dL2 K2 -> dqv2 [MP, 2A]; dK2 = scale dL2^T q2 -> dx [MZ, 3A]
    (columns 2A..3A). Head 0 also takes the gate back: dalpha (its image's row sums, in order)
    -> dlogit [B], dpre [B, GP]."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ks = tl.arange(0, KP)
    k_ok = ks < K
    prow = b * K + ks
    q2 = _head_tile(qv2_ptr, prow, k_ok, 2 * A, h * dh, DHP, dh)
    v2 = _head_tile(qv2_ptr, prow, k_ok, 2 * A, A + h * dh, DHP, dh)
    m = tl.full((KP,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((KP,), dtype=tl.float32)
    dv2 = tl.zeros((KP, DHP), dtype=tl.float32)
    delta = tl.zeros((KP,), dtype=tl.float32)
    for t0 in range(0, T, BT):
        ts, t_ok, k2, logits = _p2t_logits(q2, x_ptr, b, t0, T, A, h, dh, scale, BT, DHP, DOT_MODE)
        do = _head_tile(do2_ptr, b * T + ts, t_ok, A, h * dh, DHP, dh)
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        rescale = tl.exp(m - m_new)
        e = tl.where(k_ok[:, None], tl.exp(logits - m_new[:, None]), 0.0)
        l = l * rescale + tl.sum(e, axis=1)
        dv2 = dv2 * rescale[:, None] + _mm_split(e, do, 0, DOT_MODE)
        delta = delta * rescale + tl.sum(e * _mm_split(v2, tl.trans(do), 0, DOT_MODE), axis=1)
        m = m_new
    inv_l = tl.where(k_ok, 1.0 / tl.where(k_ok, l, 1.0), 0.0)  # padded prompts: l = 0
    dv2 = dv2 * inv_l[:, None]
    delta = delta * inv_l
    dq2 = tl.zeros((KP, DHP), dtype=tl.float32)
    for t0 in range(0, T, BT):
        ts, t_ok, k2, logits = _p2t_logits(q2, x_ptr, b, t0, T, A, h, dh, scale, BT, DHP, DOT_MODE)
        do = _head_tile(do2_ptr, b * T + ts, t_ok, A, h * dh, DHP, dh)
        s2 = tl.where(k_ok[:, None], tl.exp(logits - m[:, None]) * inv_l[:, None], 0.0)
        dl2 = s2 * (_mm_split(v2, tl.trans(do), 0, DOT_MODE) - delta[:, None])
        dq2 += _mm_split(dl2, k2, 0, DOT_MODE)
        _store_head_tile(dx_ptr, b * T + ts, t_ok, 3 * A, 2 * A + h * dh,
                         _mm_split(tl.trans(dl2), q2, 0, DOT_MODE) * scale, DHP, dh)
    _store_head_tile(dqv2_ptr, prow, k_ok, 2 * A, h * dh, dq2 * scale, DHP, dh)
    _store_head_tile(dqv2_ptr, prow, k_ok, 2 * A, A + h * dh, dv2, DHP, dh)
    if h == 0:
        dalpha = tl.zeros((BT,), dtype=tl.float32)
        for t0 in range(0, T, BT):
            ts = t0 + tl.arange(0, BT)
            dalpha += tl.load(dalpha_ptr + b * T + ts, mask=ts < T, other=0.0)
        alpha = tl.load(alpha_ptr + b)
        dlogit = tl.sum(dalpha, axis=0) * alpha * (1.0 - alpha)
        tl.store(dlogit_ptr + b, dlogit)
        gg = tl.arange(0, GP)
        g_ok = gg < GH
        pre = tl.load(pre_ptr + b * GP + gg)
        w2 = tl.load(w_ptr + off_w2 + gg, mask=g_ok, other=0.0)
        tl.store(dpre_ptr + b * GP + gg, tl.where(g_ok, dlogit * w2 * _gelu_grad(pre), 0.0))


@triton.jit
def _prompt_bwd_kernel(gpt_ptr, has_gpt, dqv2_ptr, dpre_ptr, w_ptr, dpt_ptr, dz0_ptr, part_ptr, MP,
                       K, D, A, GH, off_wq2, off_wv2, off_w1, off_wo,
                       BMP: tl.constexpr, BD: tl.constexpr, AP: tl.constexpr,
                       GP: tl.constexpr, DOT_MODE: tl.constexpr):
    """Grid (cdiv(MP, BMP), cdiv(D, BD)): dL/dp_tilde on a [BMP, BD] tile, dpt = gpt + dq2 W'q +
    dv2 W'v + dpre W1[:, :D] / K (the gate reads the mean over prompts) -> dpt [MP, D] fp32;
    the class token's gate gradient dz0 = dpre W1[:, D:] -> dz0 [B, D] (from each image's first
    prompt row); and this D tile's partial dmsg = dpt Wo [BMP, A] -> part [n_dtiles, MP, AP]."""
    rows, r_ok, rows64, dd, d_ok, aa, a_ok, gg, g_ok = _prompt_axes(MP, D, A, GH, BMP, BD, AP, GP)
    ra = r_ok[:, None] & a_ok[None, :]
    dq = tl.load(dqv2_ptr + rows64[:, None] * 2 * A + aa[None, :], mask=ra, other=0.0)
    dv = tl.load(dqv2_ptr + rows64[:, None] * 2 * A + A + aa[None, :], mask=ra, other=0.0)
    wmask = a_ok[:, None] & d_ok[None, :]
    wq = tl.load(w_ptr + off_wq2 + aa[:, None] * D + dd[None, :], mask=wmask, other=0.0)
    wv = tl.load(w_ptr + off_wv2 + aa[:, None] * D + dd[None, :], mask=wmask, other=0.0)
    img = (rows // K).to(tl.int64)
    dpre = tl.load(dpre_ptr + img[:, None] * GP + gg[None, :], mask=r_ok[:, None], other=0.0)
    gmask = g_ok[:, None] & d_ok[None, :]
    w1 = tl.load(w_ptr + off_w1 + gg[:, None] * 2 * D + dd[None, :], mask=gmask, other=0.0)
    w1z = tl.load(w_ptr + off_w1 + D + gg[:, None] * 2 * D + dd[None, :], mask=gmask, other=0.0)
    tile = rows64[:, None] * D + dd[None, :]
    tile_ok = r_ok[:, None] & d_ok[None, :]
    dpt = _mm_split(dq, wq, 0, DOT_MODE) + _mm_split(dv, wv, 0, DOT_MODE) + \
        _mm_split(dpre, w1, 0, DOT_MODE) / K
    if has_gpt:
        dpt += tl.load(gpt_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
    dpt = tl.where(tile_ok, dpt, 0.0)
    tl.store(dpt_ptr + tile, dpt, mask=tile_ok)
    first = r_ok & (rows % K == 0)
    tl.store(dz0_ptr + img[:, None] * D + dd[None, :], _mm_split(dpre, w1z, 0, DOT_MODE),
             mask=first[:, None] & d_ok[None, :])
    wo = tl.load(w_ptr + off_wo + dd[:, None] * A + aa[None, :], mask=d_ok[:, None] & a_ok[None, :],
                 other=0.0)
    tl.store(part_ptr + (tl.program_id(1) * MP + rows64)[:, None] * AP + aa[None, :],
             _mm_split(dpt, wo, 0, DOT_MODE), mask=r_ok[:, None])


@triton.jit
def _t2p_attn_bwd_kernel(x_ptr, k1_ptr, part_ptr, dx_ptr, dk1_ptr, T, K, A, dh, MP, n_dtiles, AP,
                         scale, inv_tokens, BT: tl.constexpr, KP: tl.constexpr,
                         DHP: tl.constexpr, DOT_MODE: tl.constexpr):
    """Grid (B, H). Backward of Eqs. 5-6 for head h of image b: dM = inv_tokens * dmsg (the
    prompt kernel's partials summed over D tiles in order); per token block S1 rebuilt from
    Q1, K1; dV1 = S1 dM, dS1 = V1 dM^T, dL1 = S1 (dS1 - rowsum(S1 dS1)), dQ1 = scale dL1 K1
    -> dx [MZ, 3A] (columns 0..2A); dK1 = scale sum_t dL1^T Q1 -> dk1 [MP, A]."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ks = tl.arange(0, KP)
    k_ok = ks < K
    prow = b * K + ks
    k1 = _head_tile(k1_ptr, prow, k_ok, A, h * dh, DHP, dh)
    k1t = tl.trans(k1)
    dm = tl.zeros((KP, DHP), dtype=tl.float32)
    for i in range(0, n_dtiles):
        dm += _head_tile(part_ptr + i * MP * AP, prow, k_ok, AP, h * dh, DHP, dh)
    dm = dm * inv_tokens
    dmt = tl.trans(dm)
    dk1 = tl.zeros((KP, DHP), dtype=tl.float32)
    for t0 in range(0, T, BT):
        ts, t_ok, q, v, s1 = _t2p_block(x_ptr, b, t0, T, A, h, dh, k1t, k_ok, scale, BT, DHP,
                                        DOT_MODE)
        ds1 = _mm_split(v, dmt, 0, DOT_MODE)
        dl1 = s1 * (ds1 - tl.sum(s1 * ds1, axis=1)[:, None])
        _store_head_tile(dx_ptr, b * T + ts, t_ok, 3 * A, h * dh,
                         _mm_split(dl1, k1, 0, DOT_MODE) * scale, DHP, dh)
        _store_head_tile(dx_ptr, b * T + ts, t_ok, 3 * A, A + h * dh,
                         _mm_split(s1, dm, 0, DOT_MODE), DHP, dh)
        dk1 += _mm_split(tl.trans(dl1), q, 0, DOT_MODE)
    _store_head_tile(dk1_ptr, prow, k_ok, A, h * dh, dk1 * scale, DHP, dh)


@triton.jit
def _grad_z_kernel(y_ptr, dx_ptr, w_ptr, dz0_ptr, dz_ptr, MZ, T, D, A, off_wq, off_wv, off_wk2,
                   BM: tl.constexpr, BN: tl.constexpr, BKA: tl.constexpr,
                   DOT_MODE: tl.constexpr):
    """Grid (cdiv(MZ, BM), cdiv(D, BN)): dz = y + dx [Wq; Wv; W'k] (+ dz0 on each image's class
    token, which the gate reads) on a [BM, BN] tile; one rounding to the output dtype. One loop
    over the 3A columns of dx (pipelined: a step's weight rows may straddle two of the three
    weights, each row read from its own field); both operands fp32: split dots."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    r_ok = rows < MZ
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    c_ok = cols < D
    tile = rows64[:, None] * D + cols[None, :]
    mask = r_ok[:, None] & c_ok[None, :]
    acc = tl.load(y_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    for k0 in range(0, 3 * A, BKA):
        kk = k0 + tl.arange(0, BKA)
        k_ok = kk < 3 * A
        dxt = tl.load(dx_ptr + rows64[:, None] * 3 * A + kk[None, :],
                      mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        field = kk // A
        w_row = tl.where(field == 0, off_wq, tl.where(field == 1, off_wv, off_wk2)) + \
            (kk - field * A) * D
        w = tl.load(w_ptr + w_row[:, None] + cols[None, :], mask=k_ok[:, None] & c_ok[None, :],
                    other=0.0)
        acc += _mm_split(dxt, w, 0, DOT_MODE)
    first = r_ok & (rows % T == 0)
    acc += tl.load(dz0_ptr + (rows // T).to(tl.int64)[:, None] * D + cols[None, :],
                   mask=first[:, None] & c_ok[None, :], other=0.0)
    tl.store(dz_ptr + tile, acc.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wgrad_kernel(a_ptr, b_ptr, alpha_ptr, part_ptr, M, NA, NB, lda, ldb, T, chunk_rows,
                  HAS_SCALE: tl.constexpr, EXACT: tl.constexpr, BNA: tl.constexpr,
                  BNB: tl.constexpr, BR: tl.constexpr, DOT_MODE: tl.constexpr):
    """Grid (cdiv(NA, BNA), cdiv(NB, BNB), n_chunks): a weight gradient over token rows, one
    chunk of chunk_rows rows a program: part[c] [NA, NB] = a[rows]^T (s * b[rows]) and (from the
    programs of the first NB tile) the bias part part[n_chunks * NA * NB + c * NA + i] =
    sum_rows s a[rows, i]; s = alpha of the row's image with HAS_SCALE, else 1. EXACT: which
    operand is exact in the input dtype (1: a, 2: b; the other is fp32). ``_reduce_kernel``
    adds the chunks in order."""
    i = tl.program_id(0) * BNA + tl.arange(0, BNA)
    i_ok = i < NA
    j = tl.program_id(1) * BNB + tl.arange(0, BNB)
    j_ok = j < NB
    c = tl.program_id(2)
    acc = tl.zeros((BNA, BNB), dtype=tl.float32)
    bias = tl.zeros((BNA,), dtype=tl.float32)
    for r0 in range(0, chunk_rows, BR):
        rows = c * chunk_rows + r0 + tl.arange(0, BR)
        r_ok = rows < M
        rows64 = rows.to(tl.int64)
        at = tl.load(a_ptr + rows64[:, None] * lda + i[None, :], mask=r_ok[:, None] & i_ok[None, :],
                     other=0.0)
        bt = tl.load(b_ptr + rows64[:, None] * ldb + j[None, :], mask=r_ok[:, None] & j_ok[None, :],
                     other=0.0)
        if HAS_SCALE:
            s = tl.load(alpha_ptr + rows // T, mask=r_ok, other=0.0)
            bt = bt.to(tl.float32) * s[:, None]
            bias += tl.sum(at.to(tl.float32) * s[:, None], axis=0)
        else:
            bias += tl.sum(at.to(tl.float32), axis=0)
        acc += _mm_split(tl.trans(at), bt, EXACT, DOT_MODE)
    tl.store(part_ptr + (c * NA + i[:, None]).to(tl.int64) * NB + j[None, :], acc,
             mask=i_ok[:, None] & j_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(part_ptr + tl.num_programs(2).to(tl.int64) * NA * NB + c * NA + i, bias, mask=i_ok)


@triton.jit
def _reduce_block(blk, part_ptr, dw_ptr, n_chunks, NA, NB, seg_rows, off_w0, off_w1, off_w2,
                  off_b0, off_b1, off_b2, n_bias_segs, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    """Block ``blk`` of one weight gradient's chunks (``_wgrad_kernel``; n_chunks <= CHUNKS),
    loaded as one [CHUNKS, BLOCK] tile and summed over the chunk axis (one fixed reduction tree:
    deterministic, no serial loop), written into the flat weight gradient: row i of [NA, NB]
    goes to segment s = i // seg_rows (a weight field at off_w<s>, [seg_rows, NB]), bias i to
    off_b<s>; segments >= n_bias_segs get a zero bias gradient (b'k, which drops out)."""
    e = blk * BLOCK + tl.arange(0, BLOCK)
    n_w = NA * NB
    ok = e < n_w + NA
    is_w = e < n_w
    src = tl.where(is_w, e, n_chunks * n_w + (e - n_w)).to(tl.int64)
    step = tl.where(is_w, n_w, NA).to(tl.int64)
    c = tl.arange(0, CHUNKS)
    tile = tl.load(part_ptr + src[None, :] + c.to(tl.int64)[:, None] * step[None, :],
                   mask=(c < n_chunks)[:, None] & ok[None, :], other=0.0)
    acc = tl.sum(tile, axis=0)
    row = tl.where(is_w, e // NB, e - n_w)
    seg = row // seg_rows
    local = row - seg * seg_rows
    w_dst = tl.where(seg == 0, off_w0, tl.where(seg == 1, off_w1, off_w2)) + local * NB + e % NB
    b_dst = tl.where(seg == 0, off_b0, tl.where(seg == 1, off_b1, off_b2)) + local
    acc = tl.where(is_w | (seg < n_bias_segs), acc, 0.0)
    tl.store(dw_ptr + tl.where(is_w, w_dst, b_dst), acc, mask=ok)


@triton.jit
def _reduce_kernel(dw_ptr, wz_ptr, wz_chunks, NZ, D, A, off_wq, off_wv, off_wk2, off_bq, off_bv,
                   off_bk2, wz_blocks, wo_ptr, wo_chunks, off_wo2, off_bo2,
                   BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    """Grid (wz_blocks + cdiv(D * A + D, BLOCK),): both token-row weight gradients' chunks
    summed in one launch (``_reduce_block``): first dWz [NZ = 3A, D] (+ its biases) into the
    t2p q, t2p v and p2t k fields (b'k's gradient 0), then dW'o [D, A] (+ db'o)."""
    pid = tl.program_id(0)
    if pid < wz_blocks:
        _reduce_block(pid, wz_ptr, dw_ptr, wz_chunks, NZ, D, A, off_wq, off_wv, off_wk2, off_bq,
                      off_bv, off_bk2, 2, BLOCK, CHUNKS)
    else:
        _reduce_block(pid - wz_blocks, wo_ptr, dw_ptr, wo_chunks, D, A, D, off_wo2, off_wo2,
                      off_wo2, off_bo2, off_bo2, off_bo2, 1, BLOCK, CHUNKS)


@triton.jit
def _prompt_wgrad_kernel(p_ptr, z_ptr, w_ptr, msg_ptr, pt32_ptr, dpt_ptr, dqv2_ptr, dk1_ptr,
                         dpre_ptr, dlogit_ptr, pre_ptr, dw_ptr, dp_ptr, B, MP, T, K, D, A, GH,
                         off_wk, off_bk, off_wo, off_bo, off_wq2, off_bq2, off_wv2, off_bv2,
                         off_w1, off_b1, off_w2, off_b2,
                         BD: tl.constexpr, BR: tl.constexpr, AP: tl.constexpr,
                         GP: tl.constexpr, DOT_MODE: tl.constexpr):
    """Grid (cdiv(D, BD), 6): the gradients that reduce over the MP prompt rows (or B images),
    for the D columns dd of this program, by job (program_id(1)):
      0: dWo[dd, :] = dpt^T msg, dbo[dd] = sum dpt        3: dWk[:, dd] = dk1^T p (+ dbk)
      1: dW'q[:, dd] = dq2^T pt (+ db'q on the first tile) 4: the gate: dW1, db1, dw2, db2
      2: dW'v[:, dd] = dv2^T pt (+ db'v)                   5: dp[:, dd] = dpt + dk1 Wk
    Rows in blocks of BR, summed in order."""
    dd = tl.program_id(0) * BD + tl.arange(0, BD)
    d_ok = dd < D
    job = tl.program_id(1)
    first_tile = tl.program_id(0) == 0
    aa = tl.arange(0, AP)
    a_ok = aa < A
    gg = tl.arange(0, GP)
    g_ok = gg < GH
    ad = a_ok[:, None] & d_ok[None, :]
    if job == 0:
        acc = tl.zeros((BD, AP), dtype=tl.float32)
        bias = tl.zeros((BD,), dtype=tl.float32)
        for r0 in range(0, MP, BR):
            rows = (r0 + tl.arange(0, BR)).to(tl.int64)
            r_ok = rows < MP
            g = tl.load(dpt_ptr + rows[:, None] * D + dd[None, :], mask=r_ok[:, None] & d_ok[None, :],
                        other=0.0)
            m = tl.load(msg_ptr + rows[:, None] * A + aa[None, :], mask=r_ok[:, None] & a_ok[None, :],
                        other=0.0)
            acc += _mm_split(tl.trans(g), m, 0, DOT_MODE)
            bias += tl.sum(g, axis=0)
        tl.store(dw_ptr + off_wo + dd[:, None] * A + aa[None, :], acc,
                 mask=d_ok[:, None] & a_ok[None, :])
        tl.store(dw_ptr + off_bo + dd, bias, mask=d_ok)
    elif job < 4:
        # 1, 2: dW'{q,v} from dqv2's halves and pt; 3: dWk from dk1 and p (exact)
        src = tl.where(job == 3, 0, (job - 1) * A)
        ld = tl.where(job == 3, A, 2 * A)
        acc = tl.zeros((AP, BD), dtype=tl.float32)
        bias = tl.zeros((AP,), dtype=tl.float32)
        for r0 in range(0, MP, BR):
            rows = (r0 + tl.arange(0, BR)).to(tl.int64)
            r_ok = rows < MP
            ra = r_ok[:, None] & a_ok[None, :]
            rd = r_ok[:, None] & d_ok[None, :]
            if job == 3:
                g = tl.load(dk1_ptr + rows[:, None] * A + aa[None, :], mask=ra, other=0.0)
                xp = tl.load(p_ptr + rows[:, None] * D + dd[None, :], mask=rd, other=0.0)
                acc += _mm_split(tl.trans(g), xp, 2, DOT_MODE)
            else:
                g = tl.load(dqv2_ptr + rows[:, None] * ld + src + aa[None, :], mask=ra, other=0.0)
                xf = tl.load(pt32_ptr + rows[:, None] * D + dd[None, :], mask=rd, other=0.0)
                acc += _mm_split(tl.trans(g), xf, 0, DOT_MODE)
            bias += tl.sum(g, axis=0)
        w_off = tl.where(job == 1, off_wq2, tl.where(job == 2, off_wv2, off_wk))
        b_off = tl.where(job == 1, off_bq2, tl.where(job == 2, off_bv2, off_bk))
        tl.store(dw_ptr + w_off + aa[:, None] * D + dd[None, :], acc, mask=ad)
        tl.store(dw_ptr + b_off + aa, bias, mask=a_ok & first_tile)
    elif job == 4:
        # dW1[:, dd] = sum_rows dpre_img / K * pt;  dW1[:, D + dd] = sum_images dpre_b z0_b
        acc = tl.zeros((GP, BD), dtype=tl.float32)
        for r0 in range(0, MP, BR):
            rows = (r0 + tl.arange(0, BR)).to(tl.int64)
            r_ok = rows < MP
            g = tl.load(dpre_ptr + (rows // K)[:, None] * GP + gg[None, :], mask=r_ok[:, None],
                        other=0.0)
            x = tl.load(pt32_ptr + rows[:, None] * D + dd[None, :], mask=r_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc += _mm_split(tl.trans(g), x, 0, DOT_MODE)
        gd = g_ok[:, None] & d_ok[None, :]
        tl.store(dw_ptr + off_w1 + gg[:, None] * 2 * D + dd[None, :], acc / K, mask=gd)
        acc = tl.zeros((GP, BD), dtype=tl.float32)
        db1 = tl.zeros((GP,), dtype=tl.float32)
        dw2 = tl.zeros((GP,), dtype=tl.float32)
        db2 = tl.zeros((BR,), dtype=tl.float32)
        for r0 in range(0, B, BR):
            imgs = (r0 + tl.arange(0, BR)).to(tl.int64)
            i_ok = imgs < B
            g = tl.load(dpre_ptr + imgs[:, None] * GP + gg[None, :], mask=i_ok[:, None], other=0.0)
            x = tl.load(z_ptr + imgs[:, None] * T * D + dd[None, :], mask=i_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc += _mm_split(tl.trans(g), x, 2, DOT_MODE)
            db1 += tl.sum(g, axis=0)
            dlogit = tl.load(dlogit_ptr + imgs, mask=i_ok, other=0.0)
            pre = tl.load(pre_ptr + imgs[:, None] * GP + gg[None, :], mask=i_ok[:, None], other=0.0)
            dw2 += tl.sum(dlogit[:, None] * _gelu(pre), axis=0)
            db2 += dlogit
        tl.store(dw_ptr + off_w1 + D + gg[:, None] * 2 * D + dd[None, :], acc, mask=gd)
        tl.store(dw_ptr + off_b1 + gg, db1, mask=g_ok & first_tile)
        tl.store(dw_ptr + off_w2 + gg, dw2, mask=g_ok & first_tile)
        tl.store(dw_ptr + off_b2, tl.sum(db2, axis=0), mask=first_tile)
    else:
        wk = tl.load(w_ptr + off_wk + aa[:, None] * D + dd[None, :], mask=ad, other=0.0)
        for r0 in range(0, MP, BR):
            rows = (r0 + tl.arange(0, BR)).to(tl.int64)
            r_ok = rows < MP
            rd = r_ok[:, None] & d_ok[None, :]
            g = tl.load(dk1_ptr + rows[:, None] * A + aa[None, :], mask=r_ok[:, None] & a_ok[None, :],
                        other=0.0)
            dp = tl.load(dpt_ptr + rows[:, None] * D + dd[None, :], mask=rd, other=0.0) + \
                _mm_split(g, wk, 0, DOT_MODE)
            tl.store(dp_ptr + rows[:, None] * D + dd[None, :], dp.to(dp_ptr.dtype.element_ty), mask=rd)
