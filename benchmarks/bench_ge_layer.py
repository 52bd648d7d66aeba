"""Each distinct GE layer of BiSeNetV2 in inference (BN folded): the part after conv1 that the
fused op replaces (expand dwconv -> projection + residual/shortcut + ReLU).

impls: eager (the folded-BN reference, NCHW and channels_last), compile (torch.compile of
the reference in channels_last, per layer and dtype, --compile-mode; GPU only; timed after
every other row), and the fused kernels (cpp on CPU; on GPU triton and cuda, the
CUDA kernels that keep the expanded values in shared memory). On GPU also triton-unsplit,
the Triton kernels with split-K off, in the layers whose grid splits its K loop, to show
what the split buys; and triton-8warps, the 8-warp blocks the float16 layers up to 64
output channels had before they took 4, to show what that buys.

    python -m benchmarks.bench_ge_layer [--device cuda] [--quick] [--out out.json]
"""
from __future__ import annotations

import contextlib
import sys

import torch

import bisenet_fast as bf
from benchmarks.timing import accuracy, achieved_gbps, compile_baseline, default_compile_mode, measure, speedups
from bisenet_fast.models.bisenetv2 import GELayer
from bisenet_fast.models.fused import FusedGELayer
from bisenet_fast.ops import ge_layer as ge
from benchmarks.run import main as cli

# (cin, cout, stride, input size as a fraction of the image) for every distinct GE layer.
LAYERS = [(16, 32, 2, 4), (32, 32, 1, 8), (32, 64, 2, 8), (64, 64, 1, 16), (64, 128, 2, 16), (128, 128, 1, 32)]
FULL_IMAGE = (1024, 2048)
CPU_IMAGE = (512, 1024)  # the CPU target's setting
QUICK_IMAGE = (256, 512)


@contextlib.contextmanager
def _split_k_off():
    from bisenet_fast.triton_kernels import ge_layer as ge_triton

    chosen = ge_triton._k_splits
    ge_triton._k_splits = lambda blocks, k_items, device: 1
    try:
        yield
    finally:
        ge_triton._k_splits = chosen


@contextlib.contextmanager
def _eight_warps():
    from bisenet_fast.triton_kernels import ge_layer as ge_triton

    chosen = ge_triton.HALF_NARROW_WARPS
    ge_triton.HALF_NARROW_WARPS = ge_triton.NUM_WARPS
    try:
        yield
    finally:
        ge_triton.HALF_NARROW_WARPS = chosen


def _takes_half_narrow_warps(stride: int, cin: int, cout: int, mid: int, out_pixels: int, dtype: torch.dtype,
                             device: torch.device) -> bool:
    from bisenet_fast.triton_kernels import ge_layer as ge_triton

    # Whether _eight_warps() changes this launch: a 16-pixel block takes SMALL_BLOCK_WARPS,
    # which equals HALF_NARROW_WARPS (4) but is not what _eight_warps() changes, so comparing
    # the warps with HALF_NARROW_WARPS would time the same kernel again as "triton-8warps".
    block_p = ge_triton.main_kernel_grid(stride, cin, mid, out_pixels, device)[0]
    warps = ge_triton._warps(block_p, cout, dtype)
    with _eight_warps():
        return ge_triton._warps(block_p, cout, dtype) != warps


def _splits_k_loop(stride: int, cin: int, mid: int, out_pixels: int, device: torch.device) -> bool:
    from bisenet_fast.triton_kernels import ge_layer as ge_triton

    return ge_triton.main_kernel_grid(stride, cin, mid, out_pixels, device)[2] > 1


def _layer(cin, cout, stride, device, dtype) -> FusedGELayer:
    layer = GELayer(cin, cout, 6, stride)
    for m in layer.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return FusedGELayer(layer.eval()).to(device=device, dtype=dtype)


