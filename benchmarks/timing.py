"""Timing and memory measurement shared by every benchmark.

GPU: CUDA events around each call after warm-up, median over repeats ("ms": what one call
costs a caller that waits for it, host overhead and launch latency included); the GPU time
the call's kernels occupy ("device_ms", torch.profiler/CUPTI: what the call costs inside a
model whose GPU queue stays full), with the call's longest kernels by name
("device_kernels", in the JSON rows); peak memory is torch.cuda.max_memory_allocated above
what was allocated before the call.
CPU: perf_counter around each call, median over repeats; peak memory is the most that the
blocks ATen's CPU allocator hands out during one more call hold at once
(cpu_peak_extra_mb: tracemalloc does not see ATen's allocations, and the process's RSS
hides what malloc reuses).
Every row keeps a copy of its first call's output, which output_check() compares with the
eager row's.
Any device: saved_activation_mb() counts what autograd keeps for backward, a memory
number that does not depend on the device's allocator.
"""
from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from typing import Callable, Iterable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Zeroed before each timed GPU call to evict the op's data from L2 (60 MB on an H200,
# 50 MB on an H100).
L2_FLUSH_BYTES = 256 * 2**20


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)


def _cold_l2(l2_flush: torch.Tensor, device: torch.device) -> None:
    """Evict the op's data from L2 and wait until that is done. The wait matters for the
    event timing: a start event queued behind the flush would be recorded only when the
    flush ends on the GPU (~60 us for 256 MB on an H200), while the host already runs the
    timed call's Python, checks and launches, so up to that much host overhead would drop
    out of "ms" (more of it for the calls with more host work: eager's many ops, a compiled
    function's guards), and the wall-time speed-ups of sub-millisecond ops with it."""
    l2_flush.zero_()
    torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: str | torch.device, *, warmup: int = 3, repeats: int = 10,
            top_kernels: int = 5, cpu_peak_memory: bool = True) -> dict:
    """Median/min time of fn() in ms, peak extra memory in MB (on CUDA over the timed calls;
    on the CPU over one more call, unless cpu_peak_memory is False), the call's
    `top_kernels` longest kernels (CUDA), and "output": what the first call returned
    (warm-up or, without warm-up, timed), copied after it, for accuracy() to compare with
    the eager row's. On CUDA every timed or profiled call starts with a cold L2 (a buffer
    larger than it is zeroed before, outside the timing, as triton.testing.do_bench does):
    the ops' working sets (35 MB for the BGA at the inference shape) fit an H200's 60 MB of
    L2, and repeated calls on the same tensors would read them from there, which a network
    does not, and which GB/s against the HBM copy bandwidth would then overstate."""
    device = torch.device(device)
    output = None
    for i in range(warmup):
        result = fn()
        if i == 0:
            output = snapshot(result)
        del result
    _sync(device)
    keep_output = warmup == 0
    times = []
    peak_mb = device_ms = None
    kernels: dict[str, float] = {}
    if device.type == "cuda":
        l2_flush = _l2_flush_buffer(device)  # before base: not counted
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            _cold_l2(l2_flush, device)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            if keep_output:
                output, keep_output = snapshot(result), False
            del result
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        device_ms, kernels = device_busy_ms(fn, device, repeats=min(repeats, 3), top=top_kernels, l2_flush=l2_flush)
        del l2_flush
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if keep_output:
                output, keep_output = snapshot(result), False
            del result
        if cpu_peak_memory:
            peak_mb = cpu_peak_extra_mb(fn)
    return {"ms": statistics.median(times), "ms_min": min(times), "device_ms": device_ms, "peak_extra_mb": peak_mb,
            "repeats": repeats, "device_kernels": kernels, "output": output}


