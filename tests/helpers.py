"""Markers and helpers shared by the tests (conftest.py has switched the Triton interpreter on
when there is no GPU)."""
import os

import pytest
import torch

import bisenet_fast as bf

CUDA = torch.cuda.is_available()
# The contract's generated mmseg data (../shared/reference), copied so that a clone tests alone.
MMSEG_REFERENCE = os.path.join(os.path.dirname(__file__), "data", "mmseg_reference")
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


def assert_fake_kernel_refuses_mixed_devices(op, args):
    """Each tensor argument of `op` in turn on the meta device, the others where they are: the
    Meta key sends such a call to the fake kernel, which must name the mismatch rather than
    return uninitialised tensors."""
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            mixed = args[:i] + [arg.to("meta")] + args[i + 1:]
            with pytest.raises(ValueError, match="all tensor arguments must be on one device"):
                op(*mixed)
