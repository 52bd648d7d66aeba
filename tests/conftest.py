"""Test setup: without a GPU, Triton kernels run on the CPU through its interpreter, which
must be switched on before triton (and so bisenet_fast) is imported."""
import os

import numpy
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch comes without triton
    triton = None


def pytest_configure(config):
    if triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
        _check_triton_interpreter()


if triton is not None:
    # At module level: older interpreters (triton 3.1) look triton.language up in the
    # kernel's globals.
    @triton.jit
    def _count_to(out_ptr, n):
        total = 0
        for _ in range(0, n):
            total += 1
        tl.store(out_ptr, total)


def _check_triton_interpreter():
    """Stop at once where the interpreter cannot run a loop with a runtime bound, instead of
    failing every Triton test with a TypeError from inside triton: Triton <= 3.6's interpreter
    converts such a bound with int() on a 1-element array, which numpy >= 2.4 refuses
    (triton-lang/triton#9171)."""
    try:
        _count_to[(1,)](torch.zeros(1, dtype=torch.int32), 3)
    except Exception as error:  # the interpreter wraps the TypeError in its own error type
        if "0-dimensional arrays" not in str(error):
            raise
        raise pytest.UsageError(
            f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run these tests with "
            f"numpy {numpy.__version__} ({error}; triton-lang/triton#9171): install numpy<2.4 or a newer "
            "triton (the Makefile's torch==2.14.1 brings triton 3.8)"
        ) from error
