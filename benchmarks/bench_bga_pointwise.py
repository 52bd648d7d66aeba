"""bga_pointwise_aggregate (the BGA gate folded into detail_dwconv's 1x1 conv, inference)
against the ways to compute the same thing without it:

  eager          F.conv2d (1x1, bias) + bga_aggregate_reference
  compile        torch.compile of that, compiled anew per case (--compile-mode; GPU, or CPU
                 without --quick: its C++ build is slow)
  conv+<impl>    F.conv2d + the fused bga_aggregate (what FusedBGALayer ran before)
  <impl>         the fused GEMM + aggregation (cpp on CPU, triton on GPU)

Cases, channels_last (the fused model's layout), C=128: N=1 at 128x256 (a 1024x2048 input;
1/32 is 32x64) and N=4 at 128x128; quick divides H and W by 4. dtypes float32 and float16 on
GPU; float32 on CPU. GB/s counts the bytes the fused op must move: detail_dw, the three
low-res maps and the weights read once, the output written once.

    python -m benchmarks.bench_bga_pointwise [--device cuda] [--quick] [--out results.json]
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import bisenet_fast as bf
from benchmarks.run import main as cli
from benchmarks.timing import compile_baseline, default_compile_mode, measure, result_row
from bisenet_fast.ops.bga_pointwise import bga_pointwise_aggregate_reference

C = 128
CASES = [("N=1 1024x2048", 1, 128, 256), ("N=4 1024x1024", 4, 128, 128)]


def _inputs(n, H, W, dtype, device, quick):
    if quick:
        H, W = H // 4, W // 4
    h, w = (H - 1) // 4 + 1, (W - 1) // 4 + 1
    gen = torch.Generator().manual_seed(0)
    detail_dw = torch.randn(n, C, H, W, generator=gen)
    weight = torch.randn(C, C, generator=gen) / C**0.5
    bias = torch.randn(C, generator=gen)
    low = [torch.randn(n, C, h, w, generator=gen) for _ in range(3)]
    maps = [t.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last) for t in (detail_dw, *low)]
    return [maps[0], weight.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype), *maps[1:]]


def _conv_then_aggregate(impl):
    def call(detail_dw, weight, bias, semantic, detail_down, semantic_down):
        detail = F.conv2d(detail_dw, weight[:, :, None, None], bias)
        with bf.backends.use(impl):
            return bf.ops.bga_aggregate(detail, semantic, detail_down, semantic_down)
    return call


def _fused(impl):
    def call(*inputs):
        with bf.backends.use(impl):
            return bf.ops.bga_pointwise_aggregate(*inputs)
    return call


def run(device: str, quick: bool, compile_mode: str | None = None, compile_rows: str = "last"):
    """compile_rows: "last", "skip" or "only", as in bench_bga.run."""
    compile_mode = compile_mode or default_compile_mode(device)
    device = torch.device(device)
    gpu = device.type == "cuda"
    dtypes = [torch.float32, torch.float16] if gpu else [torch.float32]
    if gpu:
        fused_impls = ["triton"] if "triton" in bf.backends.available() else []
        aggregate_impls = [impl for impl in ("cuda", "triton") if impl in bf.backends.available()]
    else:
        fused_impls, aggregate_impls = ["cpp"], ["cpp"]
    with_compile = (gpu or not quick) and compile_rows != "skip"
    compile_only = compile_rows == "only"
    if compile_only and not with_compile:
        return
    repeats = 5 if quick else (50 if gpu else 10)
    warmup = 2 if quick else 5
    to_compile = []  # (case name, inputs, eager timing, dtype, bytes moved) per case
    for dtype in dtypes:
        for name, n, H, W in CASES:
            inputs = _inputs(n, H, W, dtype, device, quick)
            element = inputs[0].element_size()
            bytes_moved = (2 * inputs[0].numel() + 3 * inputs[3].numel() + inputs[1].numel() + C) * element
            impls = [("eager", bga_pointwise_aggregate_reference)]
            if not compile_only:
                impls += [(f"conv+{impl}", _conv_then_aggregate(impl)) for impl in aggregate_impls]
                impls += [(impl, _fused(impl)) for impl in fused_impls]
            eager = None
            for impl, fn in impls:
                timing = measure(_no_grad_call(fn, inputs), device, warmup=warmup, repeats=repeats)
                eager = eager or timing
                if not compile_only:
                    yield _row(f"{name} channels_last forward", impl, inputs, timing, eager, dtype, bytes_moved)
            if with_compile:
                to_compile.append((name, inputs, eager, dtype, bytes_moved))
    # The compiled baselines after every other row: see bench_bga.
    for name, inputs, eager, dtype, bytes_moved in to_compile:
        compiled = compile_baseline(bga_pointwise_aggregate_reference, compile_mode)
        timing = measure(_no_grad_call(compiled, inputs), device, warmup=warmup, repeats=repeats)
        yield _row(f"{name} channels_last forward mode={compile_mode}", "compile", inputs, timing, eager, dtype,
                   bytes_moved)


def _no_grad_call(fn, inputs):
    def call():
        with torch.no_grad():
            return fn(*inputs)
    return call


def _row(case, impl, inputs, timing, eager, dtype, bytes_moved):
    return result_row("bga_pointwise_aggregate", case, impl, dtype,
                      list(inputs[0].shape) + ["low"] + list(inputs[3].shape[-2:]), timing, eager, bytes_moved)


if __name__ == "__main__":
    sys.exit(cli(module="bench_bga_pointwise"))
