"""CUDA kernels' block code compiled for the CPU and run there (shim.h), so the tests check
its indexing and synchronisation on machines without a GPU. Built on first use with
torch.utils.cpp_extension (about 15 s each on 2 cores) into build/ of this checkout, one folder
per torch version and module: torch's shared ~/.cache folder would mix versions, and torch 2.14
leaves its lock file behind, which older torch waits on for ever.

With BISENET_FAST_EMULATION_SANITIZE=1 the modules are built with AddressSanitizer and
UndefinedBehaviorSanitizer (aborting on the first report), into a folder of their own: an
out-of-bounds access of global or shared memory, or a misaligned vector access, which a
GPU may not report or which faults there, stops the process. The interpreter must then
run with libasan preloaded (tests/test_cuda_emulation_sanitized.py does all that)."""
from __future__ import annotations

import functools
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
SANITIZE_ENV = "BISENET_FAST_EMULATION_SANITIZE"
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
SOURCES = ("ge_layer", "bga", "ohem_cross_entropy")


def ge_layer():
    """The module of tests/cuda_emulation/ge_layer.cpp: ge_layer_stride1/2(..., sm_count, tensor_cores), plan(...)."""
    return load("ge_layer")


def bga():
    """The module of tests/cuda_emulation/bga.cpp: forward(detail, semantic, detail_down, semantic_down,
    sm_count), backward(grad_out, ..., sm_count)."""
    return load("bga")


def ohem_cross_entropy():
    """The module of tests/cuda_emulation/ohem_cross_entropy.cpp: forward(...), backward(..., sm_count,
    shared_bytes_optin), tiling(...)."""
    return load("ohem_cross_entropy")


@functools.lru_cache(maxsize=None)
def load(source):
    """The module of tests/cuda_emulation/<source>.cpp, built if it is not yet. Each module
    builds in a folder of its own, so that processes may build them at once."""
    from torch.utils.cpp_extension import load as build_and_import

    sanitized = os.environ.get(SANITIZE_ENV) == "1"
    return build_and_import(
        name=f"bisenet_fast_cuda_emulation_{source}",
        sources=[str(ROOT / "tests" / "cuda_emulation" / f"{source}.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests")],
        # -g1: the line tables a report's stack trace needs, at 2/3 of -g's build time.
        extra_cflags=["-O1", "-g1", *SANITIZER_FLAGS] if sanitized else ["-O2"],
        extra_ldflags=["-pthread", *SANITIZER_FLAGS] if sanitized else ["-pthread"],
        build_directory=str(_build_directory(source, sanitized)),
    )


def _build_directory(source: str, sanitized: bool):
    import torch

    flavour = f"torch-{torch.__version__}{'-sanitized' if sanitized else ''}"
    folder = ROOT / "build" / "cuda_emulation" / flavour / source
    folder.mkdir(parents=True, exist_ok=True)
    return folder
