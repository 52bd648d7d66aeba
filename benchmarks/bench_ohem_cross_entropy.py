"""OHEM cross-entropy, forward + backward: fused kernels vs the eager reference.

Training shapes (spec §6, issue 3): N=4, C=19, one case per head resolution (decode 128x128;
aux heads 256x256, 64x64, 32x32) -> labels 1024x1024, thresh=0.7. Two regimes:
"early": random logits, min_kept=10000 (most p < 0.7: the threshold is thresh, no select);
"select": logits confident on the labels and a budget of a quarter of the pixels, so the
k-th probability must be selected (radix select on the fused paths, sort in eager).
quick=True divides every spatial size by 4 (and min_kept by 16).
impl "cuda-prechecked": the CUDA kernel with check_labels=False, as the model's loss calls
it (the labels checked once for the five heads), without the host synchronisation; its
speed-up is over "eager-prechecked", the eager reference without its label check likewise.

    python -m benchmarks.bench_ohem_cross_entropy [--device cuda] [--quick] [--out out.json]
"""
from __future__ import annotations

import sys

import torch

import bisenet_fast as bf
from benchmarks.timing import accuracy, compile_baseline, default_compile_mode, measure, speedups
from benchmarks.run import main as cli

OP = "ohem_cross_entropy"
N, C, LABEL_SIZE, MIN_KEPT = 4, 19, 1024, 10000
HEAD_SIZES = (128, 256, 64, 32)


def make_case(head: int, label: int, regime: str, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(0)
    # Labels constant over 4x4 blocks of head pixels (like real segment maps), so a
    # "select" head is confident on all but the pixels near segment borders.
    blocks = torch.randint(0, C, (N, 1, max(1, head // 4), max(1, head // 4)), generator=gen).float()
    head_labels = torch.nn.functional.interpolate(blocks, size=(head, head), mode="nearest").long()
    target = torch.nn.functional.interpolate(head_labels.float(), size=(label, label), mode="nearest")[:, 0].long()
    target[:, : label // 16] = 255  # a band of ignored (padded) pixels
    logits = torch.randn(N, C, head, head, generator=gen)
    if regime == "select":
        logits.scatter_add_(1, head_labels, torch.full(head_labels.shape, 8.0))
    return logits.to(device=device, dtype=dtype), target.to(torch.uint8).to(device)


def impls(device: str, head: int, quick: bool) -> list[str]:
    """The impls of one case, but compile (see compiles)."""
    if device == "cpu":
        return ["eager", "cpp"]
    available = bf.backends.available()
    fused = [name for name in ("cuda", "triton") if name in available]
    return ["eager"] + fused + (["eager-prechecked", "cuda-prechecked"] if "cuda" in fused else [])


def compiles(device: str, head: int, quick: bool) -> bool:
    """Whether a case has a compile row: on a GPU, at the decode-head shape only (each compile
    costs seconds, and the comparison is the same at every shape). Timed after every other
    row, as in bench_bga."""
    return device != "cpu" and head == HEAD_SIZES[0] // (4 if quick else 1)


def step_fn(impl: str, logits: torch.Tensor, target: torch.Tensor, min_kept: int, compile_mode: str):
    x = logits.detach().clone().requires_grad_()
    backend = {"compile": "eager", "eager-prechecked": "eager", "cuda-prechecked": "cuda"}.get(impl, impl)
    check_labels = not impl.endswith("-prechecked")

    def loss_fn(x, target):
        return bf.ops.ohem_cross_entropy(x, target, thresh=0.7, min_kept=min_kept, check_labels=check_labels)

    fn = compile_baseline(loss_fn, compile_mode) if impl == "compile" else loss_fn

    def step():
        """One loss and backward; returns both, for the row's output check."""
        with bf.backends.use(backend):
            loss = fn(x, target)
            loss.backward()
        grad, x.grad = x.grad, None
        return loss.detach(), grad

    return step


def run(device: str = "cpu", quick: bool = True, head_sizes=HEAD_SIZES, dtypes=None, compile_mode: str | None = None,
        compile_rows: str = "last"):
    """compile_rows: "last", "skip" or "only", as in bench_bga.run."""
    compile_mode = compile_mode or default_compile_mode(device)
    compile_only = compile_rows == "only"
    scale = 4 if quick else 1
    label = LABEL_SIZE // scale
    min_kept = MIN_KEPT // scale**2
    if dtypes is None:
        dtypes = [torch.float32] if (device == "cpu" and quick) else [torch.float32, torch.float16]
    repeats = 3 if device == "cpu" else 20
    to_compile = []  # (case's row fields, logits, target, min_kept, eager timing, dtype)
    for head in head_sizes:
        head = head // scale
        with_compile = compiles(device, head, quick) and compile_rows != "skip"
        if compile_only and not with_compile:
            continue
        for regime in ("early", "select"):
            case_min_kept = min_kept if regime == "early" else label * label // 4
            for dtype in dtypes:
                logits, target = make_case(head, label, regime, dtype, device)
                fields = {"op": OP, "case": f"{head}x{head}->{label}x{label} {regime}",
                          "dtype": str(dtype).replace("torch.", ""),
                          "shape": f"N={N} C={C} logits {head}x{head} labels {label}x{label} min_kept={case_min_kept}"}
                baselines = {}
                for impl in ["eager"] if compile_only else impls(device, head, quick):
                    step = step_fn(impl, logits, target, case_min_kept, compile_mode)
                    timing = measure(step, device, warmup=1, repeats=repeats)
                    if impl.startswith("eager"):
                        baselines[impl] = timing
                    if not compile_only:
                        yield _row(fields, impl, timing, baselines["eager-prechecked" if impl == "cuda-prechecked"
                                                                   else "eager"], dtype)
                if with_compile:
                    to_compile.append((fields, logits, target, case_min_kept, baselines["eager"], dtype))
    for fields, logits, target, case_min_kept, eager, dtype in to_compile:
        timing = measure(step_fn("compile", logits, target, case_min_kept, compile_mode), device, warmup=1,
                         repeats=repeats)
        yield _row({**fields, "case": f"{fields['case']} mode={compile_mode}"}, "compile", timing, eager, dtype)


def _row(fields: dict, impl: str, timing: dict, eager: dict, dtype: torch.dtype) -> dict:
    return {
        **fields,
        "impl": impl,
        "ms": timing["ms"],
        "ms_min": timing["ms_min"],
        "peak_extra_mb": timing["peak_extra_mb"],
        **speedups(eager, timing),
        **accuracy(eager, timing, dtype),
    }


if __name__ == "__main__":
    sys.exit(cli(module="bench_ohem_cross_entropy"))
