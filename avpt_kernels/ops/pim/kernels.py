"""The token kernels of PIM: the passes that stream Z (and dY) through the GPU, as described in
``avpt_kernels.ops.pim`` (the 2-read / 3-read forward and the 3-launch backward). The per-image
matrices they read come from ``algebra``; the products go through ``dots``."""
import triton
import triton.language as tl

from .dots import _mm, _mm_split

@triton.jit
def _d_block(d0, D, BLOCK_D: tl.constexpr):
    """Indices d0 .. d0 + BLOCK_D - 1 of a D-wide axis, and which of them are < D."""
    dd = d0 + tl.arange(0, BLOCK_D)
    return dd, dd < D


@triton.jit
def _tile(ptr, rows, row_ok, dd, d_ok, D):
    """[BLOCK_T, BLOCK_D] tile X[rows, dd] of a row-major [T, D] matrix (Z, dY, K2), 0 outside."""
    return tl.load(ptr + rows[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok[None, :],
                   other=0.0)


@triton.jit
def _cols_tile(ptr, dd, d_ok, HKP: tl.constexpr):
    """[BLOCK_D, HKP] tile M[dd, :] of a [D, HKP] per-image matrix (Mq, Mk, Qexp), 0 for dd >= D."""
    cols = tl.arange(0, HKP)
    return tl.load(ptr + dd[:, None] * HKP + cols[None, :], mask=d_ok[:, None], other=0.0)


@triton.jit
def _cols_tile_t(ptr, dd, d_ok, D, HKP: tl.constexpr):
    """[BLOCK_D, HKP] tile N[:, dd]^T of a [HKP, D] per-image matrix (Nv, dG), 0 for dd >= D."""
    cols = tl.arange(0, HKP)
    return tl.load(ptr + cols[None, :] * D + dd[:, None], mask=d_ok[:, None], other=0.0)


@triton.jit
def _columns(K, H, HKP: tl.constexpr):
    """Column indices c = h*K + k, the head of each column, and which columns are real."""
    cols = tl.arange(0, HKP)
    return cols, cols // K, cols < H * K


@triton.jit
def _head_softmax(logits, head, col_ok, H, BLOCK_T: tl.constexpr, HKP: tl.constexpr):
    """Softmax over the K prompt columns of each head, per row; padded columns give 0.
    (A loop over heads with masks: the column axis is h*K + k for any K, no reshape needed.)"""
    x = tl.where(col_ok[None, :], logits, -1.0e30)
    m = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
    for h in range(H):
        sel = (head == h)[None, :]
        m = tl.where(sel, tl.max(tl.where(sel, x, -1.0e30), axis=1)[:, None], m)
    e = tl.where(col_ok[None, :], tl.exp(x - m), 0.0)
    return e / _head_sum(e, head, H, BLOCK_T, HKP)


@triton.jit
def _head_sum(x, head, H, BLOCK_T: tl.constexpr, HKP: tl.constexpr):
    """Sum over the prompt columns of each head, broadcast back to every column of the head
    (padded columns get 1, so that dividing by it is safe)."""
    s = tl.full((BLOCK_T, HKP), 1.0, dtype=tl.float32)
    for h in range(H):
        sel = (head == h)[None, :]
        s = tl.where(sel, tl.sum(tl.where(sel, x, 0.0), axis=1)[:, None], s)
    return s


@triton.jit
def _key_step(zt, wk_ptr, A, D, dd, d_ok, KEY_COLS: tl.constexpr, DOT_MODE: tl.constexpr):
    """One D block of the raw prompt->token keys K2 = Z W'k^T: zt [BLOCK_T,BLOCK_D] times columns
    dd of W'k [A,D] (fp32, the flat weights' view; columns >= A of the key tile are zero): a
    split dot, the fp32 weight as two 16-bit parts. Pass 1 and the backward kernels share it, so
    that the backward rebuilds the forward's K2 operation for operation."""
    kc = tl.arange(0, KEY_COLS)
    wk = tl.load(wk_ptr + kc[None, :] * D + dd[:, None], mask=d_ok[:, None] & (kc < A)[None, :],
                 other=0.0)
    return _mm_split(zt, wk, 1, DOT_MODE)


@triton.jit
def _t2p_reduce_kernel(z_ptr, mq_ptr, cq_ptr, wk_ptr, s1_ptr, g_ptr, colsum_ptr, k2_ptr,
                       T, D, K, H, A, chunk_blocks,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
                       KEY_COLS: tl.constexpr, DOT_MODE: tl.constexpr):
    """Token->prompt pass. Grid (B, n_chunks); a program owns chunk_blocks row blocks of one image.
    z [B,T,D], mq [B,D,HKP] fp32, cq [B,HKP] fp32 -> g [B,HKP,D] += S1^T Z, colsum [B,HKP] += sum_t S1.
    s1 [B,n_chunks*chunk_blocks*BLOCK_T,HKP] fp32 is scratch: the chunk's S1 is parked there
    (L2-resident) so that G is accumulated in registers per D block and added once per chunk,
    instead of once per row block.
    KEY_COLS > 0 (the 2-read forward): also k2 [B,T,KEY_COLS] fp32 = Z W'k^T, the raw
    prompt->token keys, from the Z tiles already on chip; wk = W'k [A,D] fp32.
    KEY_COLS = 0: wk and k2 are not touched."""
    b = tl.program_id(0).to(tl.int64)
    row0 = tl.program_id(1) * chunk_blocks * BLOCK_T
    cols, head, col_ok = _columns(K, H, HKP)
    z_img = z_ptr + b * T * D
    s1_img = s1_ptr + b * tl.num_programs(1) * chunk_blocks * BLOCK_T * HKP
    colsum = tl.zeros((HKP,), dtype=tl.float32)
    for blk in range(0, chunk_blocks):
        rows = row0 + blk * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        logits = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
        if KEY_COLS > 0:
            keys = tl.zeros((BLOCK_T, KEY_COLS), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd, d_ok = _d_block(d0, D, BLOCK_D)
            zt = _tile(z_img, rows, row_ok, dd, d_ok, D)
            mq = _cols_tile(mq_ptr + b * D * HKP, dd, d_ok, HKP)
            logits += _mm_split(zt, mq, 1, DOT_MODE)
            if KEY_COLS > 0:
                keys += _key_step(zt, wk_ptr, A, D, dd, d_ok, KEY_COLS, DOT_MODE)
        if KEY_COLS > 0:
            kc = tl.arange(0, KEY_COLS)
            tl.store(k2_ptr + b * T * KEY_COLS + rows[:, None] * KEY_COLS + kc[None, :], keys,
                     mask=row_ok[:, None])
        logits += tl.load(cq_ptr + b * HKP + cols)[None, :]
        s1 = tl.where(row_ok[:, None], _head_softmax(logits, head, col_ok, H, BLOCK_T, HKP), 0.0)
        colsum += tl.sum(s1, axis=0)
        tl.store(s1_img + rows[:, None] * HKP + cols[None, :], s1)
    tl.atomic_add(colsum_ptr + b * HKP + cols, colsum, sem="relaxed")
    tl.debug_barrier()  # the chunk's S1 rows, written by other threads, are read back below
    for d0 in range(0, D, BLOCK_D):
        dd, d_ok = _d_block(d0, D, BLOCK_D)
        acc = tl.zeros((HKP, BLOCK_D), dtype=tl.float32)
        for blk in range(0, chunk_blocks):
            rows = row0 + blk * BLOCK_T + tl.arange(0, BLOCK_T)
            row_ok = rows < T
            zt = _tile(z_img, rows, row_ok, dd, d_ok, D)
            s1 = tl.load(s1_img + rows[:, None] * HKP + cols[None, :])
            acc += _mm_split(tl.trans(s1), zt, 2, DOT_MODE)
        tl.atomic_add(g_ptr + b * HKP * D + cols[:, None] * D + dd[None, :], acc, mask=d_ok[None, :],
                      sem="relaxed")


@triton.jit
def _p2t_logits(x_img, m_img, rows, row_ok, W, HKP: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_D: tl.constexpr, FROM_KEYS: tl.constexpr, DOT_MODE: tl.constexpr):
    """[BLOCK_T, HKP] fp32 logits2 = X_rows M for X [T,W] and M [W,HKP] fp32 of one image:
    (Z, Mk) with W = D (split dots), or with FROM_KEYS (K2, Qexp), both fp32, W = KEY_COLS
    (IEEE fp32 dots)."""
    cols = tl.arange(0, HKP)
    acc = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
    for d0 in range(0, W, BLOCK_D):
        dd, d_ok = _d_block(d0, W, BLOCK_D)
        xt = _tile(x_img, rows, row_ok, dd, d_ok, W)
        m = _cols_tile(m_img, dd, d_ok, HKP)
        if FROM_KEYS:  # K2 Qexp, both fp32 and KEY_COLS deep: IEEE fp32 (mode 0)
            acc += _mm(xt, m, 0)
        else:
            acc += _mm_split(xt, m, 1, DOT_MODE)
    return acc


@triton.jit
def _key_logits(keys, qexp_img, HKP: tl.constexpr, KEY_COLS: tl.constexpr):
    """[BLOCK_T, HKP] fp32 logits2 = K2 Qexp from the raw keys K2 = Z W'k^T [BLOCK_T, KEY_COLS]
    (fp32 accumulator, bit for bit what pass 1 stored) and Qexp [KEY_COLS, HKP] fp32, so that the
    backward recomputes the very logits whose softmax statistics the forward took."""
    kc = tl.arange(0, KEY_COLS)
    qexp = tl.load(qexp_img + kc[:, None] * HKP + tl.arange(0, HKP)[None, :])
    return _mm(keys, qexp, 0)


@triton.jit
def _p2t_stats_kernel(x_ptr, m_ptr, mpart_ptr, lpart_ptr, T, W,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
                      FROM_KEYS: tl.constexpr, DOT_MODE: tl.constexpr):
    """Softmax-over-T statistics of logits2 = X M, per row block. Grid (B, NTB).
    m [B,W,HKP] fp32; x [B,T,W]: either Z with W = D (3-read forward) or, FROM_KEYS, K2 fp32 with
    W = KEY_COLS (2-read forward: K2 = Z W'k^T from pass 1, M = Qexp the block-diagonal scaled
    queries) -> mpart, lpart [B,NTB,HKP] (block max and sum of exp(logit - max))."""
    b = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, HKP)
    logits = _p2t_logits(x_ptr + b * T * W, m_ptr + b * W * HKP, rows, row_ok, W, HKP,
                         BLOCK_T, BLOCK_D, FROM_KEYS, DOT_MODE)
    logits = tl.where(row_ok[:, None], logits, float("-inf"))
    m = tl.max(logits, axis=0)  # every block holds at least one valid row: finite
    l = tl.sum(tl.exp(logits - m[None, :]), axis=0)
    out = (b * tl.num_programs(1) + tb) * HKP + cols
    tl.store(mpart_ptr + out, m)
    tl.store(lpart_ptr + out, l)


@triton.jit
def _p2t_probs(logits, m2_ptr, l2_ptr, b, row_ok, HKP: tl.constexpr):
    cols = tl.arange(0, HKP)
    m = tl.load(m2_ptr + b * HKP + cols)
    inv_l = 1.0 / tl.load(l2_ptr + b * HKP + cols)
    s2 = tl.exp(logits - m[None, :]) * inv_l[None, :]
    return tl.where(row_ok[:, None], s2, 0.0)


@triton.jit
def _combine_stats(mpart_ptr, lpart_ptr, b, NTB, HKP: tl.constexpr):
    """Softmax-over-T max and sum of one image from the stats pass's per-block partials
    [B,NTB,HKP]: every update program combines them in the same order, so all agree bit for bit."""
    cols = tl.arange(0, HKP)
    part = b * NTB * HKP + cols
    m = tl.full((HKP,), float("-inf"), dtype=tl.float32)
    for tb in range(0, NTB):
        m = tl.maximum(m, tl.load(mpart_ptr + part + tb * HKP))
    l = tl.zeros((HKP,), dtype=tl.float32)
    for tb in range(0, NTB):
        l += tl.load(lpart_ptr + part + tb * HKP) * tl.exp(tl.load(mpart_ptr + part + tb * HKP) - m)
    return m, l


@triton.jit
def _p2t_update_kernel(z_ptr, x_ptr, m_ptr, mpart_ptr, lpart_ptr, m2_ptr, l2_ptr, nv_ptr, bo_ptr,
                       alpha_ptr, out_ptr, attn_ptr, T, D, W, HK, return_attn,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
                       FROM_KEYS: tl.constexpr, DOT_MODE: tl.constexpr):
    """Prompt->token update and gated residual. Grid (B, cdiv(T, BLOCK_T)).
    z_out = Z + alpha * (S2^T Nv + b'o); nv [B,HKP,D] fp32, bo [D] (fp32, a view of the flat
    weights), alpha [B] fp32; attn [B,H,K,T] = [B,HK,T] fp32 written when return_attn != 0.
    The softmax statistics come from the stats pass's partials mpart, lpart [B,NTB,HKP]; the first
    row block's program also writes them, m2 and l2 [B,HKP], for the backward. logits2 = X M as
    in the stats pass (FROM_KEYS: X = K2, the 2-read forward, Z itself is then read only for the
    residual)."""
    b = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, HKP)
    z_img = z_ptr + b * T * D
    m2, l2 = _combine_stats(mpart_ptr, lpart_ptr, b, tl.num_programs(1), HKP)
    if tb == 0:
        tl.store(m2_ptr + b * HKP + cols, m2)
        tl.store(l2_ptr + b * HKP + cols, l2)
    logits = _p2t_logits(x_ptr + b * T * W, m_ptr + b * W * HKP, rows, row_ok, W, HKP, BLOCK_T,
                         BLOCK_D, FROM_KEYS, DOT_MODE)
    s2 = tl.where(row_ok[:, None], tl.exp(logits - m2[None, :]) * (1.0 / l2)[None, :], 0.0)
    if return_attn:
        dst = attn_ptr + b * HK * T + cols[None, :] * T + rows[:, None]
        tl.store(dst, s2, mask=row_ok[:, None] & (cols < HK)[None, :])
    alpha = tl.load(alpha_ptr + b)
    for d0 in range(0, D, BLOCK_D):
        dd, d_ok = _d_block(d0, D, BLOCK_D)
        nv = tl.load(nv_ptr + b * HKP * D + cols[:, None] * D + dd[None, :], mask=d_ok[None, :], other=0.0)
        upd = _mm_split(s2, nv, 0, DOT_MODE) + tl.load(bo_ptr + dd, mask=d_ok, other=0.0)[None, :]
        ptrs = rows[:, None] * D + dd[None, :]
        mask = row_ok[:, None] & d_ok[None, :]
        zt = tl.load(z_img + ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * T * D + ptrs, (zt + alpha * upd).to(out_ptr.dtype.element_ty), mask=mask)


