"""Markers and helpers shared by the tests (conftest.py has switched the Triton interpreter on
when there is no GPU)."""
import pytest
import torch

import bisenet_fast as bf

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
requires_cuda_build = pytest.mark.skipif(
    not (CUDA and bf.build_info()["cuda"]), reason="needs a CUDA device and bisenet_fast._C built with CUDA"
)
requires_triton = pytest.mark.skipif(
    "triton" not in bf.backends.available(), reason=f"needs the triton backend: {bf.backends._why_unavailable('triton')}"
)


def triton_device() -> str:
    """Where Triton kernels run in this session: the GPU, else the CPU interpreter."""
    return "cuda" if CUDA else "cpu"


def assert_close_to_scale(actual, expected, rel, what):
    """Max error at most `rel` of the largest magnitude in `expected` (gradients whose
    entries span orders of magnitude: elementwise rtol would fail on the tiny ones)."""
    assert actual is not None, f"{what}: missing"
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= rel, f"{what}: error {err:.3g} of the scale > {rel}"
