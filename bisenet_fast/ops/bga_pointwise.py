"""Bilateral Guided Aggregation with the 1x1 conv of detail_dwconv folded in, inference only:
    (pw_weight @ detail_dw + pw_bias) * sigmoid(up(semantic)) + up(detail_down * sigmoid(semantic_down))
i.e. bga_aggregate(conv2d(detail_dw, pw_weight[:, :, None, None], pw_bias), semantic,
detail_down, semantic_down) without writing the conv's output to memory: the fused kernels
are a GEMM (pixels x channels) whose epilogue applies the gate and the sum.

detail_dw (N, C, H, W) is the output of detail_dwconv's depthwise conv + BN; pw_weight
(C, C) and pw_bias (C) the folded pointwise conv; semantic, detail_down, semantic_down
(N, C, h, w) as in bisenet_fast/ops/bga.py. The output has detail_dw's dtype and memory
format (channels_last stays channels_last). No backward: tensors that require grad are
refused while grad mode is on.

Precision: the C++ kernel rounds the conv's output to the input dtype before the gate, as
F.conv2d does; the Triton kernel keeps it in fp32 and runs float32 GEMMs in TF32 exactly
when cuDNN's convolutions may use TF32 (torch.backends.cudnn.allow_tf32, or
torch.backends.cudnn.conv.fp32_precision), as F.conv2d then does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from bisenet_fast import backends
from bisenet_fast.ops._checks import check_inference_only, check_tensor, fake_inference_only, fake_on_one_device
from bisenet_fast.ops._triton_device import on_tensors_device
from bisenet_fast.ops.bga import TRITON_DTYPES, bga_aggregate_reference, check_bga_inputs

GPU_PREFERENCE = ("triton",)  # no CUDA C++ kernel for this op


def bga_pointwise_aggregate_reference(detail_dw, pw_weight, pw_bias, semantic, detail_down, semantic_down):
    """Eager oracle: the 1x1 conv, then the aggregation as mmseg's BGALayer computes it."""
    detail = F.conv2d(detail_dw, pw_weight[:, :, None, None], pw_bias)
    return bga_aggregate_reference(detail, semantic, detail_down, semantic_down)


def check_bga_pointwise_inputs(detail_dw, pw_weight, pw_bias, semantic, detail_down, semantic_down) -> None:
    check_bga_inputs(detail_dw, semantic, detail_down, semantic_down, "bga_pointwise_aggregate", "detail_dw")
    c = detail_dw.shape[1]
    check_tensor("pw_weight", pw_weight, dim=2, dtypes=(detail_dw.dtype,), device=detail_dw.device)
    if tuple(pw_weight.shape) != (c, c):
        raise ValueError(f"pw_weight must have shape ({c}, {c}) for detail_dw's {c} channels, got {tuple(pw_weight.shape)}")
    check_tensor("pw_bias", pw_bias, dim=1, dtypes=(detail_dw.dtype,), device=detail_dw.device)
    if tuple(pw_bias.shape) != (c,):
        raise ValueError(f"pw_bias must have shape ({c},), got {tuple(pw_bias.shape)}")
    inputs = dict(detail_dw=detail_dw, pw_weight=pw_weight, pw_bias=pw_bias, semantic=semantic,
                  detail_down=detail_down, semantic_down=semantic_down)
    check_inference_only("bga_pointwise_aggregate", inputs, "use bga_aggregate after the conv for training")


@torch.library.register_fake("bisenet_fast::bga_pointwise_aggregate")
@fake_on_one_device("bga_pointwise_aggregate")
@fake_inference_only("bga_pointwise_aggregate", "use bga_aggregate after the conv for training")
def _bga_pointwise_aggregate_fake(detail_dw, pw_weight, pw_bias, semantic, detail_down, semantic_down):
    return torch.empty_like(detail_dw, memory_format=suggest_memory_format(detail_dw))


@torch.library.custom_op("bisenet_fast_triton::bga_pointwise_aggregate", mutates_args=())
@on_tensors_device
def _bga_pointwise_aggregate_triton(
    detail_dw: torch.Tensor,
    pw_weight: torch.Tensor,
    pw_bias: torch.Tensor,
    semantic: torch.Tensor,
    detail_down: torch.Tensor,
    semantic_down: torch.Tensor,
) -> torch.Tensor:
    from bisenet_fast.triton_kernels.bga_pointwise import bga_pointwise_forward, check_sizes

    check_bga_pointwise_inputs(detail_dw, pw_weight, pw_bias, semantic, detail_down, semantic_down)  # direct calls
    check_sizes(detail_dw, semantic)
    fmt = suggest_memory_format(detail_dw)
    maps = [t.contiguous(memory_format=fmt) for t in (detail_dw, semantic, detail_down, semantic_down)]
    detail_dw, semantic, detail_down, semantic_down = maps
    return bga_pointwise_forward(
        detail_dw, pw_weight.contiguous(), pw_bias.contiguous(), semantic, detail_down, semantic_down,
        channels_last=fmt == torch.channels_last,
    )


_bga_pointwise_aggregate_triton.register_fake(_bga_pointwise_aggregate_fake)


def bga_pointwise_aggregate(detail_dw, pw_weight, pw_bias, semantic, detail_down, semantic_down):
    """The fused 1x1 conv + aggregation through the backend chosen for detail_dw's device."""
    check_bga_pointwise_inputs(detail_dw, pw_weight, pw_bias, semantic, detail_down, semantic_down)
    args = (detail_dw, pw_weight, pw_bias, semantic, detail_down, semantic_down)
    backend = backends.resolve("bga_pointwise_aggregate", detail_dw.device, GPU_PREFERENCE)
    if backend == "eager":
        return bga_pointwise_aggregate_reference(*args)
    if backend == "triton":
        if detail_dw.dtype not in TRITON_DTYPES:
            raise TypeError(
                f"bga_pointwise_aggregate: backend 'triton' takes float32, float16 or bfloat16, got {detail_dw.dtype}"
            )
        return torch.ops.bisenet_fast_triton.bga_pointwise_aggregate(*args)
    return torch.ops.bisenet_fast.bga_pointwise_aggregate(*args)
