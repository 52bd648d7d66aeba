"""Triton kernels of the Gather-and-Expansion layer, inference form (formula and argument
contract in bisenet_fast/ops/ge_layer.py).

Each program owns BLOCK_P output pixels (flattened over N*H*W, channels_last) and all
output channels. It walks the expanded channels in chunks of BLOCK_K: computes that chunk
of the grouped 3x3 conv (+ bias, ReLU) in registers and feeds it straight into tl.dot with
the matching slice of the 1x1 projection, so the expanded tensor never reaches global
memory. The residual add and final ReLU are the epilogue.

Stride 2: dw1 needs dw0's output at the 3x3 neighbours of each pixel; Triton has no
indexable shared memory, so each program recomputes dw0 at those nine positions (its halo)
from y, whose reads hit L1/L2. The shortcut's depthwise conv is computed per chunk of input
channels and projected by a second tl.dot into the same accumulator.

float32 dots use 3xTF32 (error ~1e-6 relative, unlike plain TF32's ~1e-3) so the fused model
matches the eager one to 1e-4; IEEE fp32 dots run on FMA units and, compiled for sm_90, asked
for more shared memory than a block may have. float16/bfloat16 feed the tensor cores with
fp32 accumulation. float64 is not supported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_P = 64
BLOCK_K = 32
# No software pipelining of the K loop: its loads are 9-tap gathers (81 for stride 2) that
# hit L1; staging them through shared memory over 3 stages needs ~220 KB per block at fp32.
NUM_STAGES = 1
# 8 warps: with 4, each thread held a quarter of the [BLOCK_P, C] accumulator and of the 9
# gathered [BLOCK_P, BLOCK_K] tiles, and sm_90 builds spilled (up to 450 B per thread for
# stride 1 at 128 channels). With 8 none spills (tests/triton_sm90.py enforces it).
NUM_WARPS = 8


@triton.jit
def _grouped_conv3x3_chunk(src_ptr, w_ptr, b_ptr, n, oh, ow, p_mask, offs_k, k_mask, H, W,
                           C: tl.constexpr, RATIO: tl.constexpr, STRIDE: tl.constexpr):
    """bias + grouped 3x3 conv (padding 1) of NHWC `src` at output pixel (n, oh, ow) for the
    output channels offs_k (channel k reads input channel k // RATIO); fp32 [P, K]."""
    cin = offs_k // RATIO
    acc = tl.zeros([oh.shape[0], offs_k.shape[0]], dtype=tl.float32)
    acc += tl.load(b_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    for tap in tl.static_range(9):
        ih = oh * STRIDE + (tap // 3 - 1)
        iw = ow * STRIDE + (tap % 3 - 1)
        valid = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = (n * H + ih).to(tl.int64) * W + iw
        v = tl.load(src_ptr + pix[:, None] * C + cin[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        wk = tl.load(w_ptr + offs_k * 9 + tap, mask=k_mask, other=0.0)
        acc += v.to(tl.float32) * wk.to(tl.float32)[None, :]
    return acc


@triton.jit
def _project_chunk(acc, e, w_ptr, offs_k, k_mask, offs_o, o_mask, K_TOTAL: tl.constexpr, FP32: tl.constexpr):
    """acc += e @ w[:, offs_k]^T with w (cout, K_TOTAL) row-major in the input dtype."""
    w = tl.load(w_ptr + offs_o[None, :] * K_TOTAL + offs_k[:, None], mask=k_mask[:, None] & o_mask[None, :], other=0.0)
    e = tl.where(k_mask[None, :], e, 0.0).to(w.dtype)
    if FP32:
        return tl.dot(e, w, acc, input_precision="tf32x3")
    return tl.dot(e, w, acc)


@triton.jit
def _ge_stride1_kernel(x_ptr, y_ptr, dw_w_ptr, dw_b_ptr, pw_w_ptr, pw_b_ptr, out_ptr, P, H, W,
                       C: tl.constexpr, MID: tl.constexpr, RATIO: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, FP32: tl.constexpr):
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    ow = offs_p % W
    oh = (offs_p // W) % H
    n = offs_p // (H * W)
    offs_o = tl.arange(0, BLOCK_C)
    o_mask = offs_o < C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, MID, BLOCK_K):  # a loop, not unrolled: MID reaches 768
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < MID
        e = _grouped_conv3x3_chunk(y_ptr, dw_w_ptr, dw_b_ptr, n, oh, ow, p_mask, offs_k, k_mask, H, W, C, RATIO, 1)
        acc = _project_chunk(acc, tl.maximum(e, 0.0), pw_w_ptr, offs_k, k_mask, offs_o, o_mask, MID, FP32)
    acc += tl.load(pw_b_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    io_mask = p_mask[:, None] & o_mask[None, :]
    io = offs_p[:, None] * C + offs_o[None, :]
    acc += tl.load(x_ptr + io, mask=io_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + io, tl.maximum(acc, 0.0).to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _ge_stride2_kernel(x_ptr, y_ptr, dw0_w_ptr, dw0_b_ptr, dw1_w_ptr, dw1_b_ptr, pw_w_ptr, pw_b_ptr,
                       sc_dw_w_ptr, sc_dw_b_ptr, sc_pw_w_ptr, sc_pw_b_ptr, out_ptr, P, H, W, HO, WO,
                       C: tl.constexpr, COUT: tl.constexpr, MID: tl.constexpr, RATIO: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, FP32: tl.constexpr):
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    ow = offs_p % WO
    oh = (offs_p // WO) % HO
    n = offs_p // (HO * WO)
    offs_o = tl.arange(0, BLOCK_C)
    o_mask = offs_o < COUT
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, MID, BLOCK_K):  # a loop, not unrolled: MID reaches 768
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < MID
        e = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
        e += tl.load(dw1_b_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        # A loop, not unrolled: unrolled, the compiler hoisted all 81 gathers of y and
        # spilled ~10 KiB per thread on sm_90 (the H200 timed the layer at 0.1-0.5x eager).
        for tap in range(9):
            qh = oh + (tap // 3 - 1)
            qw = ow + (tap % 3 - 1)
            inside = p_mask & (qh >= 0) & (qh < HO) & (qw >= 0) & (qw < WO)
            first = _grouped_conv3x3_chunk(y_ptr, dw0_w_ptr, dw0_b_ptr, n, qh, qw, inside, offs_k, k_mask, H, W, C, RATIO, 2)
            first = tl.where(inside[:, None], first, 0.0)  # dw1's zero padding
            wk = tl.load(dw1_w_ptr + offs_k * 9 + tap, mask=k_mask, other=0.0).to(tl.float32)
            e += first * wk[None, :]
        acc = _project_chunk(acc, tl.maximum(e, 0.0), pw_w_ptr, offs_k, k_mask, offs_o, o_mask, MID, FP32)
    for c0 in range(0, C, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        c_mask = offs_c < C
        s = _grouped_conv3x3_chunk(x_ptr, sc_dw_w_ptr, sc_dw_b_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C, 1, 2)
        acc = _project_chunk(acc, s, sc_pw_w_ptr, offs_c, c_mask, offs_o, o_mask, C, FP32)
    acc += tl.load(pw_b_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(sc_pw_b_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    io_mask = p_mask[:, None] & o_mask[None, :]
    tl.store(out_ptr + offs_p[:, None] * COUT + offs_o[None, :], tl.maximum(acc, 0.0).to(out_ptr.dtype.element_ty),
             mask=io_mask)


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"ge_layer (triton): x must be float32, float16 or bfloat16, got {x.dtype}")


def _block_c(channels: int) -> int:
    return max(16, triton.next_power_of_2(channels))  # tl.dot needs every dim >= 16


def ge_layer_stride1_triton(x, y, dw_weight, dw_bias, pw_weight, pw_bias):
    _check_dtype(x)
    n, c, h, w = x.shape
    mid = dw_weight.shape[0]
    x = x.contiguous(memory_format=torch.channels_last)
    y = y.contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    pixels = n * h * w
    grid = (triton.cdiv(pixels, BLOCK_P),)
    _ge_stride1_kernel[grid](
        x, y, dw_weight.contiguous(), dw_bias.contiguous(), pw_weight.contiguous(), pw_bias.contiguous(), out,
        pixels, h, w, C=c, MID=mid, RATIO=mid // c, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, BLOCK_C=_block_c(c),
        FP32=x.dtype == torch.float32, num_stages=NUM_STAGES, num_warps=NUM_WARPS,
    )
    return out


def ge_layer_stride2_triton(x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias,
                            sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias):
    _check_dtype(x)
    n, c, h, w = x.shape
    mid, cout = dw0_weight.shape[0], pw_weight.shape[0]
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    x = x.contiguous(memory_format=torch.channels_last)
    y = y.contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, cout, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    pixels = n * ho * wo
    grid = (triton.cdiv(pixels, BLOCK_P),)
    _ge_stride2_kernel[grid](
        x, y, dw0_weight.contiguous(), dw0_bias.contiguous(), dw1_weight.contiguous(), dw1_bias.contiguous(),
        pw_weight.contiguous(), pw_bias.contiguous(), sc_dw_weight.contiguous(), sc_dw_bias.contiguous(),
        sc_pw_weight.contiguous(), sc_pw_bias.contiguous(), out, pixels, h, w, ho, wo,
        C=c, COUT=cout, MID=mid, RATIO=mid // c, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, BLOCK_C=_block_c(cout),
        FP32=x.dtype == torch.float32, num_stages=NUM_STAGES, num_warps=NUM_WARPS,
    )
    return out
