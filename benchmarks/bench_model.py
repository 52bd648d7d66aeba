"""Whole-network inference (BiSeNetV2Segmentor.forward: logits at the input size).

impls: eager (the unfused model with every op's eager reference, NCHW and channels_last),
compile (torch.compile of that model in either layout, compiled anew for each size and
dtype; GPU only, --compile-mode picks the mode, max-autotune-no-cudagraphs by default;
timed after all the other rows, the target's setting first), and
the fused model from model.fuse() (its GE kernels: cpp on CPU, triton on GPU), on GPU also replayed as
one CUDA graph, and run with the GE layers on their CUDA kernels (cuda-ge); and
model.fuse(autotune=True) (autotuned: each GE layer runs the fastest of its fused kernels
and the folded convs through ATen/cuDNN in either layout, chosen on the first call; the
row's "autotune_choices" gives each layer's choice and every candidate's time), on GPU also
as a CUDA graph. A CUDA-graph row's peak_extra_mb is 0: the graph's memory pool is allocated
at capture, before the measurement (its "graph_pool_mb" says how much).
Sizes 1x3x1024x2048 (the published fps setting) and 1x3x512x1024; float32, and float16 on
GPU; the target's setting (float16 at 1024x2048) first. Quick: 1x3x256x512 float32.

    python -m benchmarks.bench_model [--device cuda] [--quick] [--out out.json]
"""
from __future__ import annotations

import copy
import itertools
import sys

import torch

import bisenet_fast as bf
from benchmarks.timing import accuracy, compile_baseline, default_compile_mode, measure, speedups
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


def _fused_with_cuda_ge(fused, x):
    """The fused model on x with its GE layers on their CUDA kernels, its other ops on their
    usual backends."""
    def forward():
        with bf.backends.use("cuda", ops=["ge_layer_stride1", "ge_layer_stride2"]):
            return fused(x)

    return forward


