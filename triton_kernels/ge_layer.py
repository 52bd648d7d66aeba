"""Triton kernels of the Gather-and-Expansion layer, inference form (formula and argument
contract in bisenet_fast/ops/ge_layer.py).

The main kernel's program owns BLOCK_P output pixels (flattened over N*H*W, channels_last)
and all output channels. It walks the expanded channels in chunks: computes each chunk of a
3x3 grouped/depthwise conv (+ bias, ReLU) in registers and feeds it straight into tl.dot
with the matching rows of the 1x1 projection, so that conv's output never reaches global
memory. The residual add (stride 1) or the shortcut branch (stride 2: depthwise conv of x,
projected by a second tl.dot into the same accumulator) and the final ReLU are the epilogue.

Weights come packed (bisenet_fast.ops.ge_layer.pack_triton_*): expanded channel m = c*R + r
(R = mid // cin, input channel c, as PyTorch's grouped conv orders them) is stored at
position r*C + c, depthwise weights as [9, mid] and projections as [mid, cout]. A chunk of
expanded channels is then BLOCK_CIN consecutive input channels for one r: its 3x3
neighbourhood is 9 vector loads of contiguous NHWC channels, loaded once and reused for all
R values of r, and its weights are contiguous rows. The first version gathered each expanded
channel's input channel m // R separately: ~80 scalar loads per thread per 32 expanded
channels in its sm_90 build, issued a few at a time. On an H200 its kernel time divided by
its chunk count came to ~11 us per chunk in every layer, and it ran 3-27x slower than eager
PyTorch (benchmarks/results/2026-11-27-h200-run3); this layout needs ~1/8 of the load
instructions of that build (GPU speed not yet measured).

Stride 2 runs its first conv (grouped, stride 2, cin -> mid) as a kernel of its own that
writes the half-resolution expanded tensor once (in the packed channel order); the main
kernel then reads it through the depthwise conv dw1. Computing dw0 inside the main kernel
instead (Triton has no indexable shared memory, so at the 9 neighbours of every pixel: 81
gathers per expanded value) was measured 2.6-27x slower than eager PyTorch (same results).

BLOCK_P shrinks to 16 where 64-pixel blocks would leave SMs idle: the deep layers have only
2048 output pixels at 1024x2048, 32 programs of 64 for an H200's 132 SMs. Where even
16-pixel blocks leave fewer than two programs per SM (those layers: 128 blocks, each
walking 384-768 expanded channels alone), the K loop is split too (split-K): program
(block, s) sums every K_SPLITS-th item of it (value r of the expansion for stride 1, chunk
of expanded and of shortcut channels for stride 2) into float32 partial sums, and
_sum_partials_kernel adds them in split order, then the epilogue. The sum's order is fixed,
so the result stays deterministic.

float32 dots run in TF32 where cuDNN's convs may use it (bisenet_fast._C.cudnn_conv_allows_tf32;
PyTorch's default: the eager layer's convs round alike), else in 3xTF32 (error ~1e-6
relative, so the fused model matches the eager one to 1e-4); IEEE fp32 dots run on FMA
units and, compiled for sm_90, asked for more shared memory than a block may have.
float16/bfloat16 feed the tensor cores with fp32 accumulation. float64 is not supported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bisenet_fast._C import cudnn_conv_allows_tf32
from bisenet_fast.triton_kernels.ge_expand_train import _pixels  # (offsets, mask, n, oh, ow) of a pixel block
from bisenet_fast.triton_kernels.interpreter import needs_fp32_dot

BLOCK_P = 64
SMALL_BLOCK_P = 16  # tl.dot's smallest M
# Channels per 3x3 neighbourhood (input channels of a stride-1 chunk, expanded channels of
# dw1): its 9 tiles stay in registers while they serve the chunk's R expanded channels. 16,
# tl.dot's smallest K (triton 3.6 asks it of float32 too); with 32, sm_86 float16 builds of
# the 64-pixel blocks spilled up to 650 B per thread. float32 builds for sm_86 still spill
# (16 B to ~650 B per thread, most at the network's channel counts with 3xTF32): float16 and
# bfloat16 are the fused model's fast dtypes there, and every sm_90 build is spill-free.
BLOCK_CIN = 16
# No software pipelining of the K loop: its loads are 3x3 neighbourhoods that feed FMAs,
# not tl.dot, so the pipeliner could only stage them through shared memory.
NUM_STAGES = 1
# Warps of a 64-pixel block. Its dots tile the [64, C] accumulator over the warps, and each
# warp computes the expanded (A operand) rows of its tile: with 4 warps (sm_90: wgmma,
# warpsPerCTA [4, 1]) each expanded value is computed once, with 8 ([4, 2]) twice (the
# sm_90 SASS of the 32->32 layer: 72 FMAs per thread and chunk either way, over half the
# threads). 4 warps hold twice the accumulator per thread: float16/bfloat16 builds up to 64
# output channels fit in registers; float32 ones (TF32 and 3xTF32 dots) and 128 channels
# spilled (16-704 B per thread), so those keep 8 warps. 16-pixel blocks take 4: their dots
# split the output channels over the warps, each holding all 16 rows of the chunk.
NUM_WARPS = 8
HALF_NARROW_WARPS = 4  # 16-bit dtypes, at most HALF_NARROW_OUTPUT output channels
HALF_NARROW_OUTPUT = 64
SMALL_BLOCK_WARPS = 4
# Without a register limit, ptxas capped some builds at 96 or 128 registers and spilled;
# one program per SM may use them all (tests/triton_sm90.py fails on any spill).
MAX_REGISTERS = 255
# The interpreter has no SMs; with this count the tests' small images take the 16-pixel
# blocks and their larger ones the 64-pixel blocks.
INTERPRETER_SMS = 4


@triton.jit
def _tap(src_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W,
         C: tl.constexpr, STRIDE: tl.constexpr, DY: tl.constexpr, DX: tl.constexpr):
    """NHWC `src` at pixel (oh * STRIDE + DY, ow * STRIDE + DX) of image n, channels offs_c;
    0 outside the image (padding 1): [P, CB] in src's dtype."""
    ih = oh * STRIDE + DY
    iw = ow * STRIDE + DX
    valid = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    pix = (n * H + ih) * W + iw
    return tl.load(src_ptr + pix[:, None] * C + offs_c[None, :], mask=valid[:, None] & c_mask[None, :], other=0.0)


