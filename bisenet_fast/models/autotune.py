"""Per input size, the fastest of a layer's equivalent implementations, found by timing them
(what torch.backends.cudnn.benchmark does for one conv's algorithms, here for a whole layer).

`model.fuse(autotune=True)` gives each Gather-and-Expansion layer a LayerAutotuner. The
first call with a new input signature (shape, dtype, device, layout) times every candidate
the layer offers for that device and keeps the fastest; later calls with that signature run
it without timing anything. The candidates compute the same function (each is tested
against the eager reference), so a choice changes speed and float rounding only.

What was chosen, and each candidate's time, is in `autotune_choices(model)`.

Timing synchronises the device, so a new signature cannot be tuned while a CUDA graph is
being captured (capture_cuda_graph's warm-up calls tune first) and is not tuned inside
torch.compile (a signature tuned before compiling runs its choice; an untuned one runs the
layer's default implementation).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

# Each candidate: one untimed call (Triton compiles, cuDNN plans), then REPEATS timings of
# CALLS back-to-back calls; the median time per call counts.
CALLS = 3
REPEATS = 3

Signature = tuple  # (shape, dtype, device, channels_last): what a choice is kept for


def signature(x: torch.Tensor) -> Signature:
    return tuple(x.shape), x.dtype, x.device, x.is_contiguous(memory_format=torch.channels_last)


def time_per_call_ms(fn: Callable[[], object], device: torch.device, calls: int = CALLS,
                     repeats: int = REPEATS) -> float:
    """Median ms per call of fn(), over `repeats` runs of `calls` back-to-back calls, after
    one untimed call. On CUDA, events on the current stream: with calls queued back to
    back, the host's overhead is hidden wherever the GPU is the bottleneck, as in a model."""
    fn()
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


@dataclass(frozen=True)
class Choice:
    name: str
    ms: dict[str, float]  # every candidate's time per call


class LayerAutotuner:
    """Runs `run(name, x)` with the fastest of `candidates(x.device)` for x's signature.

    candidates: the names of the implementations a device can run, the layer's default
    first; run(name, x): that implementation's output; timer(fn, device) -> ms per call
    (time_per_call_ms; tests pass their own)."""

    def __init__(self, candidates: Callable[[torch.device], Sequence[str]], run: Callable[[str, torch.Tensor], torch.Tensor],
                 timer: Callable[[Callable[[], object], torch.device], float] = time_per_call_ms):
        self.candidates, self.run, self.timer = candidates, run, timer
        self.choices: dict[Signature, Choice] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.choices.get(signature(x))
        if choice is not None:
            return self.run(choice.name, x)
        if torch.compiler.is_compiling():
            return self.run(self.candidates(x.device)[0], x)
        return self.run(self.tune(x).name, x)

    def tune(self, x: torch.Tensor) -> Choice:
        """Time every candidate on x and keep the fastest for x's signature."""
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"autotune: input {tuple(x.shape)} {x.dtype} was never run before this CUDA graph capture, and "
                "timing cannot happen inside one; call the model once at this size first (capture_cuda_graph's "
                "warm-up does)"
            )
        ms = {name: self.timer(lambda name=name: self.run(name, x), x.device) for name in self.candidates(x.device)}
        choice = Choice(min(ms, key=ms.get), ms)
        self.choices[signature(x)] = choice
        return choice


def autotune_choices(model: nn.Module) -> dict[str, list[dict]]:
    """{module name: [{input shape, dtype, device, channels_last, choice, ms per candidate}, ...]}
    for every autotuned module of `model`, one entry per signature it has tuned."""
    report = {}
    for name, module in model.named_modules():
        tuner = getattr(module, "autotuner", None)
        if isinstance(tuner, LayerAutotuner):
            report[name] = [
                {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                 "channels_last": channels_last, "choice": choice.name, "ms": dict(choice.ms)}
                for (shape, dtype, device, channels_last), choice in tuner.choices.items()
            ]
    return report
