"""Timing and memory measurement shared by every benchmark.

GPU: CUDA events around each call after warm-up, median over repeats; peak memory is
torch.cuda.max_memory_allocated above what was allocated before the call.
CPU: perf_counter around each call, median over repeats; peak memory is not measured
there (tracemalloc does not see ATen's allocator), so it is reported on GPU only.
Any device: saved_activation_mb() counts what autograd keeps for backward, a memory
number that does not depend on the device's allocator.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: str | torch.device, *, warmup: int = 3, repeats: int = 10) -> dict:
    """Median/min time of fn() in ms (and peak extra GPU memory in MB on CUDA)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    peak_mb = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "peak_extra_mb": peak_mb, "repeats": repeats}


def saved_activation_mb(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> float:
    """MB (2**20 bytes) of the tensors autograd saves for backward while fn() runs.

    Counts every tensor packed for backward (torch.autograd.graph.saved_tensors_hooks:
    built-in ops' saved inputs/outputs and custom ops' ctx.save_for_backward), once per
    distinct storage (views and repeated saves of one tensor count once) at the storage's
    full size (a saved slice holds its whole storage). Storages shared with `exclude` (e.g.
    the model's parameters and buffers and the input batch, which exist whether or not
    backward will run) are not counted.

    Not counted: workspace and temporaries freed during the forward, the outputs fn returns
    unless saved, anything a custom autograd Function keeps as a plain ctx attribute instead
    of through save_for_backward, gradients, and optimizer state. It is the activation
    memory a training step holds between forward and backward, not a peak.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    # Holding the storages until fn returns keeps a saved-then-freed storage's address from
    # being reused by a later one, which would make two storages look like one.
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved.setdefault(storage.data_ptr(), storage)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storage.nbytes() for storage in saved.values()) / 2**20


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def result_row(op: str, case: str, impl: str, dtype: torch.dtype, shape: list, timing: dict, eager_ms: float,
               bytes_moved: int | None = None) -> dict:
    """One benchmark row in the schema benchmarks/run.py prints and stores."""
    row = {
        "op": op,
        "case": case,
        "impl": impl,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": shape,
        "ms": timing["ms"],
        "ms_min": timing["ms_min"],
        "peak_extra_mb": timing["peak_extra_mb"],
        "speedup_vs_eager": eager_ms / timing["ms"],
    }
    if bytes_moved is not None:
        row["gbps"] = bytes_moved / timing["ms"] / 1e6
    return row

