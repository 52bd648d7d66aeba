"""Which implementation of a fused op runs.

Backends:
  eager   the PyTorch reference (any device)
  cpp     the C++ CPU kernels of bisenet_fast._C (CPU tensors)
  cuda    the CUDA kernels of bisenet_fast._C (CUDA tensors; only if compiled with CUDA)
  triton  the Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)

By default ("auto") each op picks its fused kernel for the tensors' device: cpp on CPU,
and on CUDA the op's preferred GPU backend among those available. `use(name)` (a
context manager, thread-local; `use(name, ops=[...])` for the named ops only) or the
BISENET_FAST_BACKEND environment variable force one; a forced backend that cannot run the
call raises instead of silently running something else.

Being thread-local, a `use()` block does not reach work that torch runs on other threads:
nn.DataParallel's replicas, and the forward that torch.utils.checkpoint recomputes during a
CUDA backward (autograd's device thread). Force a backend for those through
BISENET_FAST_BACKEND, or inside the module's own forward.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import threading
from typing import Iterable, Iterator, Sequence

import torch

NAMES = ("eager", "cpp", "cuda", "triton")
# The names under which the fused ops ask resolve() for their backend (use(name, ops=...)).
OPS = ("bga_aggregate", "bga_pointwise_aggregate", "conv3x3_winograd", "ge_expand_train", "ge_layer_stride1",
       "ge_layer_stride2", "ohem_cross_entropy", "resize_bilinear")
ENV_VAR = "BISENET_FAST_BACKEND"
# The oldest triton the kernels are tested with (3.5.1, torch 2.9's; 3.6 and 3.8 pass too).
# Triton 3.1 (torch 2.5's) rejects them (tl.arange of constexpr expressions), so releases
# before the tested ones are refused with this reason rather than failing inside a kernel.
MIN_TRITON_VERSION = (3, 5)

_local = threading.local()


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that is not built, not installed, or cannot run the call."""


def _installation_fact(query):
    """query's result, computed once: a fact of the installation. torch.compile takes it as a
    constant (through an lru_cache it would trace, warning on every compile)."""
    result = []

    @functools.wraps(query)
    def cached():
        if not result:
            result.append(query())
        return result[0]

    return torch.compiler.assume_constant_result(cached)


@_installation_fact
def _compiled_with_cuda() -> bool:
    # Fixed at build time; cached because every fused-op call on a GPU asks (the uncached
    # query cost ~10 us of host time per call, as much as a small kernel runs).
    from bisenet_fast._C import build_info

    return bool(build_info()["cuda"])


# Triton picks its interpreter as it decorates kernels, its own helpers at its import, which
# loading bisenet_fast brings about (torch._dynamo imports triton): TRITON_INTERPRET=1 set
# later would run interpreted kernels calling compiled helpers, an InterpreterError inside
# the kernel, so the setting at import is the one that counts.
_TRITON_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_interpreted() -> bool:
    """Whether Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1 when
    bisenet_fast was imported)."""
    return _TRITON_INTERPRET_AT_IMPORT


