"""Triton kernels of Bilateral Guided Aggregation (formula and argument contract in
bisenet_fast/ops/bga.py):
    out = detail * sigmoid(up(semantic)) + up(detail_down * sigmoid(semantic_down))

Every tensor is contiguous in one layout, walked as planes of rows x cols pixels holding
`inner` consecutive values (NCHW: N*C planes, inner 1; channels_last: N planes, inner C),
so one kernel serves both layouts with coalesced accesses.

Forward: a first kernel forms gated = detail_down * sigmoid(semantic_down) once per
low-resolution value (float32; forming it per tap cost four more sigmoids per output
value); then each program takes BLOCK values of one output row (grid: row chunk, row,
planes) and reads detail once and the four bilinear taps of semantic and of gated
(cache-resident: 1/16 of the output). The grid gives each value its row and plane without
the 64-bit divisions a flat index needs. Taps are computed like common/bilinear.h (the same
float arithmetic as ATen's upsample_bilinear2d).

Backward: deterministic gathers, no atomics. One program per BLOCK low-resolution values;
each walks the high-resolution pixels that read its pixel (the transpose of the upsample,
the same index range as dst_range_reading in common/bilinear.h) in a fixed order,
recomputing up(semantic) there, and accumulates up^T(g * detail * s * (1 - s)) and
up^T(g). The low-resolution pixel that is tap (i0, j0) of a high-resolution pixel also
writes grad_detail = g * s there, so every grad_detail value is written exactly once.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from bisenet_fast.ops._checks import MAX_GRID_YZ, check_grid_extent
from bisenet_fast.triton_kernels.bilinear import first_dst_with_i0_at_least, linear_tap_of_sizes

BLOCK = 1024
BLOCK_BACKWARD = 256
# The forward's rows take the grid's y (a larger height is refused), its planes z (the
# programs loop over planes beyond CUDA's bound; a name of its own for tests to lower).
MAX_GRID_Z = MAX_GRID_YZ
_SIZES = ["total", "H", "W", "h", "w", "K"]


@triton.jit
def _bilinear(ptr, r0, r1, c0, c1, rw0, rw1, cw0, cw1, mask):
    """Each row along x, then the two rows along y, in fp32: the order of the CPU and CUDA
    kernels and ATen."""
    v00 = tl.load(ptr + r0 + c0, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(ptr + r0 + c1, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(ptr + r1 + c0, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(ptr + r1 + c1, mask=mask, other=0.0).to(tl.float32)
    return rw0 * (cw0 * v00 + cw1 * v01) + rw1 * (cw0 * v10 + cw1 * v11)


@triton.jit
def _gated(dd_ptr, sd_ptr, offset, mask):
    dd = tl.load(dd_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    sd = tl.load(sd_ptr + offset, mask=mask, other=0.0).to(tl.float32)
    return dd * tl.sigmoid(sd)


@triton.jit(do_not_specialize=["total"])
def _gated_down_kernel(dd_ptr, sd_ptr, gated_ptr, total, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    tl.store(gated_ptr + idx, _gated(dd_ptr, sd_ptr, idx, mask), mask=mask)


@triton.jit(do_not_specialize=["planes", "H", "W", "h", "w"])
def _bga_forward_kernel(d_ptr, s_ptr, g_ptr, out_ptr, planes, H, W, h, w, K: tl.constexpr, BLOCK: tl.constexpr):
    # K (values per pixel) is a compile-time constant: 1 in NCHW, C in channels_last, so
    # the split of a row position into pixel and channel is a shift or a 32-bit division.
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # position in the output row
    mask = e < W * K
    x = e // K
    k = e - x * K
    y = tl.program_id(1)
    ri0, ri1, rw0, rw1 = linear_tap_of_sizes(y, h, H)
    ci0, ci1, cw0, cw1 = linear_tap_of_sizes(x, w, W)
    c0 = ci0 * K + k
    c1 = ci1 * K + k
    h64, H64 = h.to(tl.int64), H.to(tl.int64)  # offsets across planes can pass 2^31
    for plane in range(tl.program_id(2), planes, tl.num_programs(2)):
        low_plane = plane * h64
        r0 = (low_plane + ri0) * w * K
        r1 = (low_plane + ri1) * w * K
        semantic_up = _bilinear(s_ptr, r0, r1, c0, c1, rw0, rw1, cw0, cw1, mask)
        gated_up = _bilinear(g_ptr, r0, r1, c0, c1, rw0, rw1, cw0, cw1, mask)
        high = ((plane * H64 + y) * W) * K + e
        detail = tl.load(d_ptr + high, mask=mask, other=0.0).to(tl.float32)
        out = detail * tl.sigmoid(semantic_up) + gated_up
        tl.store(out_ptr + high, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_SIZES)
def _bga_backward_kernel(go_ptr, d_ptr, s_ptr, dd_ptr, sd_ptr, gd_ptr, gs_ptr, gdd_ptr, gsd_ptr,
                         total, H, W, h, w, K,
                         MAX_ROWS: tl.constexpr, MAX_COLS: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    k = idx % K
    pixel = idx // K
    j = (pixel % w).to(tl.int32)
    row = pixel // w
    i = (row % h).to(tl.int32)
    plane = row // h

    y_begin = first_dst_with_i0_at_least(i - 1, h, H)
    y_end = first_dst_with_i0_at_least(i + 1, h, H)
    x_begin = first_dst_with_i0_at_least(j - 1, w, W)
    x_end = first_dst_with_i0_at_least(j + 1, w, W)

    acc_semantic = tl.zeros([BLOCK], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK], dtype=tl.float32)
    low_plane = plane * h
    for dy in range(MAX_ROWS):
        y = y_begin + dy
        y_ok = mask & (y < y_end)
        ri0, ri1, rw0, rw1 = linear_tap_of_sizes(y, h, H)
        wy = tl.where(ri0 == i, rw0, 0.0) + tl.where(ri1 == i, rw1, 0.0)
        r0 = ((low_plane + ri0) * w) * K + k
        r1 = ((low_plane + ri1) * w) * K + k
        high_row = (plane * H + y) * W
        for dx in range(MAX_COLS):
            x = x_begin + dx
            ok = y_ok & (x < x_end)
            ci0, ci1, cw0, cw1 = linear_tap_of_sizes(x, w, W)
            wx = tl.where(ci0 == j, cw0, 0.0) + tl.where(ci1 == j, cw1, 0.0)
            high = (high_row + x) * K + k
            g = tl.load(go_ptr + high, mask=ok, other=0.0).to(tl.float32)
            detail = tl.load(d_ptr + high, mask=ok, other=0.0).to(tl.float32)
            s = tl.sigmoid(_bilinear(s_ptr, r0, r1, ci0.to(tl.int64) * K, ci1.to(tl.int64) * K,
                                     rw0, rw1, cw0, cw1, ok))
            weight = wy * wx
            acc_semantic += weight * (g * detail * s * (1.0 - s))
            acc_up += weight * g
            owner = ok & (ri0 == i) & (ci0 == j)
            tl.store(gd_ptr + high, (g * s).to(gd_ptr.dtype.element_ty), mask=owner)

    dd = tl.load(dd_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(tl.load(sd_ptr + idx, mask=mask, other=0.0).to(tl.float32))
    tl.store(gs_ptr + idx, acc_semantic.to(gs_ptr.dtype.element_ty), mask=mask)
    tl.store(gdd_ptr + idx, (acc_up * sig).to(gdd_ptr.dtype.element_ty), mask=mask)
    tl.store(gsd_ptr + idx, (acc_up * dd * sig * (1.0 - sig)).to(gsd_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=256)
def max_readers(in_size: int, out_size: int) -> int:
    """The most destination indices reading one source index along an axis (the loop
    bound of the backward gathers), from the taps in float32 like the kernel, plus two: a
    fused multiply-add on the GPU may move the tap at either end of a range across an
    integer."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    per_source = np.bincount(i0, minlength=in_size)
    pairs = per_source + np.concatenate([[0], per_source[:-1]])  # readers with i0 in {i - 1, i}
    return int(pairs.max()) + 2