def run(device: str, quick: bool, compile_mode: str | None = None, compile_rows: str = "last"):
    """compile_rows: "last", "skip" or "only", as in bench_bga.run."""
    compile_mode = compile_mode or default_compile_mode(device)
    device = torch.device(device)
    gpu = device.type == "cuda"
    with_compile = gpu and compile_rows != "skip"
    compile_only = compile_rows == "only"
    if compile_only and not with_compile:
        return
    dtypes = [torch.float32, torch.float16] if gpu else [torch.float32]
    image = QUICK_IMAGE if quick else (FULL_IMAGE if gpu else CPU_IMAGE)
    fused_impl = "triton" if gpu else "cpp"
    repeats = 5 if quick else (50 if gpu else 10)
    to_compile = []  # (row fields, reference, its arguments, eager NCHW timing, dtype, bytes) per case
    for dtype in dtypes:
        for cin, cout, stride, frac in LAYERS:
            h, w = image[0] // frac, image[1] // frac
            fused = _layer(cin, cout, stride, device, dtype)
            weights = fused.weights()
            packed = fused.triton_weights()  # packed once, as the fused model holds them
            x = torch.randn(1, cin, h, w, device=device, dtype=dtype).relu()
            x_cl = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                y_cl = fused.conv1(x_cl)
            y = y_cl.contiguous()
            reference = ge.ge_layer_stride1_reference if stride == 1 else ge.ge_layer_stride2_reference
            op = ge.ge_layer_stride1 if stride == 1 else ge.ge_layer_stride2
            candidates = [("eager", "NCHW", lambda: reference(x, y, *weights)),
                          ("eager", "channels_last", lambda: reference(x_cl, y_cl, *weights))]
            def fused_op():
                with bf.backends.use(fused_impl):
                    return op(x_cl, y_cl, *weights, triton_weights=packed)
            candidates.append((fused_impl, "channels_last", fused_op))
            if gpu and "cuda" in bf.backends.available():
                def cuda_op():
                    with bf.backends.use("cuda"):
                        return op(x_cl, y_cl, *weights)
                candidates.append(("cuda", "channels_last", cuda_op))
            out_h, out_w = (h, w) if stride == 1 else ((h - 1) // 2 + 1, (w - 1) // 2 + 1)
            mid = weights[0].shape[0]  # the expansion's channels (dw or dw0 weight: mid, 1, 3, 3)
            if gpu and _splits_k_loop(stride, cin, mid, out_h * out_w, device):
                def unsplit():
                    with _split_k_off():
                        return op(x_cl, y_cl, *weights, triton_weights=packed)
                candidates.append(("triton-unsplit", "channels_last", unsplit))
            if gpu and _takes_half_narrow_warps(stride, cin, cout, mid, out_h * out_w, dtype, device):
                def eight_warps():
                    with _eight_warps():
                        return op(x_cl, y_cl, *weights, triton_weights=packed)
                candidates.append(("triton-8warps", "channels_last", eight_warps))
            # x and y read once, the output written once, the folded weights read once
            min_bytes = (2 * x.numel() + cout * out_h * out_w) * x.element_size() + sum(
                t.numel() * t.element_size() for t in weights)
            case = dict(op="ge_layer", case=f"{cin}->{cout} s{stride}", dtype=str(dtype).replace("torch.", ""),
                        shape=[1, cin, h, w])
            base = None
            for impl, layout, fn in candidates[:1] if compile_only else candidates:  # [0]: the base
                with torch.inference_mode():
                    timing = measure(fn, device, warmup=2 if quick else 5, repeats=repeats)
                base = base or timing
                if not compile_only:
                    yield _row(case, impl, layout, timing, base, dtype, min_bytes)
            if with_compile:
                to_compile.append((case, reference, (x_cl, y_cl, *weights), base, dtype, min_bytes))
    # The compiled baselines after every other row (their tuning is the slowest: a run
    # stopped at its deadline loses these first); compile_baseline resets dynamo's caches.
    for case, reference, args, base, dtype, min_bytes in to_compile:
        compiled = compile_baseline(reference, compile_mode)
        with torch.inference_mode():
            timing = measure(lambda: compiled(*args), device, warmup=2 if quick else 5, repeats=repeats)
        yield _row(case, "compile", f"channels_last mode={compile_mode}", timing, base, dtype, min_bytes)


def _row(case: dict, impl: str, layout: str, timing: dict, base: dict, dtype: torch.dtype, min_bytes: int) -> dict:
    return {
        **case, "impl": impl, "layout": layout,
        "ms": timing["ms"], "ms_min": timing["ms_min"], "peak_extra_mb": timing["peak_extra_mb"],
        **speedups(base, timing), **accuracy(base, timing, dtype), "gbps": achieved_gbps(min_bytes, timing),
    }


if __name__ == "__main__":
    sys.exit(cli(module="bench_ge_layer"))
