"""The GE layer's expansion in training (spec §2.2): grouped 3x3 conv -> BatchNorm with this
batch's statistics -> optional ReLU, as one op whose backward recomputes the conv output from
the input instead of keeping it.

    z   = conv2d(x, weight, stride=stride, padding=1, groups=cin)   weight (k*cin, 1, 3, 3)
    out = bn_weight * (z - mean) / sqrt(var + eps) + bn_bias         mean, var over (N, H, W)
    out = relu(out) if relu

Returns (out, mean, var): var is the biased batch variance (the one that normalises); the
caller updates the running statistics from them (nn.BatchNorm2d's update uses the unbiased
variance, var * count / (count - 1)). mean and var are float32 (float64 for float64 x) and not
differentiable. Autograd saves only x, the weights and the two per-channel statistics; eager
Conv2d + BatchNorm2d + ReLU keeps the conv output as well (one expanded-size tensor per call).

bn_weight/bn_bias may be float32 while x is float16/bfloat16 (mixed precision, as BatchNorm2d
allows); their gradients come back in their dtype.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from bisenet_fast import backends
from bisenet_fast.ops._autograd import refuse_double_backward
from bisenet_fast.ops._checks import FLOAT_DTYPES, check_shape, check_tensor, fake_on_one_device
from bisenet_fast.ops._triton_device import on_tensors_device

GPU_PREFERENCE = ("triton",)  # no CUDA C++ kernel for this op yet


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ge_expand_train_reference(x, weight, bn_weight, bn_bias, stride, relu, eps=1e-5):
    """Eager oracle: Conv2d -> BatchNorm2d (training) -> ReLU in plain PyTorch."""
    z = F.conv2d(x, weight, None, stride=stride, padding=1, groups=x.shape[1])
    var, mean = torch.var_mean(z.to(_stats_dtype(x)), dim=(0, 2, 3), correction=0)
    out = F.batch_norm(z, None, None, bn_weight, bn_bias, training=True, eps=eps)
    if relu:
        out = F.relu(out)
    return out, mean.detach(), var.detach()


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def check_inputs(x, weight, bn_weight, bn_bias, stride, relu, eps):
    check_tensor("x", x, dim=4, dtypes=FLOAT_DTYPES)
    cin = x.shape[1]
    check_tensor("weight", weight, dim=4, dtypes=(x.dtype,), device=x.device)
    mid = weight.shape[0]
    if cin == 0 or tuple(weight.shape[1:]) != (1, 3, 3) or mid == 0 or mid % cin != 0:
        raise ValueError(
            f"weight must have shape (k * {cin}, 1, 3, 3) for a 3x3 grouped conv with groups={cin}, "
            f"got {tuple(weight.shape)}"
        )
    # float32 BN parameters beside float16/bfloat16 activations, as BatchNorm2d under autocast
    # takes them; float64 activations take float64 parameters only (as BatchNorm2d).
    bn_dtypes = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    for name, value in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        check_tensor(name, value, dim=1, dtypes=bn_dtypes, device=x.device)
        if value.shape[0] != mid:
            raise ValueError(f"{name} must have shape ({mid},), got {tuple(value.shape)}")
    if bn_bias.dtype != bn_weight.dtype:
        raise TypeError(f"bn_bias must have bn_weight's dtype {bn_weight.dtype}, got {bn_bias.dtype}")
    if stride not in (1, 2) or isinstance(stride, bool):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    count = x.shape[0] * _out_size(x.shape[2], stride) * _out_size(x.shape[3], stride)
    if count < 2:
        raise ValueError(
            f"BatchNorm statistics need more than one value per channel; x of shape {tuple(x.shape)} "
            f"with stride {stride} gives {count}"
        )


@torch.library.register_fake("bisenet_fast::ge_expand_train")
@fake_on_one_device("ge_expand_train")
def _ge_expand_train_fake(x, weight, bn_weight, bn_bias, stride, relu, eps):
    n, _, h, w = x.shape
    mid = weight.shape[0]
    out = x.new_empty((n, mid, _out_size(h, stride), _out_size(w, stride)))
    stats = x.new_empty((mid,), dtype=_stats_dtype(x))
    return out, stats, torch.empty_like(stats)


@torch.library.register_fake("bisenet_fast::ge_expand_train_backward")
@fake_on_one_device("ge_expand_train_backward")
def _ge_expand_train_backward_fake(grad_out, x, weight, bn_weight, bn_bias, mean, var, stride, relu, eps):
    return (
        x.new_empty(x.shape),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(bn_weight),
        torch.empty_like(bn_bias),
    )


@torch.library.custom_op("bisenet_fast_triton::ge_expand_train", mutates_args=())
@on_tensors_device
def _ge_expand_train_triton(
    x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor, stride: int, relu: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from bisenet_fast.triton_kernels.ge_expand_train import ge_expand_train_triton

    check_inputs(x, weight, bn_weight, bn_bias, stride, relu, eps)  # also when called as torch.ops directly
    return ge_expand_train_triton(x, weight, bn_weight, bn_bias, stride, relu, eps)


@_ge_expand_train_triton.register_fake
def _(x, weight, bn_weight, bn_bias, stride, relu, eps):
    return _ge_expand_train_fake(x, weight, bn_weight, bn_bias, stride, relu, eps)


@torch.library.custom_op("bisenet_fast_triton::ge_expand_train_backward", mutates_args=())
@on_tensors_device
def _ge_expand_train_backward_triton(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
    mean: torch.Tensor, var: torch.Tensor, stride: int, relu: bool, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from bisenet_fast.triton_kernels.ge_expand_train import ge_expand_train_backward_triton

    check_inputs(x, weight, bn_weight, bn_bias, stride, relu, eps)
    out_shape = (x.shape[0], weight.shape[0], _out_size(x.shape[2], stride), _out_size(x.shape[3], stride))
    check_shape("grad_out", grad_out, out_shape, dtype=x.dtype, device=x.device, what="the output")
    for name, stat in (("mean", mean), ("var", var)):
        check_shape(name, stat, (weight.shape[0],), dtype=_stats_dtype(x), device=x.device, what="the batch statistics")
    return ge_expand_train_backward_triton(grad_out, x, weight, bn_weight, bn_bias, mean, var, stride, relu, eps)


@_ge_expand_train_backward_triton.register_fake
def _(*args):
    return _ge_expand_train_backward_fake(*args)


def _setup_context(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, stride, relu, eps = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, var)
    ctx.stride, ctx.relu, ctx.eps = stride, relu, eps


def _make_backward(backward_op):
    def backward(ctx, grad_out, grad_mean, grad_var):
        x, weight, bn_weight, bn_bias, mean, var = ctx.saved_tensors
        grads = backward_op(grad_out, x, weight, bn_weight, bn_bias, mean, var, ctx.stride, ctx.relu, ctx.eps)
        return (*grads, None, None, None)

    return backward


torch.library.register_autograd(
    "bisenet_fast::ge_expand_train",
    _make_backward(torch.ops.bisenet_fast.ge_expand_train_backward),
    setup_context=_setup_context,
)
torch.library.register_autograd(
    "bisenet_fast_triton::ge_expand_train",
    _make_backward(torch.ops.bisenet_fast_triton.ge_expand_train_backward),
    setup_context=_setup_context,
)
refuse_double_backward("bisenet_fast::ge_expand_train_backward", "ge_expand_train")
refuse_double_backward("bisenet_fast_triton::ge_expand_train_backward", "ge_expand_train")


def ge_expand_train(x, weight, bn_weight, bn_bias, stride, relu, eps=1e-5):
    """(out, mean, var) of grouped 3x3 conv -> BatchNorm (batch statistics) -> ReLU if relu;
    see the module docstring."""
    check_inputs(x, weight, bn_weight, bn_bias, stride, relu, eps)
    args = (x, weight, bn_weight, bn_bias, int(stride), relu, float(eps))
    backend = backends.resolve("ge_expand_train", x.device, GPU_PREFERENCE)
    if backend == "eager":
        return ge_expand_train_reference(*args)
    if backend == "triton":
        return torch.ops.bisenet_fast_triton.ge_expand_train(*args)
    return torch.ops.bisenet_fast.ge_expand_train(*args)
