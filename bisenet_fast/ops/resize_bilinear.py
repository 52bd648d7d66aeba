"""Bilinear resize with align_corners=False (F.interpolate(x, size, mode="bilinear")),
inference only, for the CPU: the fused model's last step, resizing the decode head's logits
to the input size.

ATen's CPU kernel interpolates every output value from four inputs; here each low-res row
is upsampled horizontally once and each output row is a vectorised blend of two such rows
(csrc/cpu/resize_bilinear.cpp). Same taps as F.interpolate (csrc/common/bilinear.h), so
float32 results agree to rounding (~1e-7 of the scale).

Backends: cpp and eager (F.interpolate). No GPU kernel: on CUDA, ATen's upsample is already
a memory-bound kernel, and the fused model calls it there. Dtypes float32, float16,
bfloat16 (taps in float, as ATen computes them for float32). Output NCHW-contiguous.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from bisenet_fast import backends
from bisenet_fast.ops._checks import (
    check_inference_only,
    check_non_empty,
    check_tensor,
    fake_inference_only,
    fake_on_one_device,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resize_bilinear_reference(x, size):
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False).contiguous()


def size_pair(size) -> list:
    """size as [H, W]: two positive integers (Python, numpy or torch integer scalars, or the
    SymInts of a traced shape under torch.compile/export, kept symbolic; not bool, float or
    str), else a TypeError/ValueError that says so."""
    try:
        if isinstance(size, (str, bytes)) or any(isinstance(s, bool) for s in size):
            raise TypeError
        values = [s if isinstance(s, (int, torch.SymInt)) else operator.index(s) for s in size]
    except TypeError:
        raise TypeError(_bad_size(size)) from None
    if len(values) != 2 or not (values[0] > 0 and values[1] > 0):
        raise ValueError(_bad_size(size))
    return values


def _bad_size(size) -> str:
    # Only formatted on failure: a traced SymInt has no repr inside a compiled graph.
    return f"size must be two positive ints (H, W), got {size!r}"


def check_inputs(x, size):
    check_tensor("x", x, dim=4, dtypes=DTYPES)
    check_non_empty("x", x)
    check_inference_only("resize_bilinear", {"x": x}, "use F.interpolate for training")


@torch.library.register_fake("bisenet_fast::resize_bilinear")
@fake_on_one_device("resize_bilinear")
@fake_inference_only("resize_bilinear", "use F.interpolate for training")
def _resize_bilinear_fake(x, size):
    return x.new_empty((x.shape[0], x.shape[1], size[0], size[1]))


def resize_bilinear(x, size):
    """F.interpolate(x, size, mode="bilinear", align_corners=False) as an NCHW-contiguous tensor."""
    size = size_pair(size)
    check_inputs(x, size)
    backend = backends.resolve("resize_bilinear", x.device, gpu_preference=())
    if backend == "eager":
        return resize_bilinear_reference(x, size)
    return torch.ops.bisenet_fast.resize_bilinear(x, size)
