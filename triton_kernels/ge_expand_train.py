"""Triton kernels of the GE expansion in training (formula and argument contract in
bisenet_fast/ops/ge_expand_train.py). NCHW layout.

Per-channel statistics reduce over N*HO*WO values. Every pass runs on a grid of
(block of BLOCK pixels, output channel): pixel blocks on axis 0, whose limit is 2^31-1.
Each program writes its block's partial sums to a [MID, blocks] buffer and torch reduces
that buffer along the blocks in a fixed order, so results are deterministic (no float
atomics). The batch variance is merged from per-block (sum, sum of squared deviations from
the block mean) with Chan's formula: no cancellation.

forward:  pass 1 computes the conv output z into `out` and the block partials;
          pass 2 normalises `out` in place (+ ReLU).
backward: pass 1 recomputes z from x and reduces sum(dy) and sum(dy * x_hat) (dy masked by
          the ReLU); pass 2 recomputes z, writes dz (the gradient at the conv output) to a
          float32 scratch tensor freed when backward returns, and reduces grad_weight's 9
          taps per block; pass 3 gathers grad_x from dz (grid: input pixel blocks, input channel).
The conv output is never kept between forward and backward; the backward scratch is
transient (one expanded-size float32 tensor while this op's backward runs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bisenet_fast.ops._checks import check_grid_extent

BLOCK = 1024


@triton.jit
def _conv_block(x_ptr, w_ptr, m, n, oh, ow, mask, H, W, CIN: tl.constexpr, RATIO: tl.constexpr, STRIDE: tl.constexpr):
    """z of output channel m at pixels (n, oh, ow): grouped 3x3 conv, padding 1; fp32."""
    c = m // RATIO
    plane = (n * CIN + c) * H
    acc = tl.zeros(oh.shape, dtype=tl.float32)
    for tap in range(9):  # a loop: unrolled, the hoisted gathers spilled on sm_90
        ih = oh * STRIDE + (tap // 3 - 1)
        iw = ow * STRIDE + (tap % 3 - 1)
        valid = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        v = tl.load(x_ptr + (plane + ih) * W + iw, mask=valid, other=0.0)
        acc += v.to(tl.float32) * tl.load(w_ptr + m * 9 + tap).to(tl.float32)
    return acc


@triton.jit
def _plane(H, W):
    """H * W as int64. The sizes are 32-bit arguments (or constants where Triton specialises
    them): their own product would wrap for a plane of 2**31 or more pixels, which the ops
    accept, before it met the 64-bit offsets."""
    return tl.cast(H, tl.int64) * W


@triton.jit
def _split_pixels(offs, HO, WO):
    """(n, oh, ow) of flat NHW positions offs (int64)."""
    return offs // _plane(HO, WO), (offs // WO) % HO, offs % WO


@triton.jit
def _pixels(P, HO, WO, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    n, oh, ow = _split_pixels(offs, HO, WO)
    return offs, mask, n, oh, ow


@triton.jit
def _fwd_conv_stats_kernel(x_ptr, w_ptr, out_ptr, psum_ptr, pm2_ptr, P, H, W, HO, WO,
                           CIN: tl.constexpr, MID: tl.constexpr, RATIO: tl.constexpr, STRIDE: tl.constexpr,
                           BLOCK: tl.constexpr):
    m = tl.program_id(1)
    offs, mask, n, oh, ow = _pixels(P, HO, WO, BLOCK)
    z = _conv_block(x_ptr, w_ptr, m, n, oh, ow, mask, H, W, CIN, RATIO, STRIDE)
    tl.store(out_ptr + (n * MID + m) * _plane(HO, WO) + oh * WO + ow, z.to(out_ptr.dtype.element_ty), mask=mask)
    count = tl.sum(mask.to(tl.float32), axis=0)
    block_sum = tl.sum(tl.where(mask, z, 0.0), axis=0)
    dev = tl.where(mask, z - block_sum / count, 0.0)
    slot = m * tl.num_programs(0) + tl.program_id(0)
    tl.store(psum_ptr + slot, block_sum)
    tl.store(pm2_ptr + slot, tl.sum(dev * dev, axis=0))


@triton.jit
def _fwd_apply_kernel(out_ptr, scale_ptr, shift_ptr, P, HO, WO, MID: tl.constexpr, RELU: tl.constexpr,
                      BLOCK: tl.constexpr):
    m = tl.program_id(1)
    offs, mask, n, oh, ow = _pixels(P, HO, WO, BLOCK)
    ptr = out_ptr + (n * MID + m) * _plane(HO, WO) + oh * WO + ow
    o = tl.load(ptr, mask=mask, other=0.0).to(tl.float32) * tl.load(scale_ptr + m) + tl.load(shift_ptr + m)
    if RELU:
        o = tl.where(o < 0, 0.0, o)  # NaN stays NaN, as torch.relu keeps it (tl.maximum would drop it)
    tl.store(ptr, o.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dy_xhat(grad_ptr, x_ptr, w_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, m, n, oh, ow, mask, H, W, HO, WO,
             CIN: tl.constexpr, MID: tl.constexpr, RATIO: tl.constexpr, STRIDE: tl.constexpr, RELU: tl.constexpr):
    """(dy, x_hat) at the BN output of channel m: dy is grad_out masked by the ReLU."""
    z = _conv_block(x_ptr, w_ptr, m, n, oh, ow, mask, H, W, CIN, RATIO, STRIDE)
    xhat = (z - tl.load(mean_ptr + m)) * tl.load(invstd_ptr + m)
    dy = tl.load(grad_ptr + (n * MID + m) * _plane(HO, WO) + oh * WO + ow, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        # The output the forward wrote, computed and rounded as it did (z stored in the
        # activations' dtype, then scale and shift): the same ReLU mask bit for bit, also
        # where float16/bfloat16 rounding decides whether a value near 0 is clamped.
        dtype = grad_ptr.dtype.element_ty
        o = z.to(dtype).to(tl.float32) * tl.load(scale_ptr + m) + tl.load(shift_ptr + m)
        dy = tl.where(o.to(dtype) <= 0, 0.0, dy)  # torch's relu gradient: a NaN output passes dy
    return tl.where(mask, dy, 0.0), xhat


@triton.jit
def _bwd_stats_kernel(grad_ptr, x_ptr, w_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, pdy_ptr, pdyx_ptr,
                      P, H, W, HO, WO, CIN: tl.constexpr, MID: tl.constexpr, RATIO: tl.constexpr,
                      STRIDE: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(1)
    offs, mask, n, oh, ow = _pixels(P, HO, WO, BLOCK)
    dy, xhat = _dy_xhat(grad_ptr, x_ptr, w_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, m, n, oh, ow, mask,
                        H, W, HO, WO, CIN, MID, RATIO, STRIDE, RELU)
    slot = m * tl.num_programs(0) + tl.program_id(0)
    tl.store(pdy_ptr + slot, tl.sum(dy, axis=0))
    tl.store(pdyx_ptr + slot, tl.sum(dy * xhat, axis=0))


@triton.jit
def _bwd_grad_z_kernel(grad_ptr, x_ptr, w_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, mean_dy_ptr,
                       mean_dyx_ptr, dz_ptr, pgw_ptr, P, H, W, HO, WO, CIN: tl.constexpr, MID: tl.constexpr,
                       RATIO: tl.constexpr, STRIDE: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(1)
    offs, mask, n, oh, ow = _pixels(P, HO, WO, BLOCK)
    dy, xhat = _dy_xhat(grad_ptr, x_ptr, w_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, m, n, oh, ow, mask,
                        H, W, HO, WO, CIN, MID, RATIO, STRIDE, RELU)
    k = tl.load(scale_ptr + m)  # gamma * invstd
    dz = k * (dy - tl.load(mean_dy_ptr + m) - xhat * tl.load(mean_dyx_ptr + m))
    dz = tl.where(mask, dz, 0.0)
    tl.store(dz_ptr + (n * MID + m) * _plane(HO, WO) + oh * WO + ow, dz, mask=mask)
    plane = (n * CIN + m // RATIO) * H
    slot = (m * tl.num_programs(0) + tl.program_id(0)) * 9
    for tap in tl.static_range(9):
        ih = oh * STRIDE + (tap // 3 - 1)
        iw = ow * STRIDE + (tap % 3 - 1)
        valid = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        v = tl.load(x_ptr + (plane + ih) * W + iw, mask=valid, other=0.0).to(tl.float32)
        tl.store(pgw_ptr + slot + tap, tl.sum(dz * v, axis=0))


@triton.jit
def _bwd_grad_x_kernel(dz_ptr, w_ptr, gx_ptr, P_IN, H, W, HO, WO, CIN: tl.constexpr, MID: tl.constexpr,
                       RATIO: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P_IN
    n, ih, iw = _split_pixels(offs, H, W)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for tap in range(9):  # a loop: unrolled, its 9 x RATIO hoisted gathers spilled on sm_90
        # Output pixel (oh, ow) reads input (oh*STRIDE + ky - 1, ow*STRIDE + kx - 1).
        th = ih + 1 - tap // 3
        tw = iw + 1 - tap % 3
        oh = th // STRIDE
        ow = tw // STRIDE
        valid = mask & (th >= 0) & (tw >= 0) & (th % STRIDE == 0) & (tw % STRIDE == 0) & (oh < HO) & (ow < WO)
        for r in tl.static_range(RATIO):
            m = c * RATIO + r
            d = tl.load(dz_ptr + (n * MID + m) * _plane(HO, WO) + oh * WO + ow, mask=valid, other=0.0)
            acc += d * tl.load(w_ptr + m * 9 + tap).to(tl.float32)
    tl.store(gx_ptr + (n * CIN + c) * _plane(H, W) + ih * W + iw, acc.to(gx_ptr.dtype.element_ty), mask=mask)


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"ge_expand_train (triton): x must be float32, float16 or bfloat16, got {x.dtype}")


def _geometry(x, weight, stride):
    n, cin, h, w = x.shape
    mid = weight.shape[0]
    # Every pass gives each expanded channel (each input channel, for grad_x) a grid y index.
    check_grid_extent("ge_expand_train (triton)", mid, f"weight's {mid} expanded channels",
                      "the cpp backend has no such limit")
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    return n, cin, h, w, mid, ho, wo, n * ho * wo


def _block_counts(pixels: int, blocks: int, device) -> torch.Tensor:
    counts = torch.full((blocks,), float(BLOCK), device=device)
    counts[-1] = pixels - BLOCK * (blocks - 1)
    return counts


def _scale_shift(bn_weight, bn_bias, mean, var, eps):
    """BN as out = z * scale + shift (float32), computed alike in forward and backward."""
    scale = bn_weight.float() * torch.rsqrt(var + eps)
    return scale, bn_bias.float() - mean * scale


def ge_expand_train_triton(x, weight, bn_weight, bn_bias, stride, relu, eps):
    _check_dtype(x)
    n, cin, h, w, mid, ho, wo, pixels = _geometry(x, weight, stride)
    x = x.contiguous()
    weight = weight.contiguous()
    out = torch.empty((n, mid, ho, wo), dtype=x.dtype, device=x.device)
    blocks = triton.cdiv(pixels, BLOCK)
    psum = torch.empty((mid, blocks), dtype=torch.float32, device=x.device)
    pm2 = torch.empty_like(psum)
    meta = dict(CIN=cin, MID=mid, RATIO=mid // cin, STRIDE=stride, BLOCK=BLOCK)
    _fwd_conv_stats_kernel[(blocks, mid)](x, weight, out, psum, pm2, pixels, h, w, ho, wo, **meta)
    counts = _block_counts(pixels, blocks, x.device)
    mean = psum.sum(dim=1) / pixels
    var = (pm2.sum(dim=1) + (counts * (psum / counts - mean[:, None]) ** 2).sum(dim=1)) / pixels
    scale, shift = _scale_shift(bn_weight, bn_bias, mean, var, eps)
    _fwd_apply_kernel[(blocks, mid)](out, scale, shift, pixels, ho, wo, MID=mid, RELU=relu, BLOCK=BLOCK)
    return out, mean, var


def ge_expand_train_backward_triton(grad_out, x, weight, bn_weight, bn_bias, mean, var, stride, relu, eps):
    _check_dtype(x)
    n, cin, h, w, mid, ho, wo, pixels = _geometry(x, weight, stride)
    x = x.contiguous()
    weight = weight.contiguous()
    grad_out = grad_out.contiguous()
    mean = mean.float().contiguous()
    invstd = torch.rsqrt(var.float() + eps)
    scale, shift = _scale_shift(bn_weight, bn_bias, mean, var.float(), eps)  # the forward's, bit for bit
    blocks = triton.cdiv(pixels, BLOCK)
    meta = dict(CIN=cin, MID=mid, RATIO=mid // cin, STRIDE=stride, BLOCK=BLOCK)
    pdy = torch.empty((mid, blocks), dtype=torch.float32, device=x.device)
    pdyx = torch.empty_like(pdy)
    _bwd_stats_kernel[(blocks, mid)](grad_out, x, weight, mean, invstd, scale, shift, pdy, pdyx, pixels, h, w, ho, wo,
                                     RELU=relu, **meta)
    sum_dy, sum_dyx = pdy.sum(dim=1), pdyx.sum(dim=1)
    dz = torch.empty((n, mid, ho, wo), dtype=torch.float32, device=x.device)
    pgw = torch.empty((mid, blocks, 9), dtype=torch.float32, device=x.device)
    _bwd_grad_z_kernel[(blocks, mid)](grad_out, x, weight, mean, invstd, scale, shift, sum_dy / pixels,
                                      sum_dyx / pixels, dz, pgw, pixels, h, w, ho, wo, RELU=relu, **meta)
    grad_x = torch.empty((n, cin, h, w), dtype=x.dtype, device=x.device)
    pixels_in = n * h * w
    _bwd_grad_x_kernel[(triton.cdiv(pixels_in, BLOCK), cin)](dz, weight, grad_x, pixels_in, h, w, ho, wo, **meta)
    grad_weight = pgw.sum(dim=1).reshape(weight.shape).to(weight.dtype)
    return grad_x, grad_weight, sum_dyx.to(bn_weight.dtype), sum_dy.to(bn_bias.dtype)
