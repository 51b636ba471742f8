"""Soft region pooling (Eq. 2): public entry point, argument checks, launchers and autograd (the
Triton kernels described here live in ``kernels``).

``region_pool(features[B,T|N,D], maps[B,N,R] | maps[B,R,Hm,Wm]) -> [B,R,D]``

Kernels (all accumulate in fp32; one launch forward, one backward):

* ``_region_pool_fwd_kernel``  grid (B, D-blocks, splits). Each program walks its share of the
  N patches in tiles of BLOCK_P, forms the area weights A[p, r] of the tile (token maps: a load;
  pixel maps: the f x f box average of each patch, computed from the full-resolution maps in
  registers) and accumulates ``A^T F`` [R, BLOCK_D] and ``sum_p A`` [R]. Token maps: one split,
  parallel over D blocks of 128, writes out [B,R,D] and den = sum_p A [B,R] (fp32, saved for the
  backward). Pixel maps: BLOCK_D is wide (``_PIXEL_FWD``: 512 under Triton 3.6, 256 under 3.8),
  so the full-resolution maps are read once per D block and never written at patch resolution;
  for parallelism the patches of an image are split over programs (about two programs per SM).
  Each split program writes fp32 partial sums and takes a ticket (an int32 counter per (image,
  D block), zeroed by the launcher); the program that draws the last ticket adds the partials
  up in split order and normalises: deterministic (a fixed order, no float atomics), and one
  launch where there used to be two (split kernel + finalize kernel).
* ``_region_pool_bwd_kernel``  one launch, grid (B, patch tiles). With G = dout / (den + eps):
  ``dF[p] = sum_r A[p,r] G[r]`` (zero for the class token) and
  ``dA[p,r] = F[p].G[r] - out[r].G[r]``; for pixel maps dA / f^2 is spread over the f x f block.
  Reads features and maps once, writes dF and dmaps once.

Counts at the model shape (B=32, T=197: N=196 patches on a 14x14 grid, pixel maps 3 x 224 x 224,
f=16, D=768, bf16; Triton 3.6 on a 132-SM H100/H200):

* forward: 13 patch tiles per image, 7 splits of 2 tiles, 2 D blocks of 512: grid (32, 2, 7) =
  448 programs at 16 warps (110-114 registers on sm_90a: one CTA per SM, 3.4 waves). Serial per
  program: 2 tiles x (3 regions x 2 pixel steps + 1 feature tile) = 14 loads, then one ticket;
  the last of each (image, D block)'s 7 programs adds 7 partials (L2). DRAM: features 9.6 MB +
  maps 9.6 MB (read by both D blocks, the second time mostly from L2) + out/out32 0.4 MB; partials
  2.1 MB (L2). Floor (``region_pool_min_bytes``) 19.4 MB. FLOPs: 2 B N 16 D = 0.15 GFLOP issued
  on the R-padded dot (3/16 useful) + 4.8 M box-average adds. 448 int32 atomics, no float ones.
  Before: the same split kernel, then ``_region_pool_finalize_kernel`` on (32, 6) = 192 programs
  of 7 serial loads: two launches and one more partial buffer per call.
* backward: grid (32, 13) = 416 programs, 12 serial D-chunk steps of 64; reads features, maps,
  dout, out32 once, writes dF, dmaps once (floor 38.8 MB).

R is padded to 16 (masked) so that both contractions run as ``tl.dot``, in fp32 (ieee) for every
input dtype: G = dout / (den + eps) can exceed the float16 range for an empty map, and a 16-bit
tensor-core variant of the forward cannot be validated here (Triton's interpreter mishandles
bfloat16 ``tl.dot`` operands).

Precision (the bounded-error rule of ``avpt_kernels.testing``): every product and sum is formed
and accumulated in fp32 (the pixel-map box averages A and G are fp32 values); results are
rounded to the input dtype once. ``dA = F.G - out.G`` cancels when the features share a large
common component (a ViT's large shared channels): ``out.G`` must then use the fp32
``num / (den + eps)``, not ``out`` rounded to 16 bits (its error u |out| |G| would be amplified by
|out| / |F - out|). So for 16-bit inputs the forward also writes ``out`` in fp32 ([B,R,D], a few
KB), which the backward saves and reads; for fp32 inputs ``out`` itself is that tensor.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ... import _checks
from ..._compat import for_triton
from ...backend import resolve
from ..kernel_config import KernelConfig, aligned, signature, tl_type
from . import reference
from .kernels import _region_pool_bwd_kernel, _region_pool_fwd_kernel

_LAYOUT_F = "[B, T, D] (class token first) or [B, N, D]"
_LAYOUT_M = "[B, N, R] (token resolution) or [B, R, H, W] (pixel resolution)"

# Dtypes the kernels take (float64 runs on the torch backend: see ``region_pool``).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_REGIONS = 16  # one padded block of regions (tl.dot needs >= 16 anyway)


def infer_grid(num_tokens: int, height: int, width: int) -> Tuple[int, int]:
    """Patch grid (Hg, Wg) of pixel maps [.., height, width] for features with ``num_tokens``.

    Tries N = num_tokens - 1 (class token present) first, then N = num_tokens; the grid must
    divide the map by one integer factor f in both directions (square patches).
    """
    for n in (num_tokens - 1, num_tokens):
        if n < 1:
            continue
        factor = math.isqrt(height * width // n) if height * width % n == 0 else 0
        if factor and factor * factor * n == height * width and height % factor == 0 \
                and width % factor == 0:
            return height // factor, width // factor
    raise ValueError(
        f"maps of size {height}x{width} do not fit features with {num_tokens} tokens: expected "
        f"H and W to be one integer multiple f of a patch grid (Hg, Wg) with Hg*Wg = "
        f"{num_tokens - 1} (with class token) or {num_tokens}")


def check_args(features: Tensor, maps: Tensor, eps: float,
               check_values: Optional[bool] = None) -> Optional[Tuple[int, int]]:
    """Validate; return the patch grid for pixel-resolution maps (None for token maps). The
    [0, 1] check of the map values runs per ``_checks.value_checks_enabled`` (``check_values``)."""
    _checks.tensor(features, "features", 3, _LAYOUT_F)
    _checks.tensor(maps, "maps", (3, 4), _LAYOUT_M)
    _checks.same_dtype_device("features", features, maps=maps)
    _checks.positive(eps, "eps")
    b, t, d = features.shape
    _checks.nonempty(b, "features", "image (B)")
    _checks.nonempty(d, "features", "channel (D)")
    if maps.shape[0] != b:
        raise ValueError(f"maps has batch {maps.shape[0]} but features has batch {b} "
                         f"(maps must be {_LAYOUT_M})")
    grid = None
    if maps.dim() == 3:
        n, r = maps.shape[1], maps.shape[2]
        if n not in (t, t - 1) or n < 1:
            raise ValueError(f"maps [B, N, R] has N={n} tokens but features has T={t}; "
                             f"expected N = T-1 (class token excluded) or N = T")
    else:
        r = maps.shape[1]
        grid = infer_grid(t, maps.shape[2], maps.shape[3])
    _checks.nonempty(r, "maps", "region (R)")
    _checks.unit_interval(maps, "maps", check_values)
    return grid



# ---- Launch configuration (shared by the launchers and aot_configs) ---------------------------
_BLOCK_P = 16
_BWD_BLOCK_D = 64
_TOKEN_FWD_BLOCK_D = 128
# Pixel-map forward: (BLOCK_D, num_warps) for D <= 256 and above, per Triton version (ptxas
# allocates differently). Triton 3.6 (the GPU machines'): of 256/512/1024-wide blocks at 2 to 16
# warps only 256 at 2 warps compiles spill-free both generic and as launched (divisibility
# hints: 512 at 16 warps, the earlier choice, spills 24-96 B on sm_80 then). Triton 3.8: of
# 64- to 1024-wide blocks at 2 to 16 warps only 512 at 4 warps compiles clean both ways (256 at
# 8, the earlier choice, spills 12-24 B as launched). The maps are read once per block. Checked
# by `make aot` for 3.6 and 3.8.
_PIXEL_FWD = for_triton({(3, 0): ((256, 2), (256, 2)), (3, 8): ((512, 4), (512, 4))})
_PIXEL_FWD_BLOCK_D = tuple(block_d for block_d, _ in _PIXEL_FWD)
_PIXEL_BLOCK_PIX = 128  # pixels of one patch box per step (a 16 x 16 box in two steps)


# Regions padded to one block of MAX_REGIONS whatever R is (tl.dot needs every dim >= 16): one
# configuration to compile for every R.
_BLOCK_R = MAX_REGIONS


def _block_pix(pixel_maps: bool) -> int:
    return _PIXEL_BLOCK_PIX if pixel_maps else 1


def _fwd_block_d(d: int, pixel_maps: bool) -> int:
    if not pixel_maps:
        return _TOKEN_FWD_BLOCK_D
    return _PIXEL_FWD_BLOCK_D[0] if d <= _PIXEL_FWD_BLOCK_D[0] else _PIXEL_FWD_BLOCK_D[1]


def _fwd_warps(pixel_maps: bool, block_d: int) -> int:
    return dict(_PIXEL_FWD)[block_d] if pixel_maps else 4


# fp32 FMA dots of the dmaps path spill at 4 warps (Triton 3.8); under Triton 3.6 the pixel-map
# dfeat+dmaps config spills 8 B on sm_90a at 8 warps, none at 16 (see aot_configs).
_BWD_WARPS = for_triton({(3, 0): 16, (3, 8): 8})


def _map_strides(maps: Tensor) -> Tuple[int, int, int, int]:
    s = maps.stride()
    return (s[0], s[1], s[2], 0) if maps.dim() == 3 else tuple(s)


def _geometry(features: Tensor, maps: Tensor, grid_h: int, grid_w: int):
    """(N, R, cls_offset, factor) of the call."""
    pixel = maps.dim() == 4
    n = grid_h * grid_w if pixel else maps.shape[1]
    r = maps.shape[1] if pixel else maps.shape[2]
    factor = maps.shape[2] // grid_h if pixel else 1
    return n, r, features.shape[1] - n, factor


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) (``triton.cdiv`` is a constexpr function: ~2 us per host call)."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int, properties) -> int:
    """SMs of a CUDA device, cached per device and per ``get_device_properties`` function (the
    launch counter patches it with an H100's properties for fake CUDA tensors)."""
    return properties(device_index).multi_processor_count


def _pixel_splits(batch: int, n_tiles: int, device: torch.device) -> int:
    """How many programs share one image's patches (pixel maps, where a program must cover all
    of D to read the maps once): enough for about two programs per SM. On the CPU interpreter,
    two, so that the split path is what the tests exercise by default."""
    if device.type != "cuda":
        return min(n_tiles, 2)
    sms = _sm_count(device.index or 0, torch.cuda.get_device_properties)
    return max(1, min(n_tiles, _cdiv(2 * sms, batch)))


def _forward(features: Tensor, maps: Tensor, eps: float, grid_h: int,
             grid_w: int) -> Tuple[Tensor, Tensor, Tensor]:
    b, _, d = features.shape
    pixel = maps.dim() == 4
    n, r, cls_offset, factor = _geometry(features, maps, grid_h, grid_w)
    dev = features.device
    out = torch.empty((b, r, d), dtype=features.dtype, device=dev)
    den = torch.empty((b, r), dtype=torch.float32, device=dev)
    # 16-bit inputs: out in fp32 too, for the backward (fp32 inputs: out itself, see the
    # module docstring).
    write_f32 = features.dtype != torch.float32
    out32 = torch.empty((b, r, d) if write_f32 else (0,), dtype=torch.float32, device=dev)
    block_d = _fwd_block_d(d, pixel)
    d_blocks = _cdiv(d, block_d)
    n_tiles = _cdiv(n, _BLOCK_P)
    splits = _pixel_splits(b, n_tiles, dev) if pixel else 1
    patches_per_split = _cdiv(n_tiles, splits) * _BLOCK_P
    splits = _cdiv(n, patches_per_split)
    if splits == 1:
        part_num = part_den = tickets = den  # unused
    else:  # one fp32 workspace: part_num [B,S,R,D], part_den [B,D blocks,S,R], int32 tickets
        sizes = [-(-n_el // 32) * 32 for n_el in (b * splits * r * d, b * d_blocks * splits * r,
                                                  b * d_blocks)]
        part_num, part_den, tickets = torch.empty(sum(sizes), dtype=torch.float32,
                                                  device=dev).split(sizes)
        tickets = tickets.view(torch.int32).zero_()
    _region_pool_fwd_kernel[(b, d_blocks, splits)](
        features, maps, out, den, out32 if write_f32 else den, part_num, part_den, tickets,
        n, r, d, cls_offset, eps, max(grid_w, 1), factor, patches_per_split,
        *features.stride(), *_map_strides(maps), *out.stride(),
        PIXEL_MAPS=pixel, SPLIT=splits > 1, BLOCK_P=_BLOCK_P, BLOCK_R=_BLOCK_R,
        BLOCK_D=block_d, BLOCK_PIX=_block_pix(pixel), WRITE_F32=write_f32,
        num_warps=_fwd_warps(pixel, block_d))
    return out, den, out32


def _backward(grad_out: Tensor, features: Tensor, maps: Tensor, out: Tensor, den: Tensor,
              eps: float, grid_h: int, grid_w: int, need_features: bool,
              need_maps: bool) -> Tuple[Tensor, Tensor]:
    """out: the forward's output in fp32 (out32 for 16-bit inputs)."""
    b, t, d = features.shape
    pixel = maps.dim() == 4
    n, r, cls_offset, factor = _geometry(features, maps, grid_h, grid_w)
    dfeat = torch.empty((b, t, d), dtype=features.dtype, device=features.device)
    dmaps = torch.empty(maps.shape, dtype=maps.dtype, device=maps.device)
    if need_features or need_maps:
        grid = (b, _cdiv(n, _BLOCK_P))
        _region_pool_bwd_kernel[grid](
            features, maps, out, den, grad_out, dfeat, dmaps,
            n, r, d, cls_offset, eps, max(grid_w, 1), factor,
            *features.stride(), *_map_strides(maps), *out.stride(), *grad_out.stride(),
            PIXEL_MAPS=pixel, COMPUTE_DFEAT=need_features, COMPUTE_DMAPS=need_maps,
            BLOCK_P=_BLOCK_P, BLOCK_R=_BLOCK_R, BLOCK_D=_BWD_BLOCK_D,
            BLOCK_PIX=_block_pix(pixel), num_warps=_BWD_WARPS)
    return dfeat, dmaps


# ---- Custom ops + autograd --------------------------------------------------------------------
@torch.library.custom_op("avpt::region_pool", mutates_args=())
def region_pool_op(features: Tensor, maps: Tensor, eps: float, grid_h: int,
                   grid_w: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Triton Eq. 2. grid_h = grid_w = 0 for token maps [B,N,R]; the patch grid for pixel maps.
    Returns (out [B,R,D] in the features dtype, and for the backward, not differentiable:
    den = sum_p A [B,R] fp32, out32 = out in fp32 [B,R,D] for 16-bit features, empty [0] for
    float32 features)."""
    return _forward(features, maps, eps, grid_h, grid_w)


@region_pool_op.register_fake
def _(features, maps, eps, grid_h, grid_w):
    r = maps.shape[1] if maps.dim() == 4 else maps.shape[2]
    b, _, d = features.shape
    out32_shape = (b, r, d) if features.dtype != torch.float32 else (0,)
    return (features.new_empty((b, r, d)), features.new_empty((b, r), dtype=torch.float32),
            features.new_empty(out32_shape, dtype=torch.float32))


@torch.library.custom_op("avpt::region_pool_backward", mutates_args=())
def region_pool_backward_op(grad_out: Tensor, features: Tensor, maps: Tensor, out: Tensor,
                            den: Tensor, eps: float, grid_h: int, grid_w: int,
                            need_features: bool, need_maps: bool) -> Tuple[Tensor, Tensor]:
    """(d features, d maps) of ``region_pool_op``; ``out`` is the forward's output in fp32
    (its out32 for 16-bit features). A gradient not asked for is left unwritten."""
    return _backward(grad_out, features, maps, out, den, eps, grid_h, grid_w, need_features,
                     need_maps)


@region_pool_backward_op.register_fake
def _(grad_out, features, maps, out, den, eps, grid_h, grid_w, need_features, need_maps):
    return torch.empty_like(features, memory_format=torch.contiguous_format), \
        torch.empty_like(maps, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    features, maps, eps, grid_h, grid_w = inputs
    out, den, out32 = output
    ctx.mark_non_differentiable(den, out32)
    # The backward needs out in fp32 (module docstring): out32 for 16-bit features.
    ctx.save_for_backward(features, maps, out if features.dtype == torch.float32 else out32, den)
    ctx.args = (eps, grid_h, grid_w)


def _backward_autograd(ctx, grad_out, _grad_den, _grad_out32):
    features, maps, out, den = ctx.saved_tensors
    need_features, need_maps = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dfeat, dmaps = region_pool_backward_op(grad_out, features, maps, out, den, *ctx.args,
                                           need_features, need_maps)
    return (dfeat if need_features else None, dmaps if need_maps else None, None, None, None)


region_pool_op.register_autograd(_backward_autograd, setup_context=_setup_context)




# ---- Public entry point -----------------------------------------------------------------------
def triton_unsupported_reason(features: Tensor, maps: Tensor) -> Optional[str]:
    """Why the Triton kernels cannot take these (already validated) arguments, or None."""
    regions = maps.shape[1] if maps.dim() == 4 else maps.shape[2]
    if features.dtype not in KERNEL_DTYPES:
        return f"features dtype {features.dtype} (the kernels take {KERNEL_DTYPES})"
    if regions > MAX_REGIONS:
        return f"maps with R={regions} regions (the kernels take at most {MAX_REGIONS} regions)"
    return None


def region_pool(features: Tensor, maps: Tensor, eps: float = 1e-6, *,
                backend: Optional[str] = None, check_values: Optional[bool] = None) -> Tensor:
    """Soft region pooling, Eq. 2: ``out[b,k] = sum_p A[b,p,k] F[b,p] / (sum_p A[b,p,k] + eps)``.

    features: [B, T, D] with the class token at index 0 (it is excluded), or [B, N, D].
    maps:     region confidences in [0, 1], either [B, N, R] on the patch tokens or
              [B, R, H, W] in pixels, H and W one integer multiple of the patch grid; pixel maps
              are area-averaged onto the grid first. An all-zero map gives a zero row.
    returns:  [B, R, D], dtype of ``features``. Differentiable in features and maps.

    Accumulation is in fp32. Note that the gradient w.r.t. an all-zero map is F / eps, about
    1e6 x |F| for the default eps: beyond float16's range (it overflows to inf there), fine in
    bfloat16 and float32. Use bf16, or a larger eps, when maps can be empty and need gradients.

    The Triton kernels take float32/bfloat16/float16 and R <= 16; other inputs (float64, more
    regions) run on the torch backend under ``backend="auto"`` and raise under
    ``backend="triton"``.

    Map values (finite, in [0, 1]) are checked where that costs no host sync: on CPU tensors,
    by default. On CUDA the check would copy a flag to the host on every call, so it is off
    there unless asked for: ``check_values=True``, ``AVPT_CHECK_VALUES=1`` or
    ``avpt_kernels._checks.set_value_checks(True)`` (a debug mode: then maps outside [0, 1] or
    non-finite raise ``ValueError`` on every device). The data loaders (``avpt.data``) validate
    maps where they are loaded. ``check_values=False`` skips the check on CPU too.
    """
    grid = check_args(features, maps, eps, check_values)
    use = resolve("region_pool", features.device, backend,
                  lambda: triton_unsupported_reason(features, maps))
    if use == "torch":
        return reference.region_pool(features, maps, eps, grid)
    grid_h, grid_w = grid if grid is not None else (0, 0)
    return region_pool_op(features, maps, float(eps), grid_h, grid_w)[0]


# ---- Ahead-of-time compile list ---------------------------------------------------------------
_INPUT_POINTERS = ("feat_ptr", "maps_ptr", "out_ptr", "dout_ptr", "dfeat_ptr", "dmaps_ptr")


def aot_configs() -> List:
    """Every kernel configuration the launchers above can select (per input dtype); signatures
    from the kernels' parameter lists (pointers in the input dtype or fp32, sizes i32, eps fp32)."""
    configs = []
    for dtype in KERNEL_DTYPES:
        inputs = {n: f"*{tl_type(dtype)}" for n in _INPUT_POINTERS}
        write_f32 = dtype != torch.float32  # 16-bit inputs also write out in fp32
        # Token maps: one split. Pixel maps: one split, or split partials + the last ticket's
        # sum (part_* fp32, ticket_ptr int32).
        pixel_block_d = sorted(set(_PIXEL_FWD_BLOCK_D))
        fwd_choices = [(False, False, _TOKEN_FWD_BLOCK_D)] + [
            (True, split, bd) for split in (False, True) for bd in pixel_block_d]
        fwd_sig = signature(_region_pool_fwd_kernel, dict(inputs, ticket_ptr="*i32"), ("eps",))
        for pixel, split, block_d in fwd_choices:
            configs.append(KernelConfig(
                _region_pool_fwd_kernel, fwd_sig,
                dict(PIXEL_MAPS=pixel, SPLIT=split, BLOCK_P=_BLOCK_P, BLOCK_R=_BLOCK_R,
                     BLOCK_D=block_d, BLOCK_PIX=_block_pix(pixel), WRITE_F32=write_f32),
                num_warps=_fwd_warps(pixel, block_d)))
        bwd_sig = signature(_region_pool_bwd_kernel, dict(inputs, out_ptr="*fp32"), ("eps",))
        for pixel in (False, True):
            for need_f, need_m in ((True, True), (True, False), (False, True)):
                configs.append(KernelConfig(
                    _region_pool_bwd_kernel, bwd_sig,
                    dict(PIXEL_MAPS=pixel, COMPUTE_DFEAT=need_f, COMPUTE_DMAPS=need_m,
                         BLOCK_P=_BLOCK_P, BLOCK_R=_BLOCK_R, BLOCK_D=_BWD_BLOCK_D,
                         BLOCK_PIX=_block_pix(pixel)), num_warps=_BWD_WARPS))
    return [c for cfg in configs for c in (cfg, aligned(cfg, *_MODEL_SHAPE_HINTS[
        cfg.constexprs["PIXEL_MAPS"]]))]


# At the model's shape (196 patch tokens, R=3 regions; maps on the tokens, or 224x224 pixel
# maps): the sizes and map strides that are no multiple of 16, and the ints equal to 1 (unit
# strides, the class-token offset, the token maps' grid width and factor), by PIXEL_MAPS:
# ``kernel_config.aligned``.
_MODEL_SHAPE_HINTS = {
    False: (("N", "R", "stride_mb", "stride_m1"),
            ("cls_offset", "grid_w", "factor", "stride_fd", "stride_m2", "stride_od", "stride_gd")),
    True: (("N", "R", "grid_w"),
           ("cls_offset", "stride_fd", "stride_m3", "stride_od", "stride_gd")),
}
