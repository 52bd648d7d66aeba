"""Timing and memory measurement shared by every benchmark.

GPU: CUDA events around each call after warm-up, median over repeats; peak memory is
torch.cuda.max_memory_allocated above what was allocated before the call.
CPU: perf_counter around each call, median over repeats; peak memory is not measured
there (tracemalloc does not see ATen's allocator), so it is reported on GPU only.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

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