def _geometry(detail: torch.Tensor, semantic: torch.Tensor, channels_last: bool):
    n, c, H, W = detail.shape
    h, w = semantic.shape[-2:]
    return H, W, h, w, (c if channels_last else 1)


def check_forward_sizes(detail: torch.Tensor, channels_last: bool, semantic: torch.Tensor | None = None) -> None:
    """The forward's limits, checked before the op copies anything: a row per grid y, and
    32-bit positions within a row (W values, times C in channels_last) of detail and of
    semantic (whose taps' positions in a row, ci * K + k, are 32-bit too; semantic may be
    wider than detail: any h, w)."""
    _n, c, H, W = detail.shape
    check_grid_extent("bga_aggregate (Triton kernel)", H, f"detail's height {H}", "use the cpp or cuda backend")
    for name, t in (("detail", detail), ("semantic", semantic)):
        if t is None:
            continue
        row = t.shape[-1] * (c if channels_last else 1)
        if row >= 2**31:
            raise ValueError(f"bga_aggregate (Triton kernel): a row of {name} holds {row} values (shape "
                             f"{tuple(t.shape)}{', channels_last' if channels_last else ''}), which must be "
                             "fewer than 2**31; use the cpp or cuda backend")


def bga_forward(detail, semantic, detail_down, semantic_down, channels_last: bool) -> torch.Tensor:
    """All inputs contiguous in the layout `channels_last` names, checked by check_forward_sizes."""
    out = torch.empty_like(detail)
    if out.numel() == 0:
        return out
    H, W, h, w, K = _geometry(detail, semantic, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gated = torch.empty_like(detail_down, dtype=torch.float32, memory_format=fmt)
    _gated_down_kernel[(triton.cdiv(gated.numel(), BLOCK),)](detail_down, semantic_down, gated, gated.numel(),
                                                             BLOCK=BLOCK)
    planes = detail.numel() // (H * W * K)
    row_block = min(BLOCK, triton.next_power_of_2(W * K))
    grid = (triton.cdiv(W * K, row_block), H, min(planes, MAX_GRID_Z))
    _bga_forward_kernel[grid](detail, semantic, gated, out, planes, H, W, h, w, K=K, BLOCK=row_block)
    return out


def bga_backward(grad_out, detail, semantic, detail_down, semantic_down, channels_last: bool):
    """All inputs contiguous in the layout `channels_last` names; returns the four gradients."""
    grad_detail = torch.empty_like(detail)
    grads_low = [torch.empty_like(detail_down) for _ in range(3)]
    total = detail_down.numel()
    if total == 0 or detail.numel() == 0:
        for g in [grad_detail, *grads_low]:
            g.zero_()
        return (grad_detail, *grads_low)
    H, W, h, w, K = _geometry(detail, semantic, channels_last)
    grid = (triton.cdiv(total, BLOCK_BACKWARD),)
    _bga_backward_kernel[grid](
        grad_out, detail, semantic, detail_down, semantic_down, grad_detail, *grads_low,
        total, H, W, h, w, K,
        MAX_ROWS=max_readers(h, H), MAX_COLS=max_readers(w, W), BLOCK=BLOCK_BACKWARD,
    )
    return (grad_detail, *grads_low)
