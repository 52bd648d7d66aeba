"""Triton kernel of the BGA aggregation fused after the 1x1 conv of detail_dwconv
(contract in bisenet_fast/ops/bga_pointwise.py), inference only:
    out = (pw_weight @ detail_dw + pw_bias) * sigmoid(up(semantic)) + up(detail_down * sigmoid(semantic_down))

One program per tile of BLOCK_P pixels x BLOCK_C output channels of one image: tl.dot over
the input channels, then the epilogue gates the accumulator with the four bilinear taps of
semantic and adds those of gated = detail_down * sigmoid(semantic_down), formed beforehand
once per low-resolution value by triton_kernels/bga.py's kernel (per tap it cost four more
sigmoids per output value). The tap and blend helpers are bga.py's, so the taps are those
of F.interpolate. The conv's output never leaves registers.

Tensors are addressed through (batch, channel, pixel) strides, pixel = y * W + x, so NCHW
and channels_last both run natively (every map of one call shares one layout).

float32 inputs: tl.dot runs in TF32 when cuDNN's convolutions may use it (PyTorch's default,
and what F.conv2d then does; the rule of bisenet_fast._C.cudnn_conv_allows_tf32), IEEE fp32
otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bisenet_fast._C import cudnn_conv_allows_tf32
from bisenet_fast.ops._checks import check_image_fits_int32
from bisenet_fast.triton_kernels.bga import BLOCK as GATED_BLOCK
from bisenet_fast.triton_kernels.bga import MAX_GRID_Z, _bilinear, _gated_down_kernel
from bisenet_fast.triton_kernels.bilinear import linear_tap_of_sizes
from bisenet_fast.triton_kernels.interpreter import needs_fp32_dot

BLOCK_P = 64
BLOCK_K = 32
# Output channels per program: all of them up to 128 (BiSeNetV2's BGA has 128), so each
# pixel tile of detail_dw is read once; at least 16, tl.dot's smallest block. NCHW maps
# take 64: at 128 their epilogue spilled ~1 KiB per thread on sm_90.
MAX_BLOCK_C = 128
MAX_BLOCK_C_NCHW = 64
# The epilogue keeps several [BLOCK_P, BLOCK_C] tensors live (offsets, taps, the
# accumulator): 8 warps hold a 64 x 128 tile without spilling where 4 would not.
NUM_WARPS = 8
# The spatial sizes go through linear_tap_of_sizes's .to(), which a size specialised to the
# constant 1 would not have; channels and strides stay specialisable (stride 1 and multiples
# of 16 are what lets the compiler vectorise the loads along the contiguous dimension).
_SIZES = ["H", "W", "h", "w"]


@triton.jit(do_not_specialize=_SIZES)
def _bga_pointwise_kernel(x_ptr, w_ptr, b_ptr, s_ptr, g_ptr, out_ptr,
                          H, W, h, w, C, s_n, s_c, s_p, l_n, l_c, l_p,
                          INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # Offsets within one image are int32 (the wrapper checks they fit): int64 [BLOCK_P,
    # BLOCK_C] offset tensors of the NCHW epilogue spilled 1.3-1.4 KiB per thread on sm_90.
    n = tl.program_id(2).to(tl.int64)
    x_ptr += n * s_n
    out_ptr += n * s_n
    s_ptr += n * l_n
    g_ptr += n * l_n
    pixel = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pixel_ok = pixel < H * W
    channel_ok = channel < C
    ks = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + (pixel * s_p)[:, None]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + ks
        k_ok = k < C
        x = tl.load(x_rows + (k * s_c)[None, :], mask=pixel_ok[:, None] & k_ok[None, :], other=0.0)
        # weight (C_out, C_in) row-major, read as its transpose (C_in, C_out).
        wt = tl.load(w_ptr + channel[None, :] * C + k[:, None], mask=k_ok[:, None] & channel_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            x = x.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(x, wt, acc, input_precision=INPUT_PRECISION)
    acc += tl.load(b_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)[None, :]

    y = pixel // W
    xx = pixel % W
    ri0, ri1, rw0, rw1 = linear_tap_of_sizes(y, h, H)
    ci0, ci1, cw0, cw1 = linear_tap_of_sizes(xx, w, W)
    low_channel = (channel * l_c)[None, :]
    r0 = low_channel + (ri0 * w * l_p)[:, None]
    r1 = low_channel + (ri1 * w * l_p)[:, None]
    c0 = (ci0 * l_p)[:, None]
    c1 = (ci1 * l_p)[:, None]
    rw0 = rw0[:, None]
    rw1 = rw1[:, None]
    cw0 = cw0[:, None]
    cw1 = cw1[:, None]
    mask = pixel_ok[:, None] & channel_ok[None, :]

    semantic_up = _bilinear(s_ptr, r0, r1, c0, c1, rw0, rw1, cw0, cw1, mask)
    gated_up = _bilinear(g_ptr, r0, r1, c0, c1, rw0, rw1, cw0, cw1, mask)
    out = acc * tl.sigmoid(semantic_up) + gated_up
    out_offset = (pixel * s_p)[:, None] + (channel * s_c)[None, :]
    tl.store(out_ptr + out_offset, out.to(out_ptr.dtype.element_ty), mask=mask)


def _pixel_strides(t: torch.Tensor, channels_last: bool) -> tuple[int, int, int]:
    """(batch, channel, pixel) strides of `t`'s layout, from its sizes: a tensor that is
    contiguous in that layout may carry any stride on a size-1 dimension, which a flat pixel
    index y * W + x would otherwise multiply."""
    _n, c, h, w = t.shape
    if channels_last:
        return h * w * c, 1, c
    return c * h * w, h * w, 1


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: TF32 for float32 exactly when cuDNN convs may use it."""
    if (dtype == torch.float32 and not cudnn_conv_allows_tf32()) or needs_fp32_dot(dtype):
        return "ieee"
    return "tf32"