def device_busy_ms(fn: Callable[[], object], device: torch.device, *, repeats: int = 5, top: int = 5,
                   l2_flush: torch.Tensor | None = None) -> tuple[float | None, dict[str, float]]:
    """The GPU time one call of fn() occupies: the summed durations of the kernels, copies
    and fills it launches, as CUPTI reports them through torch.profiler, in the median call
    of `repeats`; and that call's `top` longest kernels ({name: ms}), which tell where the
    time goes (e.g. a loss's forward, selection and backward kernels).

    Event timing of a lone call includes host work (Python, argument checks, dispatch) and
    launch latency, which dominate sub-millisecond ops and hide what their kernels cost;
    this leaves both out. (None, {}) if the profiler saw no GPU activity (e.g. no CUPTI).
    l2_flush: zeroed (and waited for) before each profiled call, outside the profile.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    calls = []
    for _ in range(repeats):
        if l2_flush is not None:
            _cold_l2(l2_flush, device)
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize(device)
        except RuntimeError as error:  # a sandbox without CUPTI tracing: keep the wall times
            warnings.warn(f"device_ms not measured, torch.profiler failed: {error}")
            return None, {}
        # As the profiler's own "Self CUDA time total": GPU-side events, annotations excluded.
        kernels: dict[str, float] = {}
        for e in prof.events():
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
                kernels[e.name] = kernels.get(e.name, 0.0) + e.self_device_time_total / 1e3
        calls.append((sum(kernels.values()), kernels))
    calls.sort(key=lambda call: call[0])
    busy, kernels = calls[len(calls) // 2]
    if not busy:
        return None, {}
    longest = sorted(kernels.items(), key=lambda item: -item[1])[:top]
    return busy, {name[:120]: ms for name, ms in longest}


def cpu_peak_extra_mb(fn: Callable[[], object]) -> float | None:
    """The most memory, in MB, that blocks ATen's CPU allocator hands out during one call of
    fn() hold at once: the CPU counterpart of max_memory_allocated above the starting point.
    Read from torch.profiler's allocation records (profile_memory), each of which carries
    the running total of the blocks allocated while it records; what fn returns is freed
    after the profile and so counts. One difference from the GPU number: the profiler
    does not see the size of a block allocated before the call, so freeing one does not
    lower the total, and a call that replaces existing tensors (a training step freeing
    the previous gradients) counts the new ones in full. None, with a warning, where the
    profiler's event tree (torch-internal API, which may change between releases) cannot
    be read."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        pending = list(prof.profiler.kineto_results.experimental_event_tree())
        allocations = []
        while pending:
            node = pending.pop()
            pending.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                allocations.append((node.start_time_ns, node.extra_fields))
    except (AttributeError, ImportError, RuntimeError) as error:
        warnings.warn(f"CPU peak memory not measured: {error}")
        return None
    if not allocations:  # (tests/test_benchmarks_timing.py checks that allocations are seen)
        return 0.0
    allocations.sort(key=lambda allocation: allocation[0])
    first = allocations[0][1]
    before = first.total_allocated - first.alloc_size
    return max(0, max(fields.total_allocated for _, fields in allocations) - before) / 2**20


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


def compile_baseline(fn: Callable, mode: str, *, backend: str = "inductor") -> Callable:
    """torch.compile of an eager baseline, for one benchmark case (one shape, dtype, layout
    and grad mode): build a new one per case.

    Dynamo's caches are reset first and shapes are static. Compiled again and again for new
    shapes, one function would be recompiled with dynamic shapes (automatic dynamic) and,
    past the recompile limit, run eagerly without a word: rows labelled "compile" would time
    something else. After its first call (the one that compiles), a call that would
    recompile raises instead (torch.compiler.set_stance, torch 2.6+).
    """
    torch._dynamo.reset()
    compiled = torch.compile(fn, mode=mode, dynamic=False, backend=backend)
    compiled_once = False

    def call(*args, **kwargs):
        nonlocal compiled_once
        stance = _no_recompiles() if compiled_once else contextlib.nullcontext()
        compiled_once = True
        with stance:
            return compiled(*args, **kwargs)

    return call


def _no_recompiles():
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("fail_on_recompile") if set_stance else contextlib.nullcontext()


def default_compile_mode(device: str | torch.device) -> str:
    """The torch.compile mode of the baselines: on a GPU max-autotune's kernel tuning (the
    issues' targets name max-autotune) without its CUDA graphs, the default mode on the CPU
    (max-autotune's C++ GEMM tuning there takes longer than a CPU benchmark run).

    Why no CUDA graphs: a graph replay removes launch overhead, not kernel time, and would do
    the same for the eager and fused rows it is compared with (bench_model times graphed
    fused rows of its own); and the graphs' private memory pool is allocated at warm-up,
    before measure() resets the peak, so the compiled rows' peak memory would read ~0."""
    return "max-autotune-no-cudagraphs" if torch.device(device).type == "cuda" else "default"


