"""Tile products for the PIM kernels: exact 16-bit dots (``_mm``) and near-fp32 split dots of
fp32 operands on 16-bit tensor cores (``_mm_split``). DOT_MODE: 0 fp32 inputs (IEEE fp32 dots),
1 fp16, 2 bf16, and 3 / 4 the bf16 / fp16 modes under TRITON_INTERPRET=1 (see ``_mm``)."""
import triton
import triton.language as tl


@triton.jit
def _mm(a, b, DOT_MODE: tl.constexpr):
    """a @ b with fp32 accumulation for operands that are exact in the input dtype (Z, dZ_out,
    the weights): fp32 operands in IEEE precision (no TF32), or 16-bit tensor-core dots. Modes 3
    and 4 are modes 2 and 1 for TRITON_INTERPRET=1, whose tl.dot on bfloat16 operands returns
    garbage (triton 3.8): exact fp32 products of the rounded operands; they are never compiled."""
    if DOT_MODE == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT_MODE == 1 or DOT_MODE == 4:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DOT_MODE == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32),
                      input_precision="ieee")


@triton.jit
def _fp16_parts(x):
    """fp32 tile x -> (hi, lo, inv_scale) with x = (hi + lo) * inv_scale + O(2^-22 max|x|), hi and
    lo float16. The tile is first scaled by a power of two that puts its largest |x| in
    [2^14, 2^15): no part overflows fp16's 65504 (whatever the magnitude of x, e.g. a gradient
    under a loss scaler), and lo stays above fp16's subnormal floor. The scale is built from the
    exponent bits, so scaling is exact."""
    big = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    exponent = tl.maximum((big.to(tl.int32, bitcast=True) >> 23) & 0xFF, 15)  # biased
    scale = ((268 - exponent) << 23).to(tl.float32, bitcast=True)  # 2^(14 - (exponent - 127))
    inv_scale = ((exponent - 14) << 23).to(tl.float32, bitcast=True)
    xs = x * scale
    hi = xs.to(tl.float16)
    return hi, (xs - hi.to(tl.float32)).to(tl.float16), inv_scale


@triton.jit
def _fp16_parts3(x):
    """``_fp16_parts`` with a third part: (hi, mid, lo, inv_scale), x = (hi + mid + lo) *
    inv_scale to ~2^-33 of max|x| (lo may be subnormal in fp16: it only adds bits)."""
    hi, lo, inv_scale = _fp16_parts(x)
    xs = x * (1.0 / inv_scale)  # the same power-of-two scaling: exact
    r = xs - hi.to(tl.float32)
    mid = r.to(tl.float16)
    return hi, mid, (r - mid.to(tl.float32)).to(tl.float16), inv_scale