def check_sizes(detail_dw: torch.Tensor, semantic: torch.Tensor) -> None:
    """32-bit offsets within an image, checked before the op copies anything."""
    for name, t in (("detail_dw", detail_dw), ("semantic", semantic)):  # the low-res maps share semantic's size
        check_image_fits_int32("bga_pointwise_aggregate (triton)", name, t, "use the eager backend for such images")


def bga_pointwise_forward(detail_dw, pw_weight, pw_bias, semantic, detail_down, semantic_down,
                          channels_last: bool) -> torch.Tensor:
    """All maps contiguous in the layout `channels_last` names, checked by check_sizes;
    pw_weight (C, C) and pw_bias (C) contiguous. Returns the output in that layout."""
    batch, channels, H, W = detail_dw.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty_like(detail_dw, memory_format=fmt)
    if out.numel() == 0:
        return out
    h, w = semantic.shape[-2:]
    gated = torch.empty_like(detail_down, dtype=torch.float32, memory_format=fmt)
    _gated_down_kernel[(triton.cdiv(gated.numel(), GATED_BLOCK),)](detail_down, semantic_down, gated, gated.numel(),
                                                                   BLOCK=GATED_BLOCK)
    block_c = min(MAX_BLOCK_C if channels_last else MAX_BLOCK_C_NCHW, max(16, triton.next_power_of_2(channels)))
    # The images take the grid's z, which CUDA bounds: a larger batch runs in slices of it.
    for first in range(0, batch, MAX_GRID_Z):
        images = slice(first, first + MAX_GRID_Z)
        grid = (triton.cdiv(H * W, BLOCK_P), triton.cdiv(channels, block_c), min(batch - first, MAX_GRID_Z))
        _bga_pointwise_kernel[grid](
            detail_dw[images], pw_weight, pw_bias, semantic[images], gated[images], out[images],
            H, W, h, w, channels, *_pixel_strides(detail_dw, channels_last), *_pixel_strides(semantic, channels_last),
            INPUT_PRECISION=dot_precision(detail_dw.dtype), DOT_IN_FP32=needs_fp32_dot(detail_dw.dtype),
            BLOCK_P=BLOCK_P, BLOCK_C=block_c, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
        )
    return out
