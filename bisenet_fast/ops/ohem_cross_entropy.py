"""OHEM top-k cross-entropy on head-resolution logits (spec §6, mmseg 0.28+ semantics)."""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from bisenet_fast import _C  # noqa: F401  (defines the torch.ops.bisenet_fast schemas registered below)
from bisenet_fast import backends
from bisenet_fast.ops._autograd import refuse_double_backward
from bisenet_fast.ops._checks import FLOAT_DTYPES, check_tensor, fake_on_one_device
from bisenet_fast.ops._triton_device import on_tensors_device

TARGET_DTYPES = (torch.uint8, torch.int32, torch.int64)
# The kernels' float32 exp flushes probabilities below ~1.6e-38 (e^-87) to 0, so a smaller
# thresh would keep other pixels than the reference (csrc/common/ohem_checks.h, kMinOhemThresh).
MIN_OHEM_THRESH = 1e-30


def ohem_cross_entropy_reference(logits, target, *, thresh=0.7, min_kept=10000, ignore_index=255):
    """Eager oracle: what mmseg's decode head does for one head's loss.

    Upsample the logits to the label size, OHEMPixelSampler (threshold = max(thresh,
    budget-th smallest ground-truth probability among valid pixels), keep p < threshold),
    cross-entropy summed over kept pixels and divided by all N*H*W pixels.
    """
    n = logits.shape[0]
    height, width = target.shape[-2:]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # mmseg computes losses in fp32 (force_fp32)
    up = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    target = target.long()
    valid = target != ignore_index
    ce = F.cross_entropy(up, target, reduction="none", ignore_index=ignore_index)
    if thresh is None:
        weight = valid
    else:
        with torch.no_grad():
            prob = up.softmax(dim=1).gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
            valid_prob = prob[valid]
            threshold = torch.tensor(thresh, dtype=prob.dtype, device=prob.device)
            if valid_prob.numel() > 0:
                kth = valid_prob.sort().values[min(min_kept * n, valid_prob.numel() - 1)]
                threshold = torch.maximum(kth, threshold)
            weight = valid & (prob < threshold)
    return (ce * weight).sum() / (n * height * width)


def check_ohem_inputs(logits, target, thresh, min_kept, ignore_index) -> None:
    check_tensor("logits", logits, dim=4, dtypes=FLOAT_DTYPES)
    check_tensor("target", target, dim=3, dtypes=TARGET_DTYPES, device=logits.device)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target must have the batch size of logits ({logits.shape[0]}), got shape {tuple(target.shape)}"
        )
    if logits.shape[0] < 1 or logits.shape[1] < 1 or min(logits.shape[-2:]) < 1 or min(target.shape[-2:]) < 1:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have non-empty batch, class and "
            "spatial dims"
        )
    if thresh is not None and (isinstance(thresh, bool) or not isinstance(thresh, numbers.Real)):
        raise TypeError(f"thresh must be None or a float, got {type(thresh).__name__}")
    if thresh is not None and not MIN_OHEM_THRESH <= float(thresh) <= 1.0:
        raise ValueError(f"thresh must be None or a probability in [1e-30, 1], got {thresh}")
    if isinstance(min_kept, bool) or not isinstance(min_kept, int) or not 0 <= min_kept < 2**63:
        raise ValueError(f"min_kept must be a non-negative int below 2**63, got {min_kept!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")


def check_target_labels(num_classes, target, ignore_index) -> None:
    """Labels other than ignore_index must be class ids in [0, num_classes). Compared as int64:
    a uint8 target compared with an int outside [0, 255] (ignore_index=-1, 300 classes) would
    compare with the int wrapped to uint8."""
    labels = target.long()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"ohem_cross_entropy: target holds label {value}, which is neither a class id in [0, {num_classes}) "
            f"nor ignore_index ({ignore_index})"
        )


# ---- C++/CUDA kernels: fake kernels (torch.compile) and autograd through the fused backward.


@torch.library.register_fake("bisenet_fast::ohem_cross_entropy_forward")
@fake_on_one_device("ohem_cross_entropy_forward")
def _forward_fake(logits, target, thresh, min_kept, ignore_index, check_labels=True):
    acc = _acc_dtype(logits.dtype)
    return logits.new_empty((), dtype=acc), logits.new_empty((), dtype=acc)


@torch.library.register_fake("bisenet_fast::ohem_cross_entropy_backward")
@fake_on_one_device("ohem_cross_entropy_backward")
def _backward_fake(grad_loss, logits, target, threshold, ignore_index):
    return logits.new_empty(logits.shape)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss and threshold dtype: float64 for float64 logits (the reference compares float64
    probabilities with a float64 threshold there), float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _setup_context(ctx, inputs, output):
    logits, target, _thresh, _min_kept, ignore_index = inputs[:5]  # the C++ op also takes check_labels
    _loss, threshold = output
    ctx.save_for_backward(logits, target, threshold)
    ctx.ignore_index = ignore_index
    ctx.input_count = len(inputs)  # backward returns None for each input after logits
    ctx.mark_non_differentiable(threshold)


def _make_backward(backward_op):
    def backward(ctx, grad_loss, _grad_threshold):
        logits, target, threshold = ctx.saved_tensors
        grad_logits = backward_op(grad_loss, logits, target, threshold, ctx.ignore_index)
        return grad_logits, *([None] * (ctx.input_count - 1))

    return backward