def copy_bandwidth_gbps(device: str | torch.device, mib: int = 1024) -> float | None:
    """The device memory bandwidth a plain copy achieves (GB/s: bytes read + written over the
    copy kernel's time in the median of 5 calls), the practical peak that the memory-bound kernels'
    GB/s are compared with. None off CUDA or without profiler timing."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    busy, _ = device_busy_ms(lambda: dst.copy_(src), device, repeats=5, top=1)
    return 2 * src.numel() / busy / 1e6 if busy else None


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def result_row(op: str, case: str, impl: str, dtype: torch.dtype, shape: list, timing: dict, eager: dict,
               bytes_moved: int | None = None) -> dict:
    """One benchmark row in the schema benchmarks/run.py prints and stores; `eager` is the
    timing of the eager baseline the row is compared with."""
    row = {
        "op": op,
        "case": case,
        "impl": impl,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": shape,
        "ms": timing["ms"],
        "ms_min": timing["ms_min"],
        "peak_extra_mb": timing["peak_extra_mb"],
        **speedups(eager, timing),
        **accuracy(eager, timing, dtype),
    }
    if bytes_moved is not None:
        row["gbps"] = achieved_gbps(bytes_moved, timing)
    return row


def speedups(eager: dict, timing: dict) -> dict:
    """Speed-up over the eager baseline by wall time and, where measured (GPU), by the GPU
    time of the kernels alone (device_x_eager)."""
    device_ms, eager_device_ms = timing.get("device_ms"), eager.get("device_ms")
    row = {
        "speedup_vs_eager": eager["ms"] / timing["ms"],
        "device_ms": device_ms,
        "device_x_eager": eager_device_ms / device_ms if device_ms and eager_device_ms else None,
    }
    if timing.get("device_kernels"):  # the JSON's per-kernel breakdown (GPU only)
        row["device_kernels"] = timing["device_kernels"]
    return row


# Largest relative error (over eager, in the 2-norm) a row's output may have: TF32 convs
# and matmuls in float32 on a GPU, float16/bfloat16 rounding through a whole network. A
# kernel that computes something else is off by ~1.
OUTPUT_TOLERANCE = {torch.float32: 2e-2, torch.float64: 1e-6, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def snapshot(output):
    """fn()'s output, detached and copied: a CUDA graph replay or the next call may
    overwrite the tensors it returned. Tensors in nested tuples/lists; None stays None."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, (tuple, list)):
        return type(output)(snapshot(o) for o in output)
    return output


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    return []


def _relative_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """||outs - refs|| / ||refs|| over a group of tensors, in float64 (NaN if outs holds one)."""
    diff = sum(float((o.double() - r.double()).square().sum()) for o, r in zip(outs, refs))
    norm = sum(float(r.double().square().sum()) for r in refs)
    return (diff / norm) ** 0.5 if norm > 0 else (0.0 if diff == 0 else float("inf"))


def output_check(output, reference, dtype: torch.dtype) -> dict:
    """How far a row's output (its callable's return value) is from the eager row's.

    Each top-level part of the output (a tensor, or a list/tuple of tensors such as all the
    parameters' gradients) is one group; rel_err is the largest over the groups of
    ||output - reference|| / ||reference||, in float64. Per group, so that a small part (a
    gradient beside its loss) is not drowned by a large one; a norm within the group, not a
    max, so that OHEM's kept set differing by a pixel at the threshold between
    implementations (which moves a few gradient values by their full size) stays within
    tolerance. output_ok when within OUTPUT_TOLERANCE[dtype]: a row whose numbers come from
    a wrong result is flagged by benchmarks.run rather than timed silently."""
    outs, refs = _tensors(output), _tensors(reference)
    if (not refs or type(output) is not type(reference) or len(outs) != len(refs)
            or (isinstance(reference, (tuple, list)) and len(output) != len(reference))
            or any(o.shape != r.shape for o, r in zip(outs, refs))):
        shapes = ([tuple(t.shape) for t in outs], [tuple(t.shape) for t in refs])
        raise ValueError(f"output_check: the output's tensors {shapes[0]} do not match the reference's {shapes[1]}")
    groups = list(zip(output, reference)) if isinstance(reference, (tuple, list)) else [(output, reference)]
    errors = [_relative_error(_tensors(out), _tensors(ref)) for out, ref in groups if _tensors(ref)]
    rel_err = float("nan") if any(e != e for e in errors) else max(errors)
    return {"rel_err": rel_err, "output_ok": bool(rel_err <= OUTPUT_TOLERANCE[dtype])}  # NaN: not ok


def accuracy(eager: dict, timing: dict, dtype: torch.dtype) -> dict:
    """output_check of a row's measured output against the eager row's ({} for the eager row
    itself, and where the benchmarked call returns no tensor)."""
    if timing is eager or not _tensors(eager["output"]):
        return {}
    return output_check(timing["output"], eager["output"], dtype)


def achieved_gbps(bytes_moved: int, timing: dict) -> float:
    """Bytes per second of the kernels themselves: over device_ms where it was measured (GPU),
    else over the wall time."""
    return bytes_moved / (timing.get("device_ms") or timing["ms"]) / 1e6

