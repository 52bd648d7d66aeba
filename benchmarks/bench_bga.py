"""bga_aggregate (spec §2.3) forward, and forward+backward, against the eager reference and
torch.compile of it.

Cases: inference N=1 C=128 at 128x256 (a 1024x2048 input; 1/32 is 32x64), in NCHW and in
channels_last (the layout of the fused inference model); training N=4 C=128 at 128x128 (a
1024x1024 crop), NCHW. GB/s counts the bytes a fused kernel must move: forward, every
input read once and the output written once; forward+backward, that plus grad_out and
the four inputs read once and the four gradients written once.

impls: eager, compile (torch.compile of the reference, compiled anew for each case and
mode, --compile-mode; on CPU only without --quick, its C++ build is slow; timed after every
other row), cpp on CPU, cuda
and triton on GPU. dtypes float32 and float16 on GPU;
float32 on CPU (the CPU target).

    python -m benchmarks.bench_bga [--device cuda] [--quick] [--out out.json]
"""
from __future__ import annotations


import sys

import torch

import bisenet_fast as bf
from benchmarks.timing import compile_baseline, default_compile_mode, measure, result_row
from bisenet_fast.ops.bga import bga_aggregate_reference
from benchmarks.run import main as cli

C = 128
# (name, N, H, W, channels_last) at full size; quick divides H and W by 4.
CASES = [("inference", 1, 128, 256, False), ("inference", 1, 128, 256, True), ("training", 4, 128, 128, False)]


def _inputs(n, H, W, channels_last, dtype, device, quick):
    if quick:
        H, W = H // 4, W // 4
    h, w = (H - 1) // 4 + 1, (W - 1) // 4 + 1
    gen = torch.Generator().manual_seed(0)
    detail = torch.randn(n, C, H, W, generator=gen)
    low = [torch.randn(n, C, h, w, generator=gen) for _ in range(3)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [t.to(device=device, dtype=dtype).contiguous(memory_format=fmt) for t in (detail, *low)]


def _forward(fn, inputs):
    def call():
        with torch.no_grad():
            return fn(*inputs)
    return call


def _forward_backward(fn, inputs):
    leaves = [t.detach().requires_grad_() for t in inputs]
    # The same grad_out for every impl of a case: their gradients are checked against eager's.
    # (empty_like: in the output's layout, as randn_like would give it).
    seeded = torch.Generator().manual_seed(1)
    grad_out = torch.empty_like(inputs[0]).copy_(torch.randn(inputs[0].shape, generator=seeded))

    def call():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad_out)
    return call


def _fused(impl):
    def call(*inputs):
        with bf.backends.use(impl):
            return bf.ops.bga_aggregate(*inputs)
    return call


def run(device: str, quick: bool, compile_mode: str | None = None, compile_rows: str = "last"):
    """compile_rows: "last" (every row, the compile rows after the others), "skip" (no
    compile rows) or "only" (the compile rows alone; the eager rows they are compared with
    are measured again, not yielded): benchmarks.run times every module's compile rows after
    every module's other rows."""
    compile_mode = compile_mode or default_compile_mode(device)
    device = torch.device(device)
    gpu = device.type == "cuda"
    dtypes = [torch.float32, torch.float16] if gpu else [torch.float32]
    fused_impls = [impl for impl in ("cuda", "triton") if impl in bf.backends.available()] if gpu else ["cpp"]
    with_compile = (gpu or not quick) and compile_rows != "skip"
    compile_only = compile_rows == "only"
    if compile_only and not with_compile:
        return
    repeats = 5 if quick else (50 if gpu else 10)
    warmup = 2 if quick else 5
    to_compile = []  # (case, inputs, mode's wrapper, eager timing, dtype, bytes moved) per case and mode
    for dtype in dtypes:
        for name, n, H, W, channels_last in CASES:
            inputs = _inputs(n, H, W, channels_last, dtype, device, quick)
            high, low = inputs[0].numel(), inputs[1].numel()
            element = inputs[0].element_size()
            impls = [("eager", bga_aggregate_reference)] + [(impl, _fused(impl)) for impl in fused_impls
                                                              if not compile_only]
            for mode, wrap, bytes_moved in (
                ("forward", _forward, (2 * high + 3 * low) * element),
                ("forward+backward", _forward_backward, (2 * high + 3 * low + 3 * high + 6 * low) * element),
            ):
                case = f"{name} {'channels_last' if channels_last else 'NCHW'} {mode}"
                eager = None
                for impl, fn in impls:
                    timing = measure(wrap(fn, inputs), device, warmup=warmup, repeats=repeats)
                    eager = eager or timing
                    if not compile_only:
                        yield _row(case, impl, inputs, timing, eager, dtype, bytes_moved)
                if with_compile:
                    to_compile.append((case, inputs, wrap, eager, dtype, bytes_moved))
    # The compiled baselines after every other row: each compile takes seconds (max-autotune's
    # tuning minutes), and a run stopped at its deadline should lose these, not fused rows.
    for case, inputs, wrap, eager, dtype, bytes_moved in to_compile:
        compiled = compile_baseline(bga_aggregate_reference, compile_mode)
        timing = measure(wrap(compiled, inputs), device, warmup=warmup, repeats=repeats)
        yield _row(f"{case} mode={compile_mode}", "compile", inputs, timing, eager, dtype, bytes_moved)


def _row(case, impl, inputs, timing, eager, dtype, bytes_moved):
    shape = list(inputs[0].shape) + ["low"] + list(inputs[1].shape[-2:])
    return result_row("bga_aggregate", case, impl, dtype, shape, timing, eager, bytes_moved)


if __name__ == "__main__":
    sys.exit(cli(module="bench_bga"))