@_installation_fact
def _triton_version() -> tuple[int, int] | None:
    """The installed triton's (major, minor), None if it is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    major, minor = re.match(r"(\d+)\.(\d+)", triton.__version__).groups()
    return int(major), int(minor)


def triton_install_problem() -> str | None:
    """Why the installed triton cannot run these kernels anywhere (missing, too old), or None."""
    version = _triton_version()
    if version is None:
        return "the triton package is not installed"
    if version < MIN_TRITON_VERSION:
        return (f"triton {version[0]}.{version[1]} is older than {MIN_TRITON_VERSION[0]}.{MIN_TRITON_VERSION[1]}, "
                "the oldest release these kernels are tested with")
    return None


def _build_problem(name: str) -> str | None:
    """Why backend `name` is not built or installed here, None if it is. For tensors already on
    a CUDA device this is all that decides whether a GPU backend can run them."""
    if name in ("eager", "cpp"):
        return None
    if name == "cuda":
        if not _compiled_with_cuda():
            return "bisenet_fast._C was built without CUDA (rebuild with FORCE_CUDA=1 where nvcc exists)"
        return None
    if name == "triton":
        return triton_install_problem()
    raise ValueError(f"unknown backend {name!r}; expected one of {NAMES}")


def _why_unavailable(name: str) -> str | None:
    """None if `name` can run on this machine, else the reason it cannot."""
    problem = _build_problem(name)
    if problem is not None:
        return problem
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if name == "triton" and not (torch.cuda.is_available() or triton_interpreted()):
        return ("no CUDA device is available (set TRITON_INTERPRET=1 before importing bisenet_fast to run Triton "
                "kernels on the CPU)")
    return None


def available() -> list[str]:
    """The backends that can run on this machine, e.g. ['eager', 'cpp', 'cuda', 'triton']."""
    return [name for name in NAMES if _why_unavailable(name) is None]


def _check_name(name: str) -> None:
    if name not in NAMES and name != "auto":
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {NAMES}")


def current(op: str | None = None) -> str:
    """The backend forced for `op` ('auto' when none): the innermost use() that covers it
    wins over BISENET_FAST_BACKEND. Without an op, only use() blocks that name no ops count."""
    stack = getattr(_local, "stack", None)
    if stack:
        for name, ops in reversed(stack):
            if ops is None or op in ops:
                return name
    name = os.environ.get(ENV_VAR)
    if name is None:  # the common case, first: this runs on every fused-op call
        return "auto"
    name = name.strip().lower() or "auto"
    if name not in NAMES and name != "auto":
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; expected 'auto' or one of {NAMES}")
    return name


def _require_available(name: str, source: str = "") -> None:
    if name != "auto":
        reason = _why_unavailable(name)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r}{source} is not available: {reason}")


@contextlib.contextmanager
def use(name: str, ops: Iterable[str] | None = None) -> Iterator[str]:
    """Force backend `name` ('auto' restores the default choice) inside the block, for every
    op or, with `ops`, for those ops only (e.g. ops=["ge_layer_stride1", "ge_layer_stride2"]
    runs the GE layers on CUDA while the fused model's other ops keep their backends)."""
    _check_name(name)
    if isinstance(ops, str):
        raise TypeError(f"use(): ops must be a collection of op names, got the string {ops!r}")
    if ops is not None and not isinstance(ops, Iterable):
        raise TypeError(f"use(): ops must be a collection of op names, got {type(ops).__name__}")
    if ops is not None:
        ops = frozenset(ops)
        unknown = sorted(ops - set(OPS))
        if unknown:  # a misspelt name would leave that op on its default backend, silently
            raise ValueError(f"use(): unknown op name(s) {unknown}; expected names from {OPS}")
    _require_available(name)
    stack = _local.__dict__.setdefault("stack", [])
    entry = (name, ops)
    stack.append(entry)
    try:
        yield name
    finally:
        # This block's own entry, not the last one: generators and coroutines can leave their
        # use() blocks in another order than they entered them.
        del stack[max(i for i, other in enumerate(stack) if other is entry)]


def use_or_current(name: str | None) -> contextlib.AbstractContextManager[str]:
    """use(name); for None, the current choice (an enclosing use(), else BISENET_FAST_BACKEND,
    else 'auto') is kept, and checked now rather than at the first op: what the command
    lines' --backend and train()'s backend default to."""
    if name is not None:
        return use(name)
    chosen = current()
    _require_available(chosen, f" (from {ENV_VAR})")  # an enclosing use() has checked its own
    return contextlib.nullcontext(chosen)


def cpu_kernel_selected(device: torch.device) -> bool:
    """Whether a CPU-only kernel (one whose GPU counterpart is ATen/cuDNN itself) runs for
    tensors on `device`: CPU tensors with no backend, or 'cpp', forced."""
    return device.type == "cpu" and current() in ("auto", "cpp")


def fused_backends(device: torch.device, gpu_preference: Sequence[str] = ("cuda", "triton")) -> list[str]:
    """The fused backends that can run an op on tensors of `device`, best first: ['cpp'] on
    the CPU, the built or installed ones of the op's gpu_preference on CUDA, [] elsewhere."""
    kind = device.type
    if kind == "cpu":
        return ["cpp"]
    if kind == "cuda":
        return [name for name in gpu_preference if _build_problem(name) is None]
    return []


def resolve(op: str, device: torch.device, gpu_preference: Sequence[str] = ("cuda", "triton"),
            name: str | None = None) -> str:
    """The backend that runs `op` on tensors of `device`: `name` if given (as if forced with
    use(name, ops=[op])), else the current choice.

    gpu_preference: the op's GPU backends, best first; a forced GPU backend that is not
    among them raises (the op has no such kernel)."""
    if name is None:
        name = current(op)
    else:
        _check_name(name)
    if name == "auto":
        kind = device.type
        if kind == "cpu":
            return "cpp"
        if kind == "cuda":
            if not gpu_preference:
                raise BackendUnavailableError(
                    f"{op} has no GPU kernel (it is a CPU kernel); use bisenet_fast.backends.use('eager') to run "
                    "the reference on this device"
                )
            # The first built one (the tensors prove a device is present): this runs on every
            # fused-op call on a GPU, where fused_backends' list and the device queries cost
            # ~6 us of host time per call.
            for candidate in gpu_preference:
                if _build_problem(candidate) is None:
                    return candidate
            reasons = "; ".join(f"{candidate}: {_build_problem(candidate)}" for candidate in gpu_preference)
            raise BackendUnavailableError(
                f"{op}: no fused GPU backend is available ({reasons}); "
                "use bisenet_fast.backends.use('eager') to run the reference"
            )
        raise BackendUnavailableError(f"{op}: tensors on {device.type} are only supported by backend 'eager'")
    reason = _why_unavailable(name)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {name!r} is not available: {reason}")
    if name in ("cuda", "triton") and name not in gpu_preference:
        others = f"its GPU backends are {', '.join(gpu_preference)}" if gpu_preference else "it has only a CPU kernel"
        raise BackendUnavailableError(f"{op}: there is no {name} kernel for this op; {others}")
    if name == "cpp" and device.type != "cpu":
        raise BackendUnavailableError(f"{op}: backend 'cpp' runs CPU tensors, got tensors on {device}")
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"{op}: backend 'cuda' runs CUDA tensors, got tensors on {device}")
    if name == "triton" and device.type == "cpu" and not triton_interpreted():
        raise BackendUnavailableError(
            f"{op}: backend 'triton' got CPU tensors; set TRITON_INTERPRET=1 (before importing bisenet_fast) "
            "to run Triton kernels on the CPU"
        )
    return name
