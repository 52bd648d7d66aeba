"""Triton kernels of the OHEM cross-entropy with in-kernel bilinear upsampling.

Forward: one program per segment of an output row computes the C upsampled logits of its
pixels from the four head-resolution taps (never stored at (N, C, H, W)), their logsumexp,
the cross-entropy and the ground-truth probability, and writes per-program counts and sums
(reduced afterwards in a fixed order: deterministic). The k-th probability is needed only
when fewer than k+1 valid probabilities are <= thresh; it is then found by an exact radix
select over the probabilities' float bits (non-negative floats order as their bit
patterns): three passes of per-program histograms of 11, 11 and 10 bits (tl.histogram,
added into one global histogram with integer atomics, so the counts do not depend on
order), each narrowing the prefix on the device without a host synchronisation.
torch.kthvalue, used before, selects a single 4M-value slice with one thread block and
took ~19 ms on an H200.

Backward, as a gather (no float atomics, deterministic): one program per (head row, tile of
head columns) walks the output rows that read its head row; for each segment of such a row
it recomputes the softmax gradient (softmax - onehot at kept pixels, 0 elsewhere) of the C
classes and reduces it along x into the tile's head columns with one tl.dot against the
segment's bilinear weight matrix (two non-zeros per output column), scaled by the row's
weight. Each output pixel's softmax is thus recomputed about twice (once per head row it
reads), not once per head pixel and class it reads.

Register budget: the backward holds a (BLOCK_C, BLOCK_X) tile of logits, softmax and
gradient plus the dot's operands in registers. Compiled for sm_90 at C=19 with 128-pixel
segments, 3xTF32 dots and 64-bit addresses per element it needed 255 registers and a
1.8 KiB stack of spills per thread, and an H200 timed the Triton loss at 28 ms at the
decode head's training shape, where the gather it replaced had taken 10.6 ms.
Hence 64-pixel segments, an exact fp32 (FMA) dot, 32-bit offsets inside one image and one
pipeline stage: 192 registers, no spills (tests/triton_sm90.py fails this kernel if it spills).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from bisenet_fast.ops._checks import check_grid_extent, check_image_fits_int32
from bisenet_fast.ops.ohem_cross_entropy import check_target_labels
from bisenet_fast.triton_kernels.bilinear import linear_scale, linear_tap


@triton.jit
def _upsampled_logits(logits_ptr, n, y, x, mask, C, h, w, scale_h, scale_w, BLOCK_C: tl.constexpr):
    """z[c, lane] of output row y, columns x (one per lane); -inf for padding classes."""
    c = tl.arange(0, BLOCK_C)[:, None]
    cmask = c < C
    yi0, yi1, wy0, wy1 = linear_tap(y, h, scale_h)
    xi0, xi1, wx0, wx1 = linear_tap(x, w, scale_w)
    image = logits_ptr + n.to(tl.int64) * C * h * w  # then 32-bit offsets: _check_image_size
    row0 = c * (h * w) + yi0 * w
    row1 = c * (h * w) + yi1 * w
    m = cmask & mask[None, :]
    a = tl.load(image + row0 + xi0[None, :], mask=m, other=0.0)
    b = tl.load(image + row0 + xi1[None, :], mask=m, other=0.0)
    d = tl.load(image + row1 + xi0[None, :], mask=m, other=0.0)
    e = tl.load(image + row1 + xi1[None, :], mask=m, other=0.0)
    wx0 = wx0[None, :]
    wx1 = wx1[None, :]
    z = wy0 * (wx0 * a + wx1 * b) + wy1 * (wx0 * d + wx1 * e)
    return tl.where(cmask, z, float("-inf"))


@triton.jit
def _kept(p, threshold):
    """ohem_kept of common/ohem_math.h: p < threshold, and a NaN p (from a NaN or infinite
    logit) counts as kept so that its NaN reaches the loss and the gradient, as in the
    reference (CE * weight is NaN even at weight 0)."""
    return (p >= threshold) == 0


@triton.jit
def _forward_kernel(logits_ptr, target_ptr, prob_ptr, ce_ptr, counts_ptr, sums_ptr,
                    C, h, w, H, W, scale_h, scale_w, thresh, ignore_index,
                    BLOCK_C: tl.constexpr, BLOCK_X: tl.constexpr):
    row = tl.program_id(0)  # n * H + y
    seg = tl.program_id(1)
    n = row // H
    y = row % H
    x = seg * BLOCK_X + tl.arange(0, BLOCK_X)
    mask = x < W
    z = _upsampled_logits(logits_ptr, n, y, x, mask, C, h, w, scale_h, scale_w, BLOCK_C)
    zmax = tl.max(z, axis=0)
    sumexp = tl.sum(tl.exp(z - zmax[None, :]), axis=0)
    pix = row.to(tl.int64) * W + x
    label = tl.load(target_ptr + pix, mask=mask, other=0).to(tl.int64)
    valid = mask & (label != ignore_index)
    bad = valid & ((label < 0) | (label >= C))
    good = valid & (label >= 0) & (label < C)
    c = tl.arange(0, BLOCK_C)[:, None]
    z_gt = tl.sum(tl.where(c == label[None, :], z, 0.0), axis=0)
    ce = zmax + tl.log(sumexp) - z_gt
    p = tl.exp(z_gt - zmax) / sumexp
    tl.store(prob_ptr + pix, tl.where(good, p, float("inf")), mask=mask)
    tl.store(ce_ptr + pix, tl.where(good, ce, 0.0), mask=mask)
    program = row.to(tl.int64) * tl.num_programs(1) + seg
    tl.store(counts_ptr + program * 3 + 0, tl.sum(good.to(tl.int32), axis=0))
    tl.store(counts_ptr + program * 3 + 1, tl.sum((good & (p <= thresh)).to(tl.int32), axis=0))
    tl.store(counts_ptr + program * 3 + 2, tl.sum(bad.to(tl.int32), axis=0))
    tl.store(sums_ptr + program * 2 + 0, tl.sum(tl.where(good, ce, 0.0), axis=0))
    tl.store(sums_ptr + program * 2 + 1, tl.sum(tl.where(good & _kept(p, thresh), ce, 0.0), axis=0))


@triton.jit
def _backward_kernel(logits_ptr, target_ptr, threshold_ptr, coef_ptr, grad_ptr,
                     C, h, w, H, W, scale_h, scale_w, ratio_h, ratio_w, ignore_index, x_span,
                     BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_X: tl.constexpr, Y_SPAN: tl.constexpr):
    """grad[n, :, i, j] = sum over output pixels (y, x) reading head pixel (i, j) of
    wy * wx * (softmax - onehot) at kept pixels, times grad_loss / (N*H*W)."""
    row = tl.program_id(0)  # n * h + i
    n = row // h
    i = row % h
    j_begin = tl.program_id(1) * BLOCK_J
    j = j_begin + tl.arange(0, BLOCK_J)
    c = tl.arange(0, BLOCK_C)[:, None]
    threshold = tl.load(threshold_ptr)
    # Windows of output indices that can read head row i (resp. the tile's columns): the
    # readers of source index s have s - 1 <= src < s + 1; the weights below are exact (0
    # outside the readers), so the windows only have to contain them.
    y_lo = tl.maximum(((i.to(tl.float32) - 0.5) * ratio_h - 0.5).to(tl.int32) - 1, 0)
    x_lo = tl.maximum(((j_begin.to(tl.float32) - 0.5) * ratio_w - 0.5).to(tl.int32) - 1, 0)
    acc = tl.zeros((BLOCK_C, BLOCK_J), dtype=tl.float32)
    for dy in range(Y_SPAN):
        y = y_lo + dy
        yi0, yi1, wy0, wy1 = linear_tap(y, h, scale_h)
        wy = tl.where(yi0 == i, wy0, 0.0) + tl.where(yi1 == i, wy1, 0.0)
        # A row that reads head row i with weight 0 still counts: its gradient times 0 adds
        # nothing when finite, but a NaN (from a non-finite logit) must reach row i as
        # 0 * NaN does in the reference.
        if ((yi0 == i) | (yi1 == i)) & (y < H):
            for x_start in range(0, x_span, BLOCK_X):
                x = x_lo + x_start + tl.arange(0, BLOCK_X)
                mask = x < W
                # The forward's arithmetic on a block of the same shape, so that both agree
                # on which pixels are kept.
                z = _upsampled_logits(logits_ptr, n, y, x, mask, C, h, w, scale_h, scale_w, BLOCK_C)
                zmax = tl.max(z, axis=0)
                e = tl.exp(z - zmax[None, :])
                sumexp = tl.sum(e, axis=0)
                pix = (n.to(tl.int64) * H + y) * W + x
                label = tl.load(target_ptr + pix, mask=mask, other=0).to(tl.int64)
                good = mask & (label != ignore_index) & (label >= 0) & (label < C)
                is_gt = c == label[None, :]
                z_gt = tl.sum(tl.where(is_gt, z, 0.0), axis=0)
                kept = good & _kept(tl.exp(z_gt - zmax) / sumexp, threshold)
                dz = tl.where(kept[None, :] & (c < C), e / sumexp[None, :] - is_gt.to(tl.float32), 0.0)
                # (BLOCK_X, BLOCK_J) bilinear weights of the segment's columns, times wy.
                xi0, xi1, wx0, wx1 = linear_tap(x, w, scale_w)
                weights = tl.where(xi0[:, None] == j[None, :], wx0[:, None], 0.0)
                weights += tl.where(xi1[:, None] == j[None, :], wx1[:, None], 0.0)
                weights = tl.where(mask[:, None], weights * wy, 0.0)
                # Exact fp32: tf32x3 splits both operands and spills (module docstring).
                acc = tl.dot(dz, weights, acc, input_precision="ieee")
    coef = tl.load(coef_ptr)
    out = grad_ptr + ((n.to(tl.int64) * C + c) * h + i) * w + j[None, :]
    tl.store(out, acc * coef, mask=(c < C) & (j < w)[None, :])


def _blocks(num_classes: int, width: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_X) of a row segment, the same in forward and backward: the backward
    recomputes which pixels are kept, and only the same block shape (hence the same
    reduction order over the classes) gives bit-identical probabilities. BLOCK_C >= 16
    because the backward feeds it to tl.dot; BLOCK_C * BLOCK_X <= 2048 keeps the backward's
    tiles in registers (module docstring)."""
    block_c = max(16, triton.next_power_of_2(num_classes))
    return block_c, max(16, min(triton.next_power_of_2(width), 2048 // block_c))


# Software-pipelining depth of the backward's loops. Each stage buffers the gathered logits
# of a segment in shared memory and keeps more of them live in registers: at C=19 on sm_90,
# two stages take 48 KiB and spill, one takes 16 KiB and 192 registers (tests/triton_sm90.py).
BACKWARD_STAGES = 1
SELECT_BITS = (11, 11, 10)  # digits of the 32-bit keys, most significant first
SELECT_BLOCK = 4096
# 8 warps, 16 keys per thread: with 4 (32 keys each), triton 3.6's sm_86 build spilled.
SELECT_WARPS = 8


@triton.jit(do_not_specialize=["count"])
def _select_histogram_kernel(prob_ptr, count, prefix_ptr, hist_ptr,
                             SHIFT: tl.constexpr, BITS: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """hist[d] += #{keys whose bits above SHIFT + BITS equal *prefix and whose next BITS bits are d}."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < count
    key = tl.load(prob_ptr + offs, mask=mask, other=float("inf")).to(tl.int32, bitcast=True)
    if not FIRST:
        mask = mask & ((key >> (SHIFT + BITS)) == tl.load(prefix_ptr))
    digit = (key >> SHIFT) & ((1 << BITS) - 1)
    counts = tl.histogram(digit, 1 << BITS, mask=mask)
    # Only the bins this block hit: after the first pass the keys share a prefix and fall
    # into a few bins, and adding zeros to the others would cost 2048 atomics per block.
    tl.atomic_add(hist_ptr + tl.arange(0, 1 << BITS), counts, mask=counts > 0)


def _kth_smallest(prob: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (0-indexed) of the non-negative float32 values `prob`, as a 0-d
    tensor on their device, without a sort and without a host synchronisation."""
    device = prob.device
    prefix = torch.zeros(1, device=device, dtype=torch.int32)
    rank = torch.full((1,), k, device=device, dtype=torch.int64)
    shift = 32
    for i, bits in enumerate(SELECT_BITS):
        shift -= bits
        hist = torch.zeros(1 << bits, device=device, dtype=torch.int32)
        _select_histogram_kernel[(triton.cdiv(prob.numel(), SELECT_BLOCK),)](
            prob, prob.numel(), prefix, hist, SHIFT=shift, BITS=bits, FIRST=i == 0, BLOCK=SELECT_BLOCK,
            num_warps=SELECT_WARPS)
        below = torch.cumsum(hist, 0, dtype=torch.int64)
        digit = torch.searchsorted(below, rank, right=True)  # the bin holding the rank-th key
        rank = rank - torch.where(digit > 0, below[(digit - 1).clamp_min(0)], 0)
        prefix = (prefix << bits) | digit.to(torch.int32)
    return prefix.view(torch.float32).reshape(())


def _check_image_size(logits: torch.Tensor, target: torch.Tensor) -> None:
    """32-bit offsets within one image: 64-bit ones cost registers the backward does not have
    (module docstring). The row segments of the forward (of target) and of the backward (of
    logits) take the grid's y axis."""
    op, instead = "ohem_cross_entropy (triton)", "the cpp and cuda backends have no such limit"
    check_image_fits_int32(op, "logits", logits, instead)
    C, w = logits.shape[1], logits.shape[3]
    W = target.shape[2]
    check_grid_extent(op, triton.cdiv(W, _blocks(C, W)[1]), f"target's width {W} at {C} classes", instead)
    check_grid_extent(op, triton.cdiv(w, _backward_block_j(w)), f"logits' width {w}", instead)


def _backward_block_j(w: int) -> int:
    return max(16, min(triton.next_power_of_2(w), 32))


def forward(logits, target, thresh, min_kept, ignore_index):
    _check_image_size(logits, target)
    head = logits.to(torch.float32).contiguous()
    target = target.contiguous()
    N, C, h, w = head.shape
    H, W = target.shape[1:]
    prob = torch.empty(N * H * W, device=head.device, dtype=torch.float32)
    ce = torch.empty_like(prob)
    block_c, block_x = _blocks(C, W)
    grid = (N * H, triton.cdiv(W, block_x))
    programs = grid[0] * grid[1]
    counts = torch.empty((programs, 3), device=head.device, dtype=torch.int32)
    sums = torch.empty((programs, 2), device=head.device, dtype=torch.float32)
    thresh32 = math.inf if thresh is None else float(np.float32(thresh))
    _forward_kernel[grid](
        head, target, prob, ce, counts, sums, C, h, w, H, W, linear_scale(h, H), linear_scale(w, W), thresh32, ignore_index,
        BLOCK_C=block_c, BLOCK_X=block_x,
    )
    n_valid, n_le_thresh, n_bad = counts.sum(0, dtype=torch.int64).tolist()  # the one sync
    if n_bad:
        check_target_labels(C, target, ignore_index)  # finds and names the first bad label
    threshold = torch.full((), thresh32, device=head.device, dtype=torch.float32)  # a fill: no host copy, no sync
    loss_sum = sums[:, 0 if thresh is None else 1].sum(dtype=torch.float64)
    if thresh is not None and n_valid > 0:
        k = min(min_kept * N, n_valid - 1)
        if n_le_thresh < k + 1:
            # Ignored pixels hold +inf, above every valid probability, and k < n_valid.
            threshold = _kth_smallest(prob, k)
            loss_sum = torch.where(~(prob >= threshold), ce, 0.0).sum(dtype=torch.float64)  # as _kept
    loss = (loss_sum / (N * H * W)).to(torch.float32)
    return loss, threshold


def backward(grad_loss, logits, target, threshold, ignore_index):
    _check_image_size(logits, target)
    head = logits.to(torch.float32).contiguous()
    target = target.contiguous()
    N, C, h, w = head.shape
    H, W = target.shape[1:]
    block_c, block_x = _blocks(C, W)  # the padding classes are zeroed in dz
    block_j = _backward_block_j(w)
    coef = (grad_loss.to(torch.float32) / (N * H * W)).reshape(1)
    grad = torch.empty_like(head)
    ratio_h, ratio_w = H / h, W / w
    _backward_kernel[(N * h, triton.cdiv(w, block_j))](
        head, target, threshold.to(torch.float32).reshape(1), coef, grad, C, h, w, H, W, linear_scale(h, H), linear_scale(w, W),
        ratio_h, ratio_w, ignore_index, math.ceil((block_j + 1) * ratio_w) + 3,
        BLOCK_C=block_c, BLOCK_J=block_j, BLOCK_X=block_x, Y_SPAN=math.ceil(2 * ratio_h) + 3,
        num_stages=BACKWARD_STAGES,
    )
    return grad.to(logits.dtype)
