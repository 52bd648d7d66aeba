"""Bilateral Guided Aggregation (spec §2.3):
    detail * sigmoid(up(semantic)) + up(detail_down * sigmoid(semantic_down))
with up = bilinear resize (align_corners=False) to detail's spatial size.

detail (N, C, H, W); semantic, detail_down, semantic_down (N, C, h, w), any h, w (1/8 is
not always 4x 1/32, spec §2.4). The fused kernels compute in float32 (float64 for float64
inputs: on the CPU with float64 bilinear weights, as ATen's CPU upsample, so to float64
precision; the CUDA kernel's weights are float32 for every dtype, so its float64 results
agree with the reference to about float32 precision: relative differences up to ~2e-5
where terms cancel), return the input dtype in detail's memory format (channels_last stays
channels_last), and have a deterministic backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from bisenet_fast import backends
from bisenet_fast.ops._autograd import refuse_double_backward
from bisenet_fast.ops._checks import FLOAT_DTYPES, check_shape, check_tensor, fake_on_one_device, plain_tensors_match
from bisenet_fast.ops._triton_device import on_tensors_device

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bga_aggregate_reference(detail, semantic, detail_down, semantic_down):
    """Eager oracle, in the order mmseg's BGALayer computes it."""
    size = detail.shape[-2:]
    fuse1 = detail * torch.sigmoid(F.interpolate(semantic, size=size, mode="bilinear", align_corners=False))
    fuse2 = F.interpolate(detail_down * torch.sigmoid(semantic_down), size=size, mode="bilinear", align_corners=False)
    return fuse1 + fuse2


def _bga_inputs_valid(detail, semantic, detail_down, semantic_down) -> bool:
    """Whether check_bga_inputs passes (its fast path: ~2 us of host time per call instead of
    ~5 on the 2-core CPU, for an op whose GPU kernel takes 10-40 us at the inference shape)."""
    if not (type(detail) is torch.Tensor and detail.dim() == 4 and detail.dtype in FLOAT_DTYPES
            and type(semantic) is torch.Tensor and semantic.dim() == 4):
        return False
    high, low = detail.shape, semantic.shape
    return (high[1] > 0 and high[2] > 0 and high[3] > 0 and low[2] > 0 and low[3] > 0 and low[:2] == high[:2]
            and plain_tensors_match(detail, ((semantic, low), (detail_down, low), (semantic_down, low))))


def check_bga_inputs(detail, semantic, detail_down, semantic_down, op="bga_aggregate", detail_name="detail") -> None:
    """op and detail_name: how the messages name the op and its first argument."""
    if _bga_inputs_valid(detail, semantic, detail_down, semantic_down):
        return  # the checks below only find which argument is wrong, and how
    check_tensor(detail_name, detail, dim=4, dtypes=FLOAT_DTYPES)
    n, c = detail.shape[:2]
    low = None
    for name, t in (("semantic", semantic), ("detail_down", detail_down), ("semantic_down", semantic_down)):
        check_tensor(name, t, dim=4, dtypes=(detail.dtype,), device=detail.device)
        if t.shape[:2] != (n, c):
            raise ValueError(f"{name} must have batch and channels ({n}, {c}) like {detail_name}, got {tuple(t.shape)}")
        if low is None:
            low = t.shape[-2:]
        elif t.shape[-2:] != low:
            raise ValueError(f"{name} must have spatial size {tuple(low)} like semantic, got {tuple(t.shape[-2:])}")
    if c == 0:
        raise ValueError(f"{op}: {detail_name} must have at least one channel, got {tuple(detail.shape)}")
    if min(detail.shape[-2:]) == 0 or min(low) == 0:
        raise ValueError(f"{op}: spatial sizes must be non-empty")


# --- C++ / CUDA ops (schemas in csrc/ops.cpp) -------------------------------------------


@torch.library.register_fake("bisenet_fast::bga_aggregate")
@fake_on_one_device("bga_aggregate")
def _bga_aggregate_fake(detail, semantic, detail_down, semantic_down):
    return torch.empty_like(detail, memory_format=suggest_memory_format(detail))


