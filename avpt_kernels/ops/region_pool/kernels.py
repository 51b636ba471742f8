"""Soft region pooling's Triton kernels (Eq. 2): the forward and the backward, with their tile
helpers. The algorithm, grids and costs: ``ops.region_pool.op``'s docstring."""
import triton
import triton.language as tl


# ---- Triton kernels ---------------------------------------------------------------------------
@triton.jit
def _area_weights_tile(maps_ptr, pid_b, offs_p, mask_p, offs_r, R,
                       stride_mb, stride_m1, stride_m2, stride_m3, grid_w, factor,
                       PIXEL_MAPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_PIX: tl.constexpr):
    """Area weights A[p, r] of BLOCK_P patches, fp32 [BLOCK_P, BLOCK_R] (zero outside).

    Token maps [B,N,R]: strides (b, p, r, -). Pixel maps [B,R,H,W]: strides (b, r, y, x); patch p
    is the factor x factor box at (p // grid_w, p % grid_w) and A is its mean.
    """
    base = maps_ptr + pid_b.to(tl.int64) * stride_mb
    if PIXEL_MAPS:
        area = factor * factor
        top = (offs_p // grid_w) * factor
        left = (offs_p % grid_w) * factor
        a = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
        for r in range(R):
            box_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
            for i0 in range(0, area, BLOCK_PIX):
                offs_i = i0 + tl.arange(0, BLOCK_PIX)
                y = top[:, None] + (offs_i // factor)[None, :]
                x = left[:, None] + (offs_i % factor)[None, :]
                pix = tl.load(base + r * stride_m1 + y * stride_m2 + x * stride_m3,
                              mask=mask_p[:, None] & (offs_i < area)[None, :], other=0.0)
                box_sum += tl.sum(pix.to(tl.float32), axis=1)
            a = tl.where(offs_r[None, :] == r, (box_sum / area)[:, None], a)
    else:
        a = tl.load(base + offs_p[:, None] * stride_m1 + offs_r[None, :] * stride_m2,
                    mask=mask_p[:, None] & (offs_r < R)[None, :], other=0.0).to(tl.float32)
    return a


@triton.jit
def _store_pooled(num, den, out_ptr, den_ptr, out32_ptr, pid_b, pid_d, offs_r, offs_d, R, D, eps,
                  stride_ob, stride_or, stride_od, WRITE_F32: tl.constexpr):
    """out[b, :, d-block] = num / (den + eps) in out's dtype (and fp32 to out32 [B,R,D] with
    WRITE_F32); den [B,R] by the programs of the first D block."""
    mask_r = offs_r < R
    mask = mask_r[:, None] & (offs_d < D)[None, :]
    # An all-zero map has num = 0 and den = 0: the row is 0 / eps = 0, never NaN.
    out = num / (den[:, None] + eps)
    tl.store(out_ptr + pid_b.to(tl.int64) * stride_ob + offs_r[:, None] * stride_or
             + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_F32:
        tl.store(out32_ptr + (pid_b * R + offs_r).to(tl.int64)[:, None] * D + offs_d[None, :],
                 out, mask=mask)
    if pid_d == 0:
        tl.store(den_ptr + pid_b * R + offs_r, den, mask=mask_r)


@triton.jit
def _region_pool_fwd_kernel(
        feat_ptr, maps_ptr, out_ptr, den_ptr, out32_ptr, part_num_ptr, part_den_ptr, ticket_ptr,
        N, R, D, cls_offset, eps, grid_w, factor, patches_per_split,
        stride_fb, stride_ft, stride_fd,
        stride_mb, stride_m1, stride_m2, stride_m3,
        stride_ob, stride_or, stride_od,
        PIXEL_MAPS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_PIX: tl.constexpr,
        WRITE_F32: tl.constexpr):
    """Image b, one D block, patches [s * patches_per_split, (s + 1) * patches_per_split).

    out[b, r, d] = sum_p A[p,r] F[p,d] / (sum_p A[p,r] + eps) and den[b, r] = sum_p A; with
    WRITE_F32 (16-bit inputs), out also goes to out32 [B,R,D] (fp32, contiguous), unrounded, for
    the backward. SPLIT=False: one program holds all patches of (b, D block) and stores the
    result. SPLIT=True: each of the S programs of (b, D block) stores its partial sums (fp32,
    part_num [B,S,R,D], part_den [B,D blocks,S,R]) and takes a ticket (int32 counter per
    (b, D block), zeroed by the launcher); the program that draws the last ticket adds the S
    partials up in split order (a fixed order: deterministic) and stores the result. One launch
    either way.
    """
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_r = tl.arange(0, BLOCK_R)
    feat_base = feat_ptr + pid_b.to(tl.int64) * stride_fb + cls_offset * stride_ft
    p_start = pid_s * patches_per_split
    p_end = tl.minimum(p_start + patches_per_split, N)

    num = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    den = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < p_end
        a = _area_weights_tile(maps_ptr, pid_b, offs_p, mask_p, offs_r, R, stride_mb, stride_m1,
                               stride_m2, stride_m3, grid_w, factor, PIXEL_MAPS, BLOCK_P,
                               BLOCK_R, BLOCK_PIX)
        f = tl.load(feat_base + offs_p[:, None] * stride_ft + offs_d[None, :] * stride_fd,
                    mask=mask_p[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        den += tl.sum(a, axis=0)
        num += tl.dot(tl.trans(a), f, input_precision="ieee")

    if SPLIT:
        n_splits = tl.num_programs(2)
        group = pid_b * tl.num_programs(1) + pid_d
        mask_r = offs_r < R
        mask = mask_r[:, None] & mask_d[None, :]
        num_rows = part_num_ptr + ((pid_b * n_splits).to(tl.int64) * R + offs_r)[:, None] * D \
            + offs_d[None, :]  # split 0's rows; split s at + s * R * D
        den_rows = part_den_ptr + group * n_splits * R + offs_r
        tl.store(num_rows + pid_s * R * D, num, mask=mask)
        tl.store(den_rows + pid_s * R, den, mask=mask_r)
        # Every thread's partial stores come before the ticket (a release at GPU scope); the
        # last ticket's acquire makes the other programs' partials visible; L2 loads (.cg).
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + group, 1, sem="acq_rel")
        if ticket == n_splits - 1:
            num = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
            den = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for split in range(n_splits):
                num += tl.load(num_rows + split * R * D, mask=mask, other=0.0,
                               cache_modifier=".cg")
                den += tl.load(den_rows + split * R, mask=mask_r, other=0.0,
                               cache_modifier=".cg")
            _store_pooled(num, den, out_ptr, den_ptr, out32_ptr, pid_b, pid_d, offs_r, offs_d,
                          R, D, eps, stride_ob, stride_or, stride_od, WRITE_F32)
    else:
        _store_pooled(num, den, out_ptr, den_ptr, out32_ptr, pid_b, pid_d, offs_r, offs_d, R, D,
                      eps, stride_ob, stride_or, stride_od, WRITE_F32)


@triton.jit
def _region_pool_bwd_kernel(
        feat_ptr, maps_ptr, out_ptr, den_ptr, dout_ptr, dfeat_ptr, dmaps_ptr,
        N, R, D, cls_offset, eps, grid_w, factor,
        stride_fb, stride_ft, stride_fd,
        stride_mb, stride_m1, stride_m2, stride_m3,
        stride_ob, stride_or, stride_od,
        stride_gb, stride_gr, stride_gd,
        PIXEL_MAPS: tl.constexpr, COMPUTE_DFEAT: tl.constexpr, COMPUTE_DMAPS: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_PIX: tl.constexpr):
    """Gradients of one tile of BLOCK_P patches of image b.

    out is the forward's output in fp32 (see the module docstring: out.G must not be formed from
    the output rounded to 16 bits). dfeat [B,T|N,D] and dmaps (shape of maps) are contiguous
    outputs.
    """
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < N
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    b64 = pid_b.to(tl.int64)
    a = _area_weights_tile(maps_ptr, pid_b, offs_p, mask_p, offs_r, R, stride_mb, stride_m1,
                           stride_m2, stride_m3, grid_w, factor, PIXEL_MAPS, BLOCK_P, BLOCK_R,
                           BLOCK_PIX)
    inv_den = 1.0 / (tl.load(den_ptr + pid_b * R + offs_r, mask=mask_r, other=0.0) + eps)

    n_tok = N + cls_offset
    feat_base = feat_ptr + b64 * stride_fb + cls_offset * stride_ft
    dfeat_base = dfeat_ptr + b64 * n_tok * D + cls_offset * D
    f_dot_g = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)  # F[p] . G[r]
    out_dot_g = tl.zeros((BLOCK_R,), dtype=tl.float32)       # out[r] . G[r]
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_rd = mask_r[:, None] & mask_d[None, :]
        g = tl.load(dout_ptr + b64 * stride_gb + offs_r[:, None] * stride_gr
                    + offs_d[None, :] * stride_gd, mask=mask_rd, other=0.0).to(tl.float32)
        g = g * inv_den[:, None]
        if COMPUTE_DFEAT:
            dfeat = tl.dot(a, g, input_precision="ieee")
            tl.store(dfeat_base + offs_p[:, None] * D + offs_d[None, :],
                     dfeat.to(dfeat_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_d[None, :])
            if cls_offset > 0:
                if pid_p == 0:  # the class token takes no part in the pooling
                    tl.store(dfeat_ptr + b64 * n_tok * D + offs_d,
                             tl.zeros((BLOCK_D,), dtype=dfeat_ptr.dtype.element_ty), mask=mask_d)
        if COMPUTE_DMAPS:
            f = tl.load(feat_base + offs_p[:, None] * stride_ft + offs_d[None, :] * stride_fd,
                        mask=mask_p[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            o = tl.load(out_ptr + b64 * stride_ob + offs_r[:, None] * stride_or
                        + offs_d[None, :] * stride_od, mask=mask_rd, other=0.0).to(tl.float32)
            f_dot_g += tl.dot(f, tl.trans(g), input_precision="ieee")
            out_dot_g += tl.sum(o * g, axis=1)

    if COMPUTE_DMAPS:
        da = f_dot_g - out_dot_g[None, :]  # [BLOCK_P, BLOCK_R]
        if PIXEL_MAPS:
            # d mean / d pixel = 1 / f^2 for each pixel of the patch's box.
            area = factor * factor
            height = (N // grid_w) * factor
            width = grid_w * factor
            top = (offs_p // grid_w) * factor
            left = (offs_p % grid_w) * factor
            for r in range(R):
                da_r = tl.sum(tl.where(offs_r[None, :] == r, da, 0.0), axis=1) / area
                for i0 in range(0, area, BLOCK_PIX):
                    offs_i = i0 + tl.arange(0, BLOCK_PIX)
                    y = top[:, None] + (offs_i // factor)[None, :]
                    x = left[:, None] + (offs_i % factor)[None, :]
                    val = tl.broadcast_to(da_r[:, None], (BLOCK_P, BLOCK_PIX))
                    tl.store(dmaps_ptr + (b64 * R + r) * height * width + y * width + x,
                             val.to(dmaps_ptr.dtype.element_ty),
                             mask=mask_p[:, None] & (offs_i < area)[None, :])
        else:
            tl.store(dmaps_ptr + b64 * N * R + offs_p[:, None] * R + offs_r[None, :],
                     da.to(dmaps_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_r[None, :])
