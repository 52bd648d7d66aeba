"""Index math of bilinear interpolation with align_corners=False, as csrc/common/bilinear.h
(and ATen's upsample_bilinear2d) computes it, for the Triton kernels that upsample inside
themselves (BGA, BGA pointwise epilogue, OHEM loss)."""
from __future__ import annotations

import numpy as np
import triton
import triton.language as tl


def linear_scale(in_size: int, out_size: int) -> float:
    """float32 in/out on the host, for kernels that take the scale as an argument."""
    return float(np.float32(in_size) / np.float32(out_size))


@triton.jit
def linear_tap(dst, in_size, scale):
    """linear_tap of common/bilinear.h: destination dst reads source i0 with weight w0 and
    i1 with w1."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)
    w1 = src - i0.to(tl.float32)
    # An axis that keeps its size reads i0 twice, not a zero-weight neighbour (bilinear.h):
    # there no i0 is below last_i1 = 0. One uniform scalar, where a per-element select cost the
    # BGA pointwise epilogue the registers it had left (it spilled on sm_86).
    last_i1 = tl.where(scale != 1.0, in_size - 1, 0)
    i1 = i0 + (i0 < last_i1).to(tl.int32)
    return i0, i1, 1.0 - w1, w1


@triton.jit
def linear_tap_of_sizes(dst, in_size, out_size):
    """linear_tap with the scale computed in the kernel (float32 in/out, rounded as the host's)."""
    return linear_tap(dst, in_size, tl.math.div_rn(in_size.to(tl.float32), out_size.to(tl.float32)))


@triton.jit
def first_dst_with_i0_at_least(m, in_size, out_size):
    """first_dst_with_i0_at_least of common/bilinear.h: an analytic guess at most a few
    steps below the answer, corrected with the exact taps."""
    scale = tl.math.div_rn(in_size.to(tl.float32), out_size.to(tl.float32))
    dst = ((m.to(tl.float32) + 0.5) / scale - 0.5).to(tl.int32) - 1
    dst = tl.minimum(tl.maximum(dst, 0), out_size)
    for _ in tl.static_range(4):
        i0, _i1, _w0, _w1 = linear_tap(dst, in_size, scale)
        dst = tl.where((dst < out_size) & (i0 < m), dst + 1, dst)
    for _ in tl.static_range(2):
        i0, _i1, _w0, _w1 = linear_tap(dst - 1, in_size, scale)
        dst = tl.where((dst > 0) & (i0 >= m), dst - 1, dst)
    dst = tl.where(m <= 0, 0, dst)
    return tl.where(m > in_size - 1, out_size, dst)
