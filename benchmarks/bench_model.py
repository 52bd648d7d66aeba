"""Whole-network inference (BiSeNetV2Segmentor.forward: logits at the input size).

impls: eager (the unfused model with every op's eager reference, NCHW and channels_last),
compile (torch.compile of that model; GPU only, --compile-mode picks the mode), and the
fused model from model.fuse() (its GE kernels: cpp on CPU, triton on GPU), on GPU also
replayed as one CUDA graph, and run with the GE layers on their CUDA kernels (cuda-ge); and
model.fuse(autotune=True) (autotuned: each GE layer runs the fastest of its fused kernels
and the folded convs through ATen/cuDNN in either layout, chosen on the first call; the
row's "autotune_choices" names each layer's), on GPU also as a CUDA graph.
Sizes 1x3x1024x2048 (the published fps setting) and 1x3x512x1024; float32, and float16 on
GPU. Quick: 1x3x256x512 float32.

    python -m benchmarks.bench_model [--device cuda] [--quick] [--out out.json]
"""
from __future__ import annotations

import copy
import sys

import torch

import bisenet_fast as bf
from benchmarks.timing import measure, speedups
from bisenet_fast.models.autotune import autotune_choices
from bisenet_fast.models.fused import capture_cuda_graph
from benchmarks.run import main as cli

FULL_SIZES = [(1024, 2048), (512, 1024)]
CPU_SIZES = [(512, 1024)]  # the CPU target's setting
QUICK_SIZES = [(256, 512)]


def _model(device) -> bf.BiSeNetV2Segmentor:
    torch.manual_seed(0)
    model = bf.BiSeNetV2Segmentor(num_classes=19)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.to(device).eval()


def _eager(model):
    def forward(x):
        with bf.backends.use("eager"):
            return model(x)

    return forward


def _fused_with_cuda_ge(fused):
    """The fused model with its GE layers on their CUDA kernels, its other ops on their usual backends."""
    def forward(x):
        with bf.backends.use("cuda", ops=["ge_layer_stride1", "ge_layer_stride2"]):
            return fused(x)

    return forward


def run(device: str, quick: bool, compile_mode: str = "default") -> list[dict]:
    device = torch.device(device)
    gpu = device.type == "cuda"
    sizes = QUICK_SIZES if quick else (FULL_SIZES if gpu else CPU_SIZES)
    dtypes = [torch.float32, torch.float16] if gpu and not quick else [torch.float32]
    fused_impl = "triton" if gpu else "cpp"
    repeats = 3 if quick else (30 if gpu else 5)
    model = _model(device)
    rows = []
    for dtype in dtypes:
        eager_model = copy.deepcopy(model).to(dtype)
        eager_cl = copy.deepcopy(model).to(dtype=dtype, memory_format=torch.channels_last)
        fused = model.fuse(dtype=dtype)
        tuned = model.fuse(dtype=dtype, autotune=True)
        compiled = torch.compile(eager_model, mode=compile_mode) if gpu else None
        for h, w in sizes:
            x = torch.randn(1, 3, h, w, device=device, dtype=dtype)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            candidates = [("eager", "NCHW", lambda: _eager(eager_model)(x)),
                          ("eager", "channels_last", lambda: _eager(eager_cl)(x_cl))]
            if compiled is not None:
                candidates.append(("compile", f"NCHW mode={compile_mode}", lambda: _eager(compiled)(x)))
            candidates.append((fused_impl, "fused channels_last", lambda: fused(x)))
            if gpu:
                with torch.inference_mode():
                    graphed = capture_cuda_graph(fused, x)
                candidates.append((fused_impl, "fused + CUDA graph", lambda: graphed(x)))
                if "cuda" in bf.backends.available():
                    candidates.append(("cuda-ge", "fused channels_last", _fused_with_cuda_ge(fused)))
            candidates.append(("autotuned", "fused channels_last", lambda: tuned(x)))
            if gpu:
                with torch.inference_mode():
                    graphed_tuned = capture_cuda_graph(tuned, x)  # its warm-up tunes
                candidates.append(("autotuned", "fused + CUDA graph", lambda: graphed_tuned(x)))
            base = None
            for impl, variant, fn in candidates:
                with torch.inference_mode():
                    # a whole network's kernels: enough names to see where its time goes
                    timing = measure(fn, device, warmup=1 if quick else 5, repeats=repeats, top_kernels=15)
                base = base or timing
                rows.append({
                    "op": "bisenetv2_inference", "case": variant, "impl": impl,
                    "dtype": str(dtype).replace("torch.", ""), "shape": [1, 3, h, w],
                    "ms": timing["ms"], "ms_min": timing["ms_min"], "peak_extra_mb": timing["peak_extra_mb"],
                    **speedups(base, timing), "fps": 1e3 / timing["ms"],
                })
                if impl == "autotuned":  # each GE layer's choice at this size (its latest tuning)
                    rows[-1]["autotune_choices"] = {
                        layer: entries[-1]["choice"] for layer, entries in autotune_choices(tuned).items()
                    }
    return rows


if __name__ == "__main__":
    sys.exit(cli(["--only", "bench_model", *sys.argv[1:]]))