def _captured(model, x):
    """model on x replayed as one CUDA graph, and the MB of device memory the graph holds:
    its private memory pool (the forward's intermediates, reused by every replay) and static
    input. Read as memory_reserved with the cache emptied before and after the capture, so
    that neither the blocks cached before nor the warm-up's (on a side stream) count.
    memory_allocated would count only the tensors still referenced after the capture (the
    output): the intermediates are freed into the pool during the capture, not released."""
    torch.cuda.synchronize(x.device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(x.device)
    with torch.inference_mode():
        graphed = capture_cuda_graph(model, x)  # its warm-up runs (and tunes) the model
    torch.cuda.synchronize(x.device)
    torch.cuda.empty_cache()  # frees no block of a live graph's pool
    return (lambda: graphed(x)), (torch.cuda.memory_reserved(x.device) - before) / 2**20


def candidates(models: dict, x: torch.Tensor, gpu: bool):
    """(impl, variant, zero-argument callable, extra row fields) for one input, in the order
    they are timed (eager NCHW first: the rows' speed-ups are over it). models: 'eager',
    'eager_cl' (unfused, NCHW and channels_last), 'fused', 'tuned'."""
    x_cl = x.contiguous(memory_format=torch.channels_last)
    eager, eager_cl, fused, tuned = (models[k] for k in ("eager", "eager_cl", "fused", "tuned"))
    yield "eager", "NCHW", (lambda: _eager(eager)(x)), {}
    yield "eager", "channels_last", (lambda: _eager(eager_cl)(x_cl)), {}
    fused_impl = "triton" if gpu else "cpp"
    yield fused_impl, "fused channels_last", (lambda: fused(x)), {}
    if gpu:
        graphed, pool_mb = _captured(fused, x)
        yield fused_impl, "fused + CUDA graph", graphed, {"graph_pool_mb": pool_mb}
        if "cuda" in bf.backends.available():
            yield "cuda-ge", "fused channels_last", _fused_with_cuda_ge(fused, x), {}
    yield "autotuned", "fused channels_last", (lambda: tuned(x)), {}
    if gpu:
        graphed, pool_mb = _captured(tuned, x)
        yield "autotuned", "fused + CUDA graph", graphed, {"graph_pool_mb": pool_mb}


def compile_candidates(models: dict, x: torch.Tensor, compile_mode: str):
    """The torch.compile baselines of one input (GPU only), as candidates() gives rows. Each
    compile takes a minute or more (max-autotune's tuning several), so run() times them
    after every other row: a run stopped at its deadline loses these first."""
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for variant, model, inputs in (("NCHW", models["eager"], x), ("channels_last", models["eager_cl"], x_cl)):
        compiled = compile_baseline(model, compile_mode)  # made after the previous one's rows
        yield "compile", f"{variant} mode={compile_mode}", (lambda c=compiled, i=inputs: _eager(c)(i)), {}


def _rows(candidate_list, x, dtype, base, models, quick, repeats):
    """The rows of one input's candidates; base: the eager NCHW timing the speed-ups are
    over (None: the first candidate's)."""
    h, w = x.shape[-2:]
    for impl, variant, fn, extra in candidate_list:
        with torch.inference_mode():
            # a whole network's kernels: enough names to see where its time goes
            timing = measure(fn, x.device, warmup=1 if quick else 5, repeats=repeats, top_kernels=15)
        base = base or timing
        row = {
            "op": "bisenetv2_inference", "case": variant, "impl": impl,
            "dtype": str(dtype).replace("torch.", ""), "shape": [1, 3, h, w],
            "ms": timing["ms"], "ms_min": timing["ms_min"], "peak_extra_mb": timing["peak_extra_mb"],
            **speedups(base, timing), **accuracy(base, timing, dtype), "fps": 1e3 / timing["ms"], **extra,
        }
        if impl == "autotuned":  # each GE layer's tuning at this size: choice and candidates' ms
            row["autotune_choices"] = {
                layer: entries[-1] for layer, entries in autotune_choices(models["tuned"]).items()
            }
        yield base, row


def run(device: str, quick: bool, compile_mode: str | None = None, compile_rows: str = "last"):
    """compile_rows: "last", "skip" or "only", as in bench_bga.run."""
    compile_mode = compile_mode or default_compile_mode(device)
    device = torch.device(device)
    gpu = device.type == "cuda"
    with_compile = gpu and compile_rows != "skip"
    compile_only = compile_rows == "only"
    if compile_only and not with_compile:
        return
    sizes = QUICK_SIZES if quick else (FULL_SIZES if gpu else CPU_SIZES)
    dtypes = [torch.float16, torch.float32] if gpu and not quick else [torch.float32]
    repeats = 3 if quick else (30 if gpu else 5)
    model = _model(device)
    to_compile = []  # (models, x, dtype, eager NCHW timing) of every input, the target's first
    for dtype in dtypes:
        models = {
            "eager": copy.deepcopy(model).to(dtype),
            "eager_cl": copy.deepcopy(model).to(dtype=dtype, memory_format=torch.channels_last),
            "fused": None if compile_only else model.fuse(dtype=dtype),
            "tuned": None if compile_only else model.fuse(dtype=dtype, autotune=True),
        }
        for h, w in sizes:
            x = torch.randn(1, 3, h, w, device=device, dtype=dtype)
            base = None
            # compile_rows "only": the eager NCHW row alone (the first), the compile rows' base
            timed = itertools.islice(candidates(models, x, gpu), 1 if compile_only else None)
            for base, row in _rows(timed, x, dtype, None, models, quick, repeats):
                if not compile_only:
                    yield row
            if with_compile:
                to_compile.append(({k: models[k] for k in ("eager", "eager_cl")}, x, dtype, base))
    for eager_models, x, dtype, base in to_compile:
        for _, row in _rows(compile_candidates(eager_models, x, compile_mode), x, dtype, base, eager_models, quick,
                            repeats):
            yield row


if __name__ == "__main__":
    sys.exit(cli(module="bench_model"))