@triton.jit
def _neighbourhood(src_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C: tl.constexpr, STRIDE: tl.constexpr):
    """The 9 taps of a 3x3 conv (padding 1) at output pixels (n, oh, ow), row-major."""
    return (_tap(src_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C, STRIDE, -1, -1),
            _tap(src_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C, STRIDE, -1, 0),
            _tap(src_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C, STRIDE, -1, 1),
            _tap(src_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C, STRIDE, 0, -1),
            _tap(src_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C, STRIDE, 0, 0),
            _tap(src_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C, STRIDE, 0, 1),
            _tap(src_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C, STRIDE, 1, -1),
            _tap(src_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C, STRIDE, 1, 0),
            _tap(src_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C, STRIDE, 1, 1))


@triton.jit
def _conv3x3(taps, w_ptr, b_ptr, cols, col_mask, K_TOTAL: tl.constexpr):
    """bias + the 3x3 conv of a neighbourhood for packed channels `cols`: w packed [9, K_TOTAL],
    tap t of channel k at w[t, k]; fp32 [P, CB]."""
    bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc = taps[0].to(tl.float32) * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc += bias[None, :]
    for tap in tl.static_range(1, 9):
        w = tl.load(w_ptr + tap * K_TOTAL + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc += taps[tap].to(tl.float32) * w[None, :]
    return acc


@triton.jit
def _relu(x):
    """max(x, 0) keeping NaN, as torch.relu does (tl.maximum returns 0 for a NaN)."""
    return tl.where(x < 0, 0.0, x)


@triton.jit
def _pin_layout(x):
    """x itself, as the result of a reduction (over a new axis of size 1). Triton converts a
    dot operand to the dot's layout where it was made; when elementwise ops make it from
    loads, it moves that conversion back through them to every load. For a 3x3 conv that is
    9 tiles through shared memory (9 barrier pairs in the sm_90 build) instead of 1, and the
    conv's FMAs run in the operand layout. A reduction's result stops that move."""
    return tl.sum(tl.expand_dims(x, 2), axis=2)


@triton.jit
def _project(acc, e, w_ptr, rows, row_mask, offs_o, o_mask, COUT: tl.constexpr, PRECISION: tl.constexpr,
             DOT_IN_FP32: tl.constexpr):
    """acc += e @ w[rows, :] with w packed [K, COUT] row-major in the input dtype (rows outside
    row_mask load 0, so whatever e holds there adds nothing); PRECISION: float32's dot precision;
    DOT_IN_FP32: interpreter.needs_fp32_dot."""
    e = _pin_layout(e)
    w = tl.load(w_ptr + rows[:, None] * COUT + offs_o[None, :], mask=row_mask[:, None] & o_mask[None, :], other=0.0)
    if DOT_IN_FP32:
        return tl.dot(e.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    if w.dtype == tl.float32:
        return tl.dot(e, w, acc, input_precision=PRECISION)
    return tl.dot(e.to(w.dtype), w, acc)


@triton.jit
def _epilogue(acc, offs_p, p_mask, offs_o, o_mask, bias_ptr, addend_ptr, out_ptr, COUT: tl.constexpr,
              ADDEND_IS_RESIDUAL: tl.constexpr):
    """out = relu(acc + bias + addend) for pixels offs_p: addend is the residual x [P, COUT]
    (stride 1) or the shortcut projection's bias [COUT] (stride 2)."""
    acc += tl.load(bias_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    io_mask = p_mask[:, None] & o_mask[None, :]
    io = offs_p[:, None] * COUT + offs_o[None, :]
    if ADDEND_IS_RESIDUAL:
        acc += tl.load(addend_ptr + io, mask=io_mask, other=0.0).to(tl.float32)
    else:
        acc += tl.load(addend_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + io, _relu(acc).to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _finish(acc, offs_p, p_mask, offs_o, o_mask, bias_ptr, addend_ptr, out_ptr, partial_ptr, P,
            COUT: tl.constexpr, K_SPLITS: tl.constexpr, ADDEND_IS_RESIDUAL: tl.constexpr):
    """The epilogue, or with a split K loop this split's float32 partial sums ([K_SPLITS, P, COUT])."""
    if K_SPLITS == 1:
        _epilogue(acc, offs_p, p_mask, offs_o, o_mask, bias_ptr, addend_ptr, out_ptr, COUT, ADDEND_IS_RESIDUAL)
    else:
        split = tl.program_id(1).to(tl.int64)
        io = (split * P + offs_p)[:, None] * COUT + offs_o[None, :]
        tl.store(partial_ptr + io, acc, mask=p_mask[:, None] & o_mask[None, :])


@triton.jit
def _sum_partials_kernel(partial_ptr, bias_ptr, addend_ptr, out_ptr, P, COUT: tl.constexpr, K_SPLITS: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ADDEND_IS_RESIDUAL: tl.constexpr):
    """The split K loop's partial sums added in split order, then the epilogue."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    offs_o = tl.arange(0, BLOCK_C)
    o_mask = offs_o < COUT
    io = offs_p[:, None] * COUT + offs_o[None, :]
    io_mask = p_mask[:, None] & o_mask[None, :]
    acc = tl.load(partial_ptr + io, mask=io_mask, other=0.0)
    for split in range(1, K_SPLITS):  # rolled: unrolled, all K_SPLITS loads are hoisted and spill
        acc += tl.load(partial_ptr + split * P * COUT + io, mask=io_mask, other=0.0)
    _epilogue(acc, offs_p, p_mask, offs_o, o_mask, bias_ptr, addend_ptr, out_ptr, COUT, ADDEND_IS_RESIDUAL)


@triton.jit
def _ge_stride1_kernel(x_ptr, y_ptr, dw_w_ptr, dw_b_ptr, pw_w_ptr, pw_b_ptr, out_ptr, partial_ptr, P, H, W,
                       C: tl.constexpr, RATIO: tl.constexpr, K_SPLITS: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_CIN: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
                       DOT_IN_FP32: tl.constexpr):
    offs_p, p_mask, n, oh, ow = _pixels(P, H, W, BLOCK_P)
    split = tl.program_id(1)
    offs_o = tl.arange(0, BLOCK_C)
    o_mask = offs_o < C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_CIN):  # a loop, not unrolled: each step holds 9 tiles
        offs_c = c0 + tl.arange(0, BLOCK_CIN)
        c_mask = offs_c < C
        taps = _neighbourhood(y_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C, 1)
        # rolled: unrolled, the compiler hoists all R x 9 weight loads and spills
        for r in range(split, RATIO, K_SPLITS):
            cols = r * C + offs_c
            e = _conv3x3(taps, dw_w_ptr, dw_b_ptr, cols, c_mask, RATIO * C)
            acc = _project(acc, _relu(e), pw_w_ptr, cols, c_mask, offs_o, o_mask, C, PRECISION, DOT_IN_FP32)
    _finish(acc, offs_p, p_mask, offs_o, o_mask, pw_b_ptr, x_ptr, out_ptr, partial_ptr, P, C, K_SPLITS, True)


@triton.jit
def _expand_stride2_kernel(y_ptr, w_ptr, b_ptr, e_ptr, P, H, W, HO, WO, C: tl.constexpr, RATIO: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_CIN: tl.constexpr):
    """e = dw0(y), the grouped 3x3 stride-2 conv with its bias, NHWC in the packed channel
    order: one block of input channels, all RATIO expanded channels of each."""
    offs_p, p_mask, n, oh, ow = _pixels(P, HO, WO, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_CIN + tl.arange(0, BLOCK_CIN)
    c_mask = offs_c < C
    taps = _neighbourhood(y_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C, 2)
    io_mask = p_mask[:, None] & c_mask[None, :]
    for r in tl.static_range(RATIO):
        cols = r * C + offs_c
        e = _conv3x3(taps, w_ptr, b_ptr, cols, c_mask, RATIO * C)
        tl.store(e_ptr + offs_p[:, None] * (RATIO * C) + cols[None, :], e.to(e_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _ge_stride2_kernel(x_ptr, e_ptr, dw1_w_ptr, dw1_b_ptr, pw_w_ptr, pw_b_ptr,
                       sc_dw_w_ptr, sc_dw_b_ptr, sc_pw_w_ptr, sc_pw_b_ptr, out_ptr, partial_ptr, P, H, W, HO, WO,
                       C: tl.constexpr, COUT: tl.constexpr, MID: tl.constexpr, K_SPLITS: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CIN: tl.constexpr, BLOCK_C: tl.constexpr,
                       PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    offs_p, p_mask, n, oh, ow = _pixels(P, HO, WO, BLOCK_P)
    split = tl.program_id(1)
    offs_o = tl.arange(0, BLOCK_C)
    o_mask = offs_o < COUT
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    # main branch: pw(relu(dw1(e))), depthwise on mid
    for k0 in range(split * BLOCK_K, MID, K_SPLITS * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < MID
        taps = _neighbourhood(e_ptr, n, oh, ow, p_mask, offs_k, k_mask, HO, WO, MID, 1)
        e = _conv3x3(taps, dw1_w_ptr, dw1_b_ptr, offs_k, k_mask, MID)
        acc = _project(acc, _relu(e), pw_w_ptr, offs_k, k_mask, offs_o, o_mask, COUT, PRECISION, DOT_IN_FP32)
    # shortcut: sc_pw(sc_dw(x)), depthwise stride 2 on x
    for c0 in range(split * BLOCK_CIN, C, K_SPLITS * BLOCK_CIN):
        offs_c = c0 + tl.arange(0, BLOCK_CIN)
        c_mask = offs_c < C
        taps = _neighbourhood(x_ptr, n, oh, ow, p_mask, offs_c, c_mask, H, W, C, 2)
        s = _conv3x3(taps, sc_dw_w_ptr, sc_dw_b_ptr, offs_c, c_mask, C)
        acc = _project(acc, s, sc_pw_w_ptr, offs_c, c_mask, offs_o, o_mask, COUT, PRECISION, DOT_IN_FP32)
    _finish(acc, offs_p, p_mask, offs_o, o_mask, pw_b_ptr, sc_pw_b_ptr, out_ptr, partial_ptr, P, COUT, K_SPLITS, False)


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"ge_layer (triton): x must be float32, float16 or bfloat16, got {x.dtype}")


def _block_c(channels: int) -> int:
    return max(16, triton.next_power_of_2(channels))  # tl.dot needs every dim >= 16


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else INTERPRETER_SMS


def _block_p(pixels: int, device: torch.device) -> int:
    """64-pixel blocks where they give every SM two programs, else 16-pixel ones."""
    return BLOCK_P if triton.cdiv(pixels, BLOCK_P) >= 2 * _sm_count(device) else SMALL_BLOCK_P


def _k_splits(blocks: int, k_items: int, device: torch.device) -> int:
    """How many programs share a pixel block's K loop of k_items items: the fewest that give
    every SM two programs, rounded up to a divisor of k_items so the splits get equal shares."""
    wanted = triton.cdiv(2 * _sm_count(device), blocks)
    return next(d for d in range(1, k_items + 1) if k_items % d == 0 and (d >= wanted or d == k_items))


def main_kernel_grid(stride: int, cin: int, mid: int, out_pixels: int, device: torch.device) -> tuple[int, int, int]:
    """(pixels per block, pixel blocks, K splits) of a layer's main kernel: stride 1 splits
    over the expansion's r, stride 2 over chunks of mid."""
    block_p = _block_p(out_pixels, device)
    blocks = triton.cdiv(out_pixels, block_p)
    k_items = mid // cin if stride == 1 else triton.cdiv(mid, BLOCK_CIN)
    return block_p, blocks, _k_splits(blocks, k_items, device)


def _sum_partials(partial, bias, addend, out, addend_is_residual: bool) -> None:
    k_splits, pixels, cout = partial.shape
    _sum_partials_kernel[(triton.cdiv(pixels, BLOCK_P),)](
        partial, bias, addend, out, pixels, COUT=cout, K_SPLITS=k_splits, BLOCK_P=BLOCK_P,
        BLOCK_C=_block_c(cout), ADDEND_IS_RESIDUAL=addend_is_residual, num_warps=SMALL_BLOCK_WARPS,
    )


def _partial_sums(k_splits: int, pixels: int, cout: int, out: torch.Tensor) -> torch.Tensor:
    """Workspace of a split K loop; unsplit kernels never touch it (out stands in)."""
    if k_splits == 1:
        return out
    return torch.empty((k_splits, pixels, cout), dtype=torch.float32, device=out.device)


def _fp32_dot_precision() -> str:
    """float32 projections: TF32 where cuDNN's convs may use it (PyTorch's default, so the
    fused layer rounds like the eager one), else 3xTF32 (~1e-6). Asked as cuDNN's conv asks:
    torch.backends.cudnn.allow_tf32's getter raises when the conv and RNN flags differ."""
    return "tf32" if cudnn_conv_allows_tf32() else "tf32x3"


def _warps(block_p: int, cout: int, dtype: torch.dtype) -> int:
    if block_p == SMALL_BLOCK_P:
        return SMALL_BLOCK_WARPS
    if dtype != torch.float32 and cout <= HALF_NARROW_OUTPUT:
        return HALF_NARROW_WARPS
    return NUM_WARPS


def _launch_options(block_p: int, cout: int, dtype: torch.dtype) -> dict:
    return {"num_warps": _warps(block_p, cout, dtype), "maxnreg": MAX_REGISTERS}


def ge_layer_stride1_triton(x, y, dw_weight, dw_bias, pw_weight, pw_bias):
    """Weights packed by bisenet_fast.ops.ge_layer.pack_triton_stride1."""
    _check_dtype(x)
    n, c, h, w = x.shape
    mid = dw_weight.shape[1]
    x = x.contiguous(memory_format=torch.channels_last)
    y = y.contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    pixels = n * h * w
    block_p, blocks, k_splits = main_kernel_grid(1, c, mid, pixels, x.device)
    partial = _partial_sums(k_splits, pixels, c, out)
    _ge_stride1_kernel[(blocks, k_splits)](
        x, y, dw_weight, dw_bias, pw_weight, pw_bias, out, partial, pixels, h, w,
        C=c, RATIO=mid // c, K_SPLITS=k_splits, BLOCK_P=block_p, BLOCK_CIN=BLOCK_CIN, BLOCK_C=_block_c(c),
        PRECISION=_fp32_dot_precision(), DOT_IN_FP32=needs_fp32_dot(x.dtype), num_stages=NUM_STAGES,
        **_launch_options(block_p, c, x.dtype),
    )
    if k_splits > 1:
        _sum_partials(partial, pw_bias, x, out, addend_is_residual=True)
    return out


def ge_layer_stride2_triton(x, y, dw0_weight, dw0_bias, dw1_weight, dw1_bias, pw_weight, pw_bias,
                            sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias):
    """Weights packed by bisenet_fast.ops.ge_layer.pack_triton_stride2."""
    _check_dtype(x)
    n, c, h, w = x.shape
    mid, cout = dw0_weight.shape[1], pw_weight.shape[1]
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    x = x.contiguous(memory_format=torch.channels_last)
    y = y.contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, cout, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    # dw0's output, NHWC in the packed channel order (read only by the main kernel).
    expanded = torch.empty((n, ho, wo, mid), dtype=x.dtype, device=x.device)
    pixels = n * ho * wo
    block_p, blocks, k_splits = main_kernel_grid(2, c, mid, pixels, x.device)
    _expand_stride2_kernel[(blocks, triton.cdiv(c, BLOCK_CIN))](
        y, dw0_weight, dw0_bias, expanded, pixels, h, w, ho, wo,
        C=c, RATIO=mid // c, BLOCK_P=block_p, BLOCK_CIN=BLOCK_CIN, num_warps=NUM_WARPS,
    )
    partial = _partial_sums(k_splits, pixels, cout, out)
    _ge_stride2_kernel[(blocks, k_splits)](
        x, expanded, dw1_weight, dw1_bias, pw_weight, pw_bias, sc_dw_weight, sc_dw_bias, sc_pw_weight, sc_pw_bias,
        out, partial, pixels, h, w, ho, wo, C=c, COUT=cout, MID=mid, K_SPLITS=k_splits, BLOCK_P=block_p,
        BLOCK_K=BLOCK_CIN, BLOCK_CIN=BLOCK_CIN, BLOCK_C=_block_c(cout), PRECISION=_fp32_dot_precision(),
        DOT_IN_FP32=needs_fp32_dot(x.dtype),
        num_stages=NUM_STAGES, **_launch_options(block_p, cout, x.dtype),
    )
    if k_splits > 1:
        _sum_partials(partial, pw_bias, sc_pw_bias, out, addend_is_residual=False)
    return out