torch.library.register_autograd(
    "bisenet_fast::ohem_cross_entropy_forward",
    _make_backward(torch.ops.bisenet_fast.ohem_cross_entropy_backward),
    setup_context=_setup_context,
)
refuse_double_backward("bisenet_fast::ohem_cross_entropy_backward", "ohem_cross_entropy")


# ---- Triton kernels as Python custom ops (namespace bisenet_fast_triton), so torch.compile
# sees them as opaque ops with fake kernels, like the C++ ones.


def _check_triton_dtype(logits: torch.Tensor) -> None:
    """The Triton kernels compute in float32: float64 logits would come back as float32
    results where the fake kernel (shared with the C++ op) promises float64."""
    check_tensor("logits", logits, dtypes=(torch.float32, torch.float16, torch.bfloat16))


@torch.library.custom_op("bisenet_fast_triton::ohem_cross_entropy_forward", mutates_args=())
@on_tensors_device
def _triton_forward(
    logits: torch.Tensor, target: torch.Tensor, thresh: float | None, min_kept: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    from bisenet_fast.triton_kernels import ohem_cross_entropy as kernels

    check_ohem_inputs(logits, target, thresh, min_kept, ignore_index)  # also when called as torch.ops directly
    _check_triton_dtype(logits)
    return kernels.forward(logits, target, thresh, min_kept, ignore_index)


@torch.library.custom_op("bisenet_fast_triton::ohem_cross_entropy_backward", mutates_args=())
@on_tensors_device
def _triton_backward(
    grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, threshold: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    from bisenet_fast.triton_kernels import ohem_cross_entropy as kernels

    check_ohem_inputs(logits, target, None, 0, ignore_index)
    _check_triton_dtype(logits)
    for name, scalar in (("grad_loss", grad_loss), ("threshold", threshold)):
        check_tensor(name, scalar, dim=0, device=logits.device)
    return kernels.backward(grad_loss, logits, target, threshold, ignore_index)


_triton_forward.register_fake(_forward_fake)
_triton_backward.register_fake(_backward_fake)
_triton_forward.register_autograd(
    _make_backward(torch.ops.bisenet_fast_triton.ohem_cross_entropy_backward), setup_context=_setup_context
)
refuse_double_backward("bisenet_fast_triton::ohem_cross_entropy_backward", "ohem_cross_entropy")

# Preferred GPU kernel when both exist (both select the k-th probability with an exact radix
# select on the device and synchronise once, for the label check): the CUDA kernel, whose
# forward and backward ran faster on the one GPU measured so far (H200, benchmarks/results/).
GPU_PREFERENCE = ("cuda", "triton")


def ohem_cross_entropy(logits, target, *, thresh=0.7, min_kept=10000, ignore_index=255, check_labels=True):
    """Loss of one head (0-dim float32; float64 for float64 logits).

    logits (N, C, h, w) at head resolution (float32/float16/bfloat16; float64 on CPU);
    target (N, H, W) integer labels (uint8/int32/int64). thresh: a probability in
    [MIN_OHEM_THRESH, 1] (1e-30: the kernels' float32 exp flushes probabilities below ~1e-38),
    or None: plain cross-entropy averaged over N*H*W. Labels other than ignore_index must lie
    in [0, C): a ValueError names the first one that does not.

    check_labels=False: the caller has checked the labels (e.g. once for all five heads, as
    BiSeNetV2Segmentor.loss does), so on a GPU the CUDA kernel and the eager path skip the
    label check, a host synchronisation. A label outside [0, C) then makes the CUDA kernel's
    loss NaN, and trips PyTorch's device-side assert in the eager path, instead of raising.
    On the CPU, and in the Triton kernel (which synchronises anyway, to choose its selection
    on the host), the labels are checked either way.

    A NaN or infinite logit read by a valid pixel makes the loss NaN or inf and the gradient
    non-finite, as in the reference (whose CE * weight is NaN even at weight 0), so that the
    training loop's check sees it; logits read only by ignored pixels never matter.

    Kept or not is a comparison of a rounded probability with the threshold: a pixel within
    rounding of it (e.g. tied with the budget-th probability) may be kept by one backend and
    not another, changing the loss by that pixel's cross-entropy / (N*H*W). float64 logits
    (the cpp backend) are upsampled with float64 tap weights, as ATen's CPU upsample does, so
    float64 results agree with the reference to float64 precision.
    """
    check_ohem_inputs(logits, target, thresh, min_kept, ignore_index)
    backend = backends.resolve("ohem_cross_entropy", logits.device, GPU_PREFERENCE)
    thresh = None if thresh is None else float(thresh)
    if not isinstance(check_labels, bool):
        raise TypeError(f"check_labels must be a bool, got {check_labels!r}")
    if backend == "eager":
        if check_labels or not logits.is_cuda:
            check_target_labels(logits.shape[1], target, ignore_index)
        return ohem_cross_entropy_reference(
            logits, target, thresh=thresh, min_kept=min_kept, ignore_index=ignore_index
        )
    if logits.dtype == torch.float64 and backend != "cpp":
        raise TypeError(
            f"ohem_cross_entropy: float64 logits are supported by the 'eager' and 'cpp' backends only, "
            f"not {backend!r}; use float32, float16 or bfloat16"
        )
    if backend == "triton":
        return torch.ops.bisenet_fast_triton.ohem_cross_entropy_forward(logits, target, thresh, min_kept, ignore_index)[0]
    return torch.ops.bisenet_fast.ohem_cross_entropy_forward(
        logits, target, thresh, min_kept, ignore_index, check_labels
    )[0]
