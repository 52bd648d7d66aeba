"""Triton kernels of the Gather-and-Expansion layer, inference form (formula and argument
contract in bisenet_fast/ops/ge_layer.py).

The main kernel's program owns BLOCK_P output pixels (flattened over N*H*W, channels_last)
and all output channels. It walks the expanded channels in chunks of BLOCK_K: computes that
chunk of a 3x3 grouped/depthwise conv (+ bias, ReLU) in registers and feeds it straight into
tl.dot with the matching slice of the 1x1 projection, so that conv's output never reaches
global memory. The residual add (stride 1) or the shortcut branch (stride 2: depthwise conv
of x, projected by a second tl.dot into the same accumulator) and the final ReLU are the
epilogue.

Stride 2 runs its first conv (grouped, stride 2, cin -> mid) as a kernel of its own that
writes the half-resolution expanded tensor once; the main kernel then reads it through the
depthwise conv dw1. Computing dw0 inside the main kernel instead (Triton has no indexable
shared memory, so at the 9 neighbours of every pixel: 81 gathers per expanded value) was
measured on an H200 at 2.6-27x slower than eager PyTorch (benchmarks/results/2026-11-27-h200-run3).

BLOCK_P shrinks to 16 where 64-pixel blocks would leave SMs idle: the deep layers have only
2048 output pixels at 1024x2048, 32 programs of 64 for an H200's 132 SMs.

float32 dots use 3xTF32 (error ~1e-6 relative, unlike plain TF32's ~1e-3) so the fused model
matches the eager one to 1e-4; IEEE fp32 dots run on FMA units and, compiled for sm_90, asked
for more shared memory than a block may have. float16/bfloat16 feed the tensor cores with
fp32 accumulation. float64 is not supported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bisenet_fast.triton_kernels.ge_expand_train import _pixels  # (offsets, mask, n, oh, ow) of a pixel block

BLOCK_P = 64
SMALL_BLOCK_P = 16  # tl.dot's smallest M
BLOCK_K = 32
# No software pipelining of the K loop: its loads are 9-tap gathers that hit L1; staging
# them through shared memory over 3 stages needs ~220 KB per block at fp32.
NUM_STAGES = 1
# 8 warps: with 4, each thread held a quarter of the [BLOCK_P, C] accumulator and of the 9
# gathered [BLOCK_P, BLOCK_K] tiles, and sm_90 builds spilled (up to 450 B per thread for
# stride 1 at 128 channels). With 8 none spills (tests/triton_sm90.py enforces it).
NUM_WARPS = 8
# The interpreter has no SMs; with this count the tests' small images take the 16-pixel
# blocks and their larger ones the 64-pixel blocks.
INTERPRETER_SMS = 4


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
def _expand_and_project(acc, src_ptr, dw_w_ptr, dw_b_ptr, pw_w_ptr, n, oh, ow, p_mask, offs_o, o_mask, H, W,
                        C: tl.constexpr, MID: tl.constexpr, RATIO: tl.constexpr,
                        BLOCK_K: tl.constexpr, FP32: tl.constexpr):
    """acc += pw(relu(dw(src))) at output pixels (n, oh, ow): the 3x3 stride-1 conv dw
    (C -> MID channels, channel m reading m // RATIO) in chunks of BLOCK_K channels."""
    for k0 in range(0, MID, BLOCK_K):  # a loop, not unrolled: MID reaches 768
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < MID
        e = _grouped_conv3x3_chunk(src_ptr, dw_w_ptr, dw_b_ptr, n, oh, ow, p_mask, offs_k, k_mask, H, W, C, RATIO, 1)
        acc = _project_chunk(acc, tl.maximum(e, 0.0), pw_w_ptr, offs_k, k_mask, offs_o, o_mask, MID, FP32)
    return acc


@triton.jit
def _ge_stride1_kernel(x_ptr, y_ptr, dw_w_ptr, dw_b_ptr, pw_w_ptr, pw_b_ptr, out_ptr, P, H, W,
                       C: tl.constexpr, MID: tl.constexpr, RATIO: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, FP32: tl.constexpr):
    offs_p, p_mask, n, oh, ow = _pixels(P, H, W, BLOCK_P)
    offs_o = tl.arange(0, BLOCK_C)
    o_mask = offs_o < C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc = _expand_and_project(acc, y_ptr, dw_w_ptr, dw_b_ptr, pw_w_ptr, n, oh, ow, p_mask, offs_o, o_mask, H, W,
                              C, MID, RATIO, BLOCK_K, FP32)
    acc += tl.load(pw_b_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    io_mask = p_mask[:, None] & o_mask[None, :]
    io = offs_p[:, None] * C + offs_o[None, :]
    acc += tl.load(x_ptr + io, mask=io_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + io, tl.maximum(acc, 0.0).to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _expand_stride2_kernel(y_ptr, w_ptr, b_ptr, e_ptr, P, H, W, HO, WO, C: tl.constexpr, MID: tl.constexpr,
                           RATIO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """e = dw0(y): the grouped 3x3 stride-2 conv with its bias, NHWC, one chunk of channels."""
    offs_p, p_mask, n, oh, ow = _pixels(P, HO, WO, BLOCK_P)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < MID
    e = _grouped_conv3x3_chunk(y_ptr, w_ptr, b_ptr, n, oh, ow, p_mask, offs_k, k_mask, H, W, C, RATIO, 2)
    tl.store(e_ptr + offs_p[:, None] * MID + offs_k[None, :], e.to(e_ptr.dtype.element_ty),
             mask=p_mask[:, None] & k_mask[None, :])


@triton.jit
def _ge_stride2_kernel(x_ptr, e_ptr, dw1_w_ptr, dw1_b_ptr, pw_w_ptr, pw_b_ptr,
                       sc_dw_w_ptr, sc_dw_b_ptr, sc_pw_w_ptr, sc_pw_b_ptr, out_ptr, P, H, W, HO, WO,
                       C: tl.constexpr, COUT: tl.constexpr, MID: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, FP32: tl.constexpr):
    offs_p, p_mask, n, oh, ow = _pixels(P, HO, WO, BLOCK_P)
    offs_o = tl.arange(0, BLOCK_C)
    o_mask = offs_o < COUT
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc = _expand_and_project(acc, e_ptr, dw1_w_ptr, dw1_b_ptr, pw_w_ptr, n, oh, ow, p_mask, offs_o, o_mask, HO, WO,
                              MID, MID, 1, BLOCK_K, FP32)
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


def _block_p(pixels: int, device: torch.device) -> int:
    """64-pixel blocks where they give every SM two programs, else 16-pixel ones."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else INTERPRETER_SMS
    return BLOCK_P if triton.cdiv(pixels, BLOCK_P) >= 2 * sms else SMALL_BLOCK_P


def ge_layer_stride1_triton(x, y, dw_weight, dw_bias, pw_weight, pw_bias):
    _check_dtype(x)
    n, c, h, w = x.shape
    mid = dw_weight.shape[0]
    x = x.contiguous(memory_format=torch.channels_last)
    y = y.contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    pixels = n * h * w
    block_p = _block_p(pixels, x.device)
    _ge_stride1_kernel[(triton.cdiv(pixels, block_p),)](
        x, y, dw_weight.contiguous(), dw_bias.contiguous(), pw_weight.contiguous(), pw_bias.contiguous(), out,
        pixels, h, w, C=c, MID=mid, RATIO=mid // c, BLOCK_P=block_p, BLOCK_K=BLOCK_K, BLOCK_C=_block_c(c),
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
    expanded = torch.empty((n, mid, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    pixels = n * ho * wo
    _expand_stride2_kernel[(triton.cdiv(pixels, BLOCK_P), triton.cdiv(mid, BLOCK_K))](
        y, dw0_weight.contiguous(), dw0_bias.contiguous(), expanded, pixels, h, w, ho, wo,
        C=c, MID=mid, RATIO=mid // c, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS,
    )
    block_p = _block_p(pixels, x.device)
    _ge_stride2_kernel[(triton.cdiv(pixels, block_p),)](
        x, expanded, dw1_weight.contiguous(), dw1_bias.contiguous(), pw_weight.contiguous(), pw_bias.contiguous(),
        sc_dw_weight.contiguous(), sc_dw_bias.contiguous(), sc_pw_weight.contiguous(), sc_pw_bias.contiguous(), out,
        pixels, h, w, ho, wo, C=c, COUT=cout, MID=mid, BLOCK_P=block_p, BLOCK_K=BLOCK_K, BLOCK_C=_block_c(cout),
        FP32=x.dtype == torch.float32, num_stages=NUM_STAGES, num_warps=NUM_WARPS,
    )
    return out