@torch.library.register_fake("bisenet_fast::bga_aggregate_backward")
@fake_on_one_device("bga_aggregate_backward")
def _bga_aggregate_backward_fake(grad_out, detail, semantic, detail_down, semantic_down):
    fmt = suggest_memory_format(detail)
    grad_detail = torch.empty_like(detail, memory_format=fmt)
    return (grad_detail, *(torch.empty_like(detail_down, memory_format=fmt) for _ in range(3)))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bga_aggregate_backward(ctx, grad_out):
    return torch.ops.bisenet_fast.bga_aggregate_backward(grad_out, *ctx.saved_tensors)


torch.library.register_autograd(
    "bisenet_fast::bga_aggregate", _bga_aggregate_backward, setup_context=_setup_context
)
refuse_double_backward("bisenet_fast::bga_aggregate_backward", "bga_aggregate")


# --- Triton ops (a Python custom op so torch.compile and autograd see one node) -----------


def _triton_layout(detail, *tensors):
    """(channels_last, the tensors contiguous in detail's layout)."""
    fmt = suggest_memory_format(detail)
    return fmt == torch.channels_last, [t.contiguous(memory_format=fmt) for t in (detail, *tensors)]


@torch.library.custom_op("bisenet_fast_triton::bga_aggregate", mutates_args=())
@on_tensors_device
def _bga_aggregate_triton(
    detail: torch.Tensor, semantic: torch.Tensor, detail_down: torch.Tensor, semantic_down: torch.Tensor
) -> torch.Tensor:
    from bisenet_fast.triton_kernels.bga import bga_forward, check_forward_sizes

    check_bga_inputs(detail, semantic, detail_down, semantic_down)  # also when called as torch.ops directly
    check_forward_sizes(detail, suggest_memory_format(detail) == torch.channels_last, semantic)
    channels_last, tensors = _triton_layout(detail, semantic, detail_down, semantic_down)
    return bga_forward(*tensors, channels_last=channels_last)


@torch.library.custom_op("bisenet_fast_triton::bga_aggregate_backward", mutates_args=())
@on_tensors_device
def _bga_aggregate_backward_triton(
    grad_out: torch.Tensor,
    detail: torch.Tensor,
    semantic: torch.Tensor,
    detail_down: torch.Tensor,
    semantic_down: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from bisenet_fast.triton_kernels.bga import bga_backward

    check_bga_inputs(detail, semantic, detail_down, semantic_down)
    check_shape("grad_out", grad_out, detail.shape, dtype=detail.dtype, device=detail.device, what="detail")
    channels_last, (detail, grad_out, semantic, detail_down, semantic_down) = _triton_layout(
        detail, grad_out, semantic, detail_down, semantic_down
    )
    return bga_backward(grad_out, detail, semantic, detail_down, semantic_down, channels_last=channels_last)


_bga_aggregate_triton.register_fake(_bga_aggregate_fake)
_bga_aggregate_backward_triton.register_fake(_bga_aggregate_backward_fake)


def _bga_aggregate_backward_triton_autograd(ctx, grad_out):
    return torch.ops.bisenet_fast_triton.bga_aggregate_backward(grad_out, *ctx.saved_tensors)


_bga_aggregate_triton.register_autograd(_bga_aggregate_backward_triton_autograd, setup_context=_setup_context)
refuse_double_backward("bisenet_fast_triton::bga_aggregate_backward", "bga_aggregate")


def bga_aggregate(detail, semantic, detail_down, semantic_down):
    """The aggregation through the backend chosen for detail's device (bisenet_fast.backends)."""
    check_bga_inputs(detail, semantic, detail_down, semantic_down)
    backend = backends.resolve("bga_aggregate", detail.device)
    if backend == "eager":
        return bga_aggregate_reference(detail, semantic, detail_down, semantic_down)
    if backend == "triton":
        if detail.dtype not in TRITON_DTYPES:
            raise TypeError(f"bga_aggregate: backend 'triton' takes float32, float16 or bfloat16, got {detail.dtype}")
        return torch.ops.bisenet_fast_triton.bga_aggregate(detail, semantic, detail_down, semantic_down)
    return torch.ops.bisenet_fast.bga_aggregate(detail, semantic, detail_down, semantic_down)