# The two backward kernels below keep their tile loads inline, sharing one offset and mask
# between the Z and dY tiles (and one [BLOCK_D, HKP] offset between Mq/Mk and Nv/dG): loaded
# through the helpers above they spill 12-28 bytes under Triton 3.6 (AOT, sm_80/sm_90a), where
# they already sit at the 255-register cap.
@triton.jit
def _p2t_grad_reduce_kernel(z_ptr, y_ptr, mk_ptr, wk_ptr, qexp_ptr, nv_ptr, m2_ptr, l2_ptr, s2_ptr,
                            ws2_ptr, e_ptr, f1_ptr, f2_ptr, g1_ptr, ysum_ptr, delta_ptr, T, D, A,
                            chunk_blocks, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                            HKP: tl.constexpr, KEY_COLS: tl.constexpr, DOT_MODE: tl.constexpr):
    """Backward reductions of the prompt->token side. Grid (B, n_chunks), chunks as in
    _t2p_reduce_kernel; s2, ws2 [B,n_chunks*chunk_blocks*BLOCK_T,HKP] fp32 are scratch.
    y = dL/dz_out [B,T,D]; with yn[t,c] = y_t . Nv[c] (nv [B,HKP,D] fp32) the prompt->token
    keys need dMk = alpha sum_t S2 (yn - delta) Z_t, delta = sum_t S2*yn over the whole image.
    Written as F1 - delta F2, two sums that cancel to many digits when the attention sits on one
    high-norm token, it loses everything in 16-bit products. So each chunk centres yn on its own
    S2-weighted mean delta_c (known once the chunk's rows are in), and the correction to the global
    delta is exact algebra on fp32 sums:
      f1 += (S2*(yn - delta_c))^T Z,  f2 += S2^T Z,  g1 += delta_c * (chunk's S2^T Z)
      => dMk = alpha (f1 + g1 - delta f2);  e += S2^T y;  ysum += sum_t y;
      delta += sum_t S2*yn ([B,HKP]: the softmax-backward row sum, from the very yn values the
      dZ kernel recomputes, so that yn - delta cancels exactly for a one-hot softmax).
    All products with S2, yn or Nv are split dots (``_mm_split``), so nothing is rounded to 16 bits.
    logits2 = Z Mk, or with KEY_COLS > 0 (the forward took its softmax statistics from K2 Qexp)
    K2 Qexp from K2 = Z W'k^T recomputed here (wk = W'k [A,D], qexp [B,KEY_COLS,HKP]); mk unused."""
    b = tl.program_id(0).to(tl.int64)
    row0 = tl.program_id(1) * chunk_blocks * BLOCK_T
    cols = tl.arange(0, HKP)
    z_img = z_ptr + b * T * D
    y_img = y_ptr + b * T * D
    nv_img = nv_ptr + b * HKP * D
    scratch = b * tl.num_programs(1) * chunk_blocks * BLOCK_T * HKP
    delta = tl.zeros((HKP,), dtype=tl.float32)
    mass = tl.zeros((HKP,), dtype=tl.float32)
    for blk in range(0, chunk_blocks):
        rows = row0 + blk * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        if KEY_COLS > 0:
            keys = tl.zeros((BLOCK_T, KEY_COLS), dtype=tl.float32)
        else:
            logits = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
        yn = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            tile = rows[:, None] * D + dd[None, :]
            mask = row_ok[:, None] & d_ok[None, :]
            zt = tl.load(z_img + tile, mask=mask, other=0.0)
            yt = tl.load(y_img + tile, mask=mask, other=0.0)
            if KEY_COLS > 0:
                keys += _key_step(zt, wk_ptr, A, D, dd, d_ok, KEY_COLS, DOT_MODE)
            else:
                mk = tl.load(mk_ptr + b * D * HKP + dd[:, None] * HKP + cols[None, :], mask=d_ok[:, None], other=0.0)
                logits += _mm_split(zt, mk, 1, DOT_MODE)
            nvt = tl.load(nv_img + cols[None, :] * D + dd[:, None], mask=d_ok[:, None], other=0.0)
            yn += _mm_split(yt, nvt, 1, DOT_MODE)
        if KEY_COLS > 0:
            logits = _key_logits(keys, qexp_ptr + b * KEY_COLS * HKP, HKP, KEY_COLS)
        s2 = _p2t_probs(logits, m2_ptr, l2_ptr, b, row_ok, HKP)
        ws2 = s2 * yn
        delta += tl.sum(ws2, axis=0)
        mass += tl.sum(s2, axis=0)
        tl.store(s2_ptr + scratch + rows[:, None] * HKP + cols[None, :], s2)
        tl.store(ws2_ptr + scratch + rows[:, None] * HKP + cols[None, :], ws2)
    tl.atomic_add(delta_ptr + b * HKP + cols, delta, sem="relaxed")
    delta_c = tl.where(mass > 0.0, delta / tl.where(mass > 0.0, mass, 1.0), 0.0)
    tl.debug_barrier()  # the chunk's S2 rows, written by other threads, are read back below
    out = b * HKP * D + cols[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        acc_e = tl.zeros((HKP, BLOCK_D), dtype=tl.float32)
        acc_f1 = tl.zeros((HKP, BLOCK_D), dtype=tl.float32)
        acc_f2 = tl.zeros((HKP, BLOCK_D), dtype=tl.float32)
        ysum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for blk in range(0, chunk_blocks):
            rows = row0 + blk * BLOCK_T + tl.arange(0, BLOCK_T)
            row_ok = rows < T
            tile = rows[:, None] * D + dd[None, :]
            mask = row_ok[:, None] & d_ok[None, :]
            zt = tl.load(z_img + tile, mask=mask, other=0.0)
            yt = tl.load(y_img + tile, mask=mask, other=0.0)
            s2 = tl.load(s2_ptr + scratch + rows[:, None] * HKP + cols[None, :])
            ws2 = tl.load(ws2_ptr + scratch + rows[:, None] * HKP + cols[None, :])
            s2t = tl.trans(s2)
            acc_e += _mm_split(s2t, yt, 2, DOT_MODE)
            acc_f1 += _mm_split(tl.trans(ws2 - s2 * delta_c[None, :]), zt, 2, DOT_MODE)
            acc_f2 += _mm_split(s2t, zt, 2, DOT_MODE)
            ysum += tl.sum(yt.to(tl.float32), axis=0)
        dst = out + dd[None, :]
        tl.atomic_add(e_ptr + dst, acc_e, mask=d_ok[None, :], sem="relaxed")
        tl.atomic_add(f1_ptr + dst, acc_f1, mask=d_ok[None, :], sem="relaxed")
        tl.atomic_add(f2_ptr + dst, acc_f2, mask=d_ok[None, :], sem="relaxed")
        tl.atomic_add(g1_ptr + dst, acc_f2 * delta_c[:, None], mask=d_ok[None, :], sem="relaxed")
        tl.atomic_add(ysum_ptr + b * D + dd, ysum, mask=d_ok, sem="relaxed")


@triton.jit
def _grad_z_kernel(z_ptr, y_ptr, mq_ptr, cq_ptr, mk_ptr, wk_ptr, qexp_ptr, nv_ptr, m2_ptr, l2_ptr,
                   alpha_ptr, delta_ptr, dg_ptr, dcolsum_ptr, dz0_ptr, dz_ptr, dl1_ptr, dcq_ptr, T, D,
                   K, H, A, t_pad, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
                   KEY_COLS: tl.constexpr, DOT_MODE: tl.constexpr):
    """dZ through both attentions, and the token-side reductions of the token->prompt backward.
    Grid (B, cdiv(T, BLOCK_T)): one row block per program (the register-heaviest kernel).
    With dG [B,HKP,D], dcolsum [B,HKP] (gradients of G, colsum), delta [B,HKP] = sum_t S2*yn,
    alpha [B] (mq, mk, nv, dg fp32):
      dS1 = Z dG^T + dcolsum; dl1 = S1 * (dS1 - headsum(S1*dS1))
      dl2 = alpha * S2^T * (y Nv^T - delta)
      dz = y + dl2 Mk^T + S1 dG + dl1 Mq^T (+ dz0 [B,D] fp32 on the class token, which the gate
      reads: added before the one rounding to the output dtype);
      dcq [B,HKP] += sum_t dl1;  dl1 -> [B,t_pad,HKP] fp32
    (dMq = Z^T dl1 is reduced by _t2p_grad_reduce_kernel, chunked, instead of one atomic add of
    a [D, HKP] partial per row block here). logits2 as in _p2t_grad_reduce_kernel (KEY_COLS);
    mk [B,D,HKP] on both paths (dl2 Mk^T).
    Every product with an fp32 intermediate is a split dot (``_mm_split``)."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols, head, col_ok = _columns(K, H, HKP)
    z_img = z_ptr + b * T * D
    y_img = y_ptr + b * T * D
    mq_img = mq_ptr + b * D * HKP
    mk_img = mk_ptr + b * D * HKP
    nv_img = nv_ptr + b * HKP * D
    dg_img = dg_ptr + b * HKP * D
    logits1 = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
    if KEY_COLS > 0:
        keys = tl.zeros((BLOCK_T, KEY_COLS), dtype=tl.float32)
    else:
        logits2 = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
    yn = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
    ds1 = tl.zeros((BLOCK_T, HKP), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        tile = rows[:, None] * D + dd[None, :]
        mask = row_ok[:, None] & d_ok[None, :]
        zt = tl.load(z_img + tile, mask=mask, other=0.0)
        yt = tl.load(y_img + tile, mask=mask, other=0.0)
        small = dd[:, None] * HKP + cols[None, :]  # [BLOCK_D, HKP] of a [D, HKP] matrix
        small_t = cols[None, :] * D + dd[:, None]  # [BLOCK_D, HKP] of a [HKP, D] matrix
        logits1 += _mm_split(zt, tl.load(mq_img + small, mask=d_ok[:, None], other=0.0), 1, DOT_MODE)
        if KEY_COLS > 0:
            keys += _key_step(zt, wk_ptr, A, D, dd, d_ok, KEY_COLS, DOT_MODE)
        else:
            logits2 += _mm_split(zt, tl.load(mk_img + small, mask=d_ok[:, None], other=0.0), 1, DOT_MODE)
        yn += _mm_split(yt, tl.load(nv_img + small_t, mask=d_ok[:, None], other=0.0), 1, DOT_MODE)
        ds1 += _mm_split(zt, tl.load(dg_img + small_t, mask=d_ok[:, None], other=0.0), 1, DOT_MODE)
    if KEY_COLS > 0:
        logits2 = _key_logits(keys, qexp_ptr + b * KEY_COLS * HKP, HKP, KEY_COLS)
    logits1 += tl.load(cq_ptr + b * HKP + cols)[None, :]
    s1 = tl.where(row_ok[:, None], _head_softmax(logits1, head, col_ok, H, BLOCK_T, HKP), 0.0)
    ds1 += tl.load(dcolsum_ptr + b * HKP + cols)[None, :]
    dl1 = s1 * (ds1 - _head_sum(s1 * ds1, head, H, BLOCK_T, HKP))
    alpha = tl.load(alpha_ptr + b)
    delta = tl.load(delta_ptr + b * HKP + cols)
    s2 = _p2t_probs(logits2, m2_ptr, l2_ptr, b, row_ok, HKP)
    dl2 = alpha * s2 * (yn - delta[None, :])
    tl.atomic_add(dcq_ptr + b * HKP + cols, tl.sum(dl1, axis=0), sem="relaxed")
    tl.store(dl1_ptr + b * t_pad * HKP + rows[:, None] * HKP + cols[None, :], dl1)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        tile = rows[:, None] * D + dd[None, :]
        mask = row_ok[:, None] & d_ok[None, :]
        yt = tl.load(y_img + tile, mask=mask, other=0.0).to(tl.float32)
        small_t = dd[None, :] * HKP + cols[:, None]  # [HKP, BLOCK_D] of a [D, HKP] matrix
        big = cols[:, None] * D + dd[None, :]  # [HKP, BLOCK_D] of a [HKP, D] matrix
        dz = yt + _mm_split(dl2, tl.load(mk_img + small_t, mask=d_ok[None, :], other=0.0), 0, DOT_MODE)
        dz += _mm_split(s1, tl.load(dg_img + big, mask=d_ok[None, :], other=0.0), 0, DOT_MODE)
        dz += _mm_split(dl1, tl.load(mq_img + small_t, mask=d_ok[None, :], other=0.0), 0, DOT_MODE)
        dz0 = tl.load(dz0_ptr + b * D + dd, mask=d_ok, other=0.0)
        dz += tl.where(rows[:, None] == 0, dz0[None, :], 0.0)
        tl.store(dz_ptr + b * T * D + tile, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _t2p_grad_reduce_kernel(z_ptr, dl1_ptr, dmq_ptr, T, D, t_pad, chunk_blocks,
                            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HKP: tl.constexpr,
                            DOT_MODE: tl.constexpr):
    """dMq [B,D,HKP] += Z^T dl1. Grid (B, n_chunks), chunks as in _t2p_reduce_kernel; dl1 from
    _grad_z_kernel [B,t_pad,HKP] fp32 (rows >= T are ignored)."""
    b = tl.program_id(0).to(tl.int64)
    row0 = tl.program_id(1) * chunk_blocks * BLOCK_T
    cols = tl.arange(0, HKP)
    z_img = z_ptr + b * T * D
    dl1_img = dl1_ptr + b * t_pad * HKP
    for d0 in range(0, D, BLOCK_D):
        dd, d_ok = _d_block(d0, D, BLOCK_D)
        acc = tl.zeros((BLOCK_D, HKP), dtype=tl.float32)
        for blk in range(0, chunk_blocks):
            rows = row0 + blk * BLOCK_T + tl.arange(0, BLOCK_T)
            row_ok = rows < T
            zt = _tile(z_img, rows, row_ok, dd, d_ok, D)
            dl1 = tl.load(dl1_img + rows[:, None] * HKP + cols[None, :], mask=row_ok[:, None], other=0.0)
            acc += _mm_split(tl.trans(zt), dl1, 1, DOT_MODE)
        tl.atomic_add(dmq_ptr + b * D * HKP + dd[:, None] * HKP + cols[None, :], acc,
                      mask=d_ok[:, None], sem="relaxed")

