"""The prompt bank's Triton kernels (Eq. 4): the forward, the two backward passes, and their tile
helpers. The algorithm, grids and costs: ``ops.prompt_bank.op``'s docstring."""
import triton
import triton.language as tl


# ---- Triton kernels ---------------------------------------------------------------------------
@triton.jit
def _token_embedding(emb_ptr, off_ptr, rows, mask_rows, K, M, R, D, offs_d, mask_d):
    """e[row, d] = E[b, k // M, d] + off[k, d] in fp32, [BLOCK_T, BLOCK_D] (zero outside)."""
    b = rows // K
    k = rows % K
    mask = mask_rows[:, None] & mask_d[None, :]
    e = tl.load(emb_ptr + (b * R + k // M)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    o = tl.load(off_ptr + k[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    return e.to(tl.float32) + o.to(tl.float32)


@triton.jit
def _layer_preact(low, v_ptr, bias_ptr, stage, layer, RANK, D, offs_q, mask_q, offs_d, mask_d):
    """x = low @ V[stage][:, d-chunk] + bias[layer, d-chunk], fp32 [BLOCK_T, BLOCK_D]."""
    v = tl.load(v_ptr + (stage * RANK + offs_q)[:, None] * D + offs_d[None, :],
                mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + layer * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return tl.dot(low, v, input_precision="ieee") + bias[None, :]


@triton.jit
def _ln_grad_inputs(low, v_ptr, bias_ptr, dout_ptr, stage, layer, rows, mask_rows, mean, rstd, BK,
                    RANK, D, offs_q, mask_q, offs_d, mask_d):
    """What the LayerNorm backward reads for one [BLOCK_T, BLOCK_D] chunk of layer l, fp32:
    xhat = (x - mean) * rstd with x rebuilt from the fp32 ``low`` (never from the prompts
    rounded to the input dtype), and dy = dL/dP from dout [L,BK,D]."""
    x = _layer_preact(low, v_ptr, bias_ptr, stage, layer, RANK, D, offs_q, mask_q, offs_d, mask_d)
    xhat = (x - mean[:, None]) * rstd[:, None]
    dy = tl.load(dout_ptr + (layer * BK + rows).to(tl.int64)[:, None] * D + offs_d[None, :],
                 mask=mask_rows[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    return xhat, dy


@triton.jit
def _prompt_bank_fwd_kernel(
        emb_ptr, off_ptr, u_ptr, v_ptr, bias_ptr, lnw_ptr, lnb_ptr, stage_ptr,
        out_ptr, low_ptr, mean_ptr, rstd_ptr,
        BK, K, M, R, D, RANK, eps,
        BLOCK_T: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Prompts of layer l for BLOCK_T rows. out [L,BK,D]; low [L,BK,RANK]; mean, rstd [L,BK]."""
    layer = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_rows = rows < BK
    stage = tl.load(stage_ptr + layer)
    offs_q = tl.arange(0, BLOCK_RANK)
    mask_q = offs_q < RANK

    low = tl.zeros((BLOCK_T, BLOCK_RANK), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        e = _token_embedding(emb_ptr, off_ptr, rows, mask_rows, K, M, R, D, offs_d, mask_d)
        u = tl.load(u_ptr + (stage * D + offs_d)[:, None] * RANK + offs_q[None, :],
                    mask=mask_d[:, None] & mask_q[None, :], other=0.0).to(tl.float32)
        low += tl.dot(e, u, input_precision="ieee")

    # Two-pass mean / variance (as the reference), recomputing x per chunk from low.
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = _layer_preact(low, v_ptr, bias_ptr, stage, layer, RANK, D, offs_q, mask_q, offs_d,
                          mask_d)
        total += tl.sum(tl.where(mask_d[None, :], x, 0.0), axis=1)
    mean = total / D
    sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = _layer_preact(low, v_ptr, bias_ptr, stage, layer, RANK, D, offs_q, mask_q, offs_d,
                          mask_d)
        xc = tl.where(mask_d[None, :], x - mean[:, None], 0.0)
        sq += tl.sum(xc * xc, axis=1)
    rstd = 1.0 / tl.sqrt(sq / D + eps)

    out_rows = out_ptr + (layer * BK + rows).to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = _layer_preact(low, v_ptr, bias_ptr, stage, layer, RANK, D, offs_q, mask_q, offs_d,
                          mask_d)
        w = tl.load(lnw_ptr + layer * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        b = tl.load(lnb_ptr + layer * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(out_rows + offs_d[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=mask_rows[:, None] & mask_d[None, :])

    stat = layer * BK + rows
    tl.store(low_ptr + stat[:, None] * RANK + offs_q[None, :], low,
             mask=mask_rows[:, None] & mask_q[None, :])
    tl.store(mean_ptr + stat, mean, mask=mask_rows)
    tl.store(rstd_ptr + stat, rstd, mask=mask_rows)


# The row kernels open alike (layer, row tile, stage, rank offsets, the saved low / mean / rstd
# rows) and end alike (masked row stores): kept inline, as each kernel reads in one screen and a
# helper returning six tensors would say less than the lines it replaces.
@triton.jit
def _prompt_bank_bwd_rows_kernel(
        dout_ptr, v_ptr, bias_ptr, lnw_ptr, stage_ptr, low_ptr, mean_ptr, rstd_ptr,
        dlow_ptr, colsum_ptr, dv_part_ptr,
        BK, D, RANK,
        BLOCK_T: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Everything one tile of BLOCK_T rows of layer l contributes to the backward.

    Pass 1 over D: the LayerNorm row terms c1 = mean(dxhat), c2 = mean(dxhat * xhat) (registers
    only). Pass 2 over D: dx = rstd * (dxhat - c1 - xhat * c2) with dxhat = dout * ln_weight,
    then dlow = dx @ V^T (fp32 [L,BK,RANK]) and the tile's column partials, per D chunk:
    colsum [L, tiles, 3, D] = (sum_rows dout, sum_rows dout * xhat, sum_rows dx) (d ln_bias,
    d ln_weight, d layer_bias) and dv_part [L, tiles, RANK, D] = low^T dx (dV of layer l), both
    fp32, summed over the tiles in a fixed order by ``_prompt_bank_bwd_inputs_kernel``.
    dout [L,BK,D] contiguous.
    """
    layer = tl.program_id(0)
    tile = tl.program_id(1)
    rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_rows = rows < BK
    stage = tl.load(stage_ptr + layer)
    offs_q = tl.arange(0, BLOCK_RANK)
    mask_q = offs_q < RANK
    stat = layer * BK + rows
    low = tl.load(low_ptr + stat[:, None] * RANK + offs_q[None, :],
                  mask=mask_rows[:, None] & mask_q[None, :], other=0.0)
    mean = tl.load(mean_ptr + stat, mask=mask_rows, other=0.0)
    rstd = tl.load(rstd_ptr + stat, mask=mask_rows, other=0.0)

    c1 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    c2 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        xhat, dy = _ln_grad_inputs(low, v_ptr, bias_ptr, dout_ptr, stage, layer, rows, mask_rows,
                                   mean, rstd, BK, RANK, D, offs_q, mask_q, offs_d, mask_d)
        w = tl.load(lnw_ptr + layer * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        dxhat = dy * w[None, :]
        c1 += tl.sum(dxhat, axis=1)
        c2 += tl.sum(dxhat * xhat, axis=1)
    c1 = c1 / D
    c2 = c2 / D

    part = (layer * tl.num_programs(1) + tile).to(tl.int64)
    colsum_row = colsum_ptr + part * 3 * D
    dv_rows = dv_part_ptr + (part * RANK + offs_q)[:, None] * D
    dlow = tl.zeros((BLOCK_T, BLOCK_RANK), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        xhat, dy = _ln_grad_inputs(low, v_ptr, bias_ptr, dout_ptr, stage, layer, rows, mask_rows,
                                   mean, rstd, BK, RANK, D, offs_q, mask_q, offs_d, mask_d)
        w = tl.load(lnw_ptr + layer * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        dx = rstd[:, None] * (dy * w[None, :] - c1[:, None] - xhat * c2[:, None])
        # Padded rows have dy = 0, low = 0 and rstd = 0 (so xhat = 0, dx = 0): no column terms.
        dx = tl.where(mask_rows[:, None] & mask_d[None, :], dx, 0.0)
        v = tl.load(v_ptr + (stage * RANK + offs_q)[:, None] * D + offs_d[None, :],
                    mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        dlow += tl.dot(dx, tl.trans(v), input_precision="ieee")
        tl.store(colsum_row + offs_d, tl.sum(dy, axis=0), mask=mask_d)
        tl.store(colsum_row + D + offs_d, tl.sum(dy * xhat, axis=0), mask=mask_d)
        tl.store(colsum_row + 2 * D + offs_d, tl.sum(dx, axis=0), mask=mask_d)
        tl.store(dv_rows + offs_d[None, :], tl.dot(tl.trans(low), dx, input_precision="ieee"),
                 mask=mask_q[:, None] & mask_d[None, :])

    tl.store(dlow_ptr + stat[:, None] * RANK + offs_q[None, :], dlow,
             mask=mask_rows[:, None] & mask_q[None, :])


@triton.jit
def _dlow_times_ut(dlow_ptr, u_ptr, stage_ptr, first_row, mask_idx, n_inner, inner_stride, BK,
                   D, RANK, L, offs_q, mask_q, offs_d, mask_d, BLOCK_T: tl.constexpr,
                   BLOCK_INNER: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_l (sum_{i < n_inner} dlow[l, first_row + i * inner_stride]) @ U[s(l)][d-chunk]^T,
    fp32 [BLOCK_T, BLOCK_D]. The rank-r sums come first (BLOCK_INNER rows per load, reduced in
    registers), so each layer costs a few loads and one small dot."""
    offs_i = tl.arange(0, BLOCK_INNER)
    grad = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for layer in range(L):
        stage = tl.load(stage_ptr + layer)
        summed = tl.zeros((BLOCK_T, BLOCK_RANK), dtype=tl.float32)
        for i0 in range(0, n_inner, BLOCK_INNER):
            inner = i0 + offs_i
            rows = first_row[:, None] + inner[None, :] * inner_stride  # [BLOCK_T, BLOCK_INNER]
            mask = (mask_idx[:, None] & (inner < n_inner)[None, :])[:, :, None] \
                & mask_q[None, None, :]
            block = tl.load(dlow_ptr + (layer * BK + rows)[:, :, None] * RANK
                            + offs_q[None, None, :], mask=mask, other=0.0)
            summed += tl.sum(block, axis=1)
        u_t = tl.load(u_ptr + (stage * D + offs_d)[None, :] * RANK + offs_q[:, None],
                      mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        grad += tl.dot(summed, u_t, input_precision="ieee")
    return grad


@triton.jit
def _prompt_bank_bwd_inputs_kernel(
        emb_ptr, off_ptr, u_ptr, stage_ptr, dlow_ptr, colsum_ptr, dv_part_ptr,
        demb_ptr, doff_ptr, du_ptr, dv_ptr, dlnw_ptr, dlnb_ptr, dbias_ptr,
        B, K, M, R, D, RANK, L, S, n_group_tiles, n_token_tiles, n_row_tiles,
        BLOCK_T: tl.constexpr, BLOCK_INNER: tl.constexpr, BLOCK_ROWS: tl.constexpr,
        BLOCK_TILES: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One D chunk (axis 0) of the input-side and per-layer gradients; axis 1 picks the job:

    [0, n_group_tiles): d region_emb of BLOCK_T (b, region) groups,
        dE[b, j] = sum_l (sum_{k in region j} dlow[l, b*K + k]) @ U[s(l)]^T;
    [.., + n_token_tiles): d token_offset of BLOCK_T tokens,
        doff[k] = sum_l (sum_b dlow[l, b*K + k]) @ U[s(l)]^T;
    [.., + S): the factors of stage s, dU[s] = sum_{l in s} e^T dlow[l] (BLOCK_ROWS rows per
        step) and dV[s] = sum_{l in s} sum_tiles dv_part[l, tile] (BLOCK_TILES tiles per load);
    [.., + L): layer l's d ln_bias, d ln_weight, d layer_bias = sum_tiles colsum[l, tile].
    The row-tile partials (of ``_prompt_bank_bwd_rows_kernel``, n_row_tiles per layer) are summed
    in one fixed order: deterministic, no atomics.
    """
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    job = tl.program_id(1)
    offs_q = tl.arange(0, BLOCK_RANK)
    mask_q = offs_q < RANK
    BK = B * K
    idx = tl.arange(0, BLOCK_T)
    if job < n_group_tiles:
        groups = job * BLOCK_T + idx  # group = b * R + j: rows b*K + j*M + i, i < M
        mask_g = groups < B * R
        grad = _dlow_times_ut(dlow_ptr, u_ptr, stage_ptr, (groups // R) * K + (groups % R) * M,
                              mask_g, M, 1, BK, D, RANK, L, offs_q, mask_q, offs_d, mask_d,
                              BLOCK_T, BLOCK_INNER, BLOCK_RANK, BLOCK_D)
        tl.store(demb_ptr + groups[:, None] * D + offs_d[None, :],
                 grad.to(demb_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    elif job < n_group_tiles + n_token_tiles:
        tokens = (job - n_group_tiles) * BLOCK_T + idx  # rows b*K + k, b < B
        mask_k = tokens < K
        grad = _dlow_times_ut(dlow_ptr, u_ptr, stage_ptr, tokens, mask_k, B, K, BK, D, RANK, L,
                              offs_q, mask_q, offs_d, mask_d, BLOCK_T, BLOCK_INNER, BLOCK_RANK,
                              BLOCK_D)
        tl.store(doff_ptr + tokens[:, None] * D + offs_d[None, :],
                 grad.to(doff_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_d[None, :])
    elif job < n_group_tiles + n_token_tiles + S:
        stage = job - n_group_tiles - n_token_tiles
        offs_tile = tl.arange(0, BLOCK_TILES)
        dv = tl.zeros((BLOCK_RANK, BLOCK_D), dtype=tl.float32)
        for layer in range(L):
            if tl.load(stage_ptr + layer) == stage:
                for t0 in range(0, n_row_tiles, BLOCK_TILES):
                    tiles = t0 + offs_tile
                    part = (layer * n_row_tiles + tiles).to(tl.int64)  # [BLOCK_TILES]
                    block = tl.load(dv_part_ptr + ((part * RANK)[:, None, None]
                                                   + offs_q[None, :, None]) * D
                                    + offs_d[None, None, :],
                                    mask=(tiles < n_row_tiles)[:, None, None]
                                    & mask_q[None, :, None] & mask_d[None, None, :], other=0.0)
                    dv += tl.sum(block, axis=0)
        tl.store(dv_ptr + (stage * RANK + offs_q)[:, None] * D + offs_d[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_d[None, :])
        du = tl.zeros((BLOCK_D, BLOCK_RANK), dtype=tl.float32)
        for layer in range(L):
            if tl.load(stage_ptr + layer) == stage:
                for t0 in range(0, BK, BLOCK_ROWS):
                    rows = t0 + tl.arange(0, BLOCK_ROWS)
                    mask_rows = rows < BK
                    dlow = tl.load(dlow_ptr + (layer * BK + rows)[:, None] * RANK
                                   + offs_q[None, :], mask=mask_rows[:, None] & mask_q[None, :],
                                   other=0.0)
                    e = _token_embedding(emb_ptr, off_ptr, rows, mask_rows, K, M, R, D, offs_d,
                                         mask_d)
                    du += tl.dot(tl.trans(e), dlow, input_precision="ieee")
        tl.store(du_ptr + (stage * D + offs_d)[:, None] * RANK + offs_q[None, :],
                 du.to(du_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_q[None, :])
    else:
        layer = job - n_group_tiles - n_token_tiles - S
        offs_tile = tl.arange(0, BLOCK_TILES)
        sums = tl.zeros((4, BLOCK_D), dtype=tl.float32)  # rows: d ln_bias, d ln_weight, d bias
        offs_j = tl.arange(0, 4)
        for t0 in range(0, n_row_tiles, BLOCK_TILES):
            tiles = t0 + offs_tile
            part = (layer * n_row_tiles + tiles).to(tl.int64)
            block = tl.load(colsum_ptr + ((part * 3)[:, None, None] + offs_j[None, :, None]) * D
                            + offs_d[None, None, :],
                            mask=(tiles < n_row_tiles)[:, None, None] & (offs_j < 3)[None, :, None]
                            & mask_d[None, None, :], other=0.0)
            sums += tl.sum(block, axis=0)
        dlnb = tl.sum(tl.where(offs_j[:, None] == 0, sums, 0.0), axis=0)
        dlnw = tl.sum(tl.where(offs_j[:, None] == 1, sums, 0.0), axis=0)
        dbias = tl.sum(tl.where(offs_j[:, None] == 2, sums, 0.0), axis=0)
        tl.store(dlnb_ptr + layer * D + offs_d, dlnb.to(dlnb_ptr.dtype.element_ty), mask=mask_d)
        tl.store(dlnw_ptr + layer * D + offs_d, dlnw.to(dlnw_ptr.dtype.element_ty), mask=mask_d)
        tl.store(dbias_ptr + layer * D + offs_d, dbias.to(dbias_ptr.dtype.element_ty),
                 mask=mask_d)