@triton.jit
def _bf16_parts3(x):
    """fp32 tile x -> (hi, mid, lo) bfloat16 with x = hi + mid + lo to ~2^-24 relative (each part
    the rounding error of the ones before, rounded to bf16)."""
    hi = x.to(tl.bfloat16)
    r = x - hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    return hi, mid, (r - mid.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _mm_split(a, b, EXACT: tl.constexpr, DOT_MODE: tl.constexpr):
    """a @ b to near-fp32 accuracy on 16-bit tensor cores, for products with an fp32
    intermediate operand (softmax probabilities, the per-image matrices Mq/Mk/Nv, gradients).
    Rounding such an operand to 16 bits errs by 2^-9 (bf16) of each element; where the result
    feeds a softmax over high-norm tokens or a difference of nearly equal sums, that error is
    amplified far beyond the torch backend's (fp32) error. Instead each fp32 operand is split
    into 16-bit parts x = hi + lo (lo: the rounding error of hi) and hi*hi + hi*lo + lo*hi is
    summed with fp32 accumulation; an operand exact in the input dtype (EXACT = 1: ``a``, 2:
    ``b``; Z, dZ_out) has no lo part, so 2 dots. bf16 inputs: bf16 parts (fp32's range, error
    ~2^-17). fp16 inputs: fp16 parts of the tile scaled by a power of two (``_fp16_parts``,
    error ~2^-22: fp16's unit roundoff is 8x finer than bf16's, so bf16 parts would not do).
    Mode 0 (fp32 inputs): one IEEE fp32 dot. Modes 3, 4 (interpreter): the same products, bf16
    ones as exact fp32 products of the parts (the interpreter's bf16 tl.dot is broken)."""
    if DOT_MODE == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    a32 = a.to(tl.float32)
    b32 = b.to(tl.float32)
    if DOT_MODE == 1 or DOT_MODE == 4:
        # an operand exact in fp16 times an fp32 one: three fp16 parts of the scaled fp32 tile
        # (~2^-33 of its largest element: fp32 accuracy even for elements 2^9 below it, as in a
        # tile that spans images of very different scales)
        if EXACT == 1:
            b_hi, b_mid, b_lo, b_inv = _fp16_parts3(b32)
            a16 = a.to(tl.float16)
            return ((tl.dot(a16, b_lo) + tl.dot(a16, b_mid)) + tl.dot(a16, b_hi)) * b_inv
        if EXACT == 2:
            a_hi, a_mid, a_lo, a_inv = _fp16_parts3(a32)
            b16 = b.to(tl.float16)
            return ((tl.dot(a_lo, b16) + tl.dot(a_mid, b16)) + tl.dot(a_hi, b16)) * a_inv
        a_hi, a_lo, a_inv = _fp16_parts(a32)
        b_hi, b_lo, b_inv = _fp16_parts(b32)
        return (tl.dot(a_hi, b_hi) + tl.dot(a_lo, b_hi) + tl.dot(a_hi, b_lo)) * (a_inv * b_inv)
    if EXACT != 0:
        # one operand exact in bf16, the other fp32: three bf16 parts of the fp32 one (8 + 8 + 8
        # bits: fp32's 24), three dots, ~fp32 accuracy (what an fp32 result such as a weight
        # gradient needs to stay within 2x of the torch backend's fp32 error)
        if EXACT == 1:
            x_hi, x_mid, x_lo = _bf16_parts3(b32)
            e16 = a32.to(tl.bfloat16)
            if DOT_MODE == 3:
                e = e16.to(tl.float32)
                acc = tl.dot(e, x_hi.to(tl.float32), input_precision="ieee")
                acc = tl.dot(e, x_mid.to(tl.float32), acc, input_precision="ieee")
                return tl.dot(e, x_lo.to(tl.float32), acc, input_precision="ieee")
            acc = tl.dot(e16, x_hi)
            acc = tl.dot(e16, x_mid, acc)
            return tl.dot(e16, x_lo, acc)
        x_hi, x_mid, x_lo = _bf16_parts3(a32)
        e16 = b32.to(tl.bfloat16)
        if DOT_MODE == 3:
            e = e16.to(tl.float32)
            acc = tl.dot(x_hi.to(tl.float32), e, input_precision="ieee")
            acc = tl.dot(x_mid.to(tl.float32), e, acc, input_precision="ieee")
            return tl.dot(x_lo.to(tl.float32), e, acc, input_precision="ieee")
        acc = tl.dot(x_hi, e16)
        acc = tl.dot(x_mid, e16, acc)
        return tl.dot(x_lo, e16, acc)
    a_hi = a32.to(tl.bfloat16)
    b_hi = b32.to(tl.bfloat16)
    a_lo = (a32 - a_hi.to(tl.float32)).to(tl.bfloat16)
    b_lo = (b32 - b_hi.to(tl.float32)).to(tl.bfloat16)
    if DOT_MODE == 3:
        a_hi, a_lo = a_hi.to(tl.float32), a_lo.to(tl.float32)
        b_hi, b_lo = b_hi.to(tl.float32), b_lo.to(tl.float32)
        acc = tl.dot(a_hi, b_hi, input_precision="ieee")
        if EXACT != 1:  # a_lo = 0 when a is exact in bf16
            acc = tl.dot(a_lo, b_hi, acc, input_precision="ieee")
        if EXACT != 2:  # b_lo = 0 when b is exact in bf16
            acc = tl.dot(a_hi, b_lo, acc, input_precision="ieee")
        return acc
    acc = tl.dot(a_hi, b_hi)
    if EXACT != 1:
        acc = tl.dot(a_lo, b_hi, acc)
    if EXACT != 2:
        acc = tl.dot(a_hi, b_lo, acc)
    return acc
