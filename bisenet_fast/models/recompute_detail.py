"""The training form of the detail branch that keeps half its activations: a chain of
ConvModules (conv -> BatchNorm with batch statistics -> ReLU) whose backward recomputes
each ReLU output instead of keeping it.

    use_recomputing_detail_branch(model)   # in place; returns model

Eager autograd keeps two full-size tensors per ConvModule: the conv output (BatchNorm's
input) and the ReLU output (the ReLU's result and the next conv's input). The chain keeps
only the conv outputs and each BatchNorm's batch mean and inverse std; backward rebuilds a
ReLU output as relu(z * alpha + beta) with alpha = invstd * weight, beta = bias - mean *
alpha (one elementwise pass; ATen's CPU BatchNorm computes its output in this form, so on
the CPU the rebuilt values equal the forward's in NCHW) where the ReLU's mask and the next
conv's weight gradient need it. The detail branch's eight ConvModules hold 44 % of the
fused training step's saved activations (the first two at 1/2 resolution); the chain
removes 768 MB of them at 4x3x1024x1024 float32 (the branch's output is still kept by the
layers that read it). The convolutions are not recomputed.

The replacement owns the original stages under the same names (state_dict keys, checkpoints
and optimizer parameter identities unchanged). Running statistics and num_batches_tracked
are updated as nn.BatchNorm2d updates them. Outside training with grad enabled, or when any
of the chain's BatchNorms is in eval mode (frozen statistics), the stages run as they are.
Under autocast the convs take the autocast dtype for input and weight, and BatchNorm and
ReLU run in it, as they do eagerly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from bisenet_fast.models.bisenetv2 import DetailBranch
from bisenet_fast.models.conv_module import ConvModule

PARAMS_PER_LAYER = 3  # conv.weight, bn.weight, bn.bias
SAVED_PER_LAYER = 3  # the conv output, BatchNorm's batch mean and inverse std


def _check_chain_layer(module: nn.Module) -> None:
    if not isinstance(module, ConvModule):
        raise ValueError(f"recomputing conv chain: expected ConvModules, got {type(module).__name__}")
    conv, bn = module.conv, module.bn
    if type(bn) is not nn.BatchNorm2d or not (bn.affine and bn.track_running_stats):
        raise ValueError(
            "recomputing conv chain: every ConvModule needs an affine nn.BatchNorm2d tracking running "
            f"statistics (SyncBatchNorm is not supported), got {bn}"
        )
    if module.activate is None or conv.bias is not None or conv.padding_mode != "zeros":
        raise ValueError(f"recomputing conv chain: expected conv (no bias, zero padding) -> BN -> ReLU, got {module}")


def _running_stats_factor(bn: nn.BatchNorm2d) -> float:
    """nn.BatchNorm2d's running-statistics step: counts the batch, returns the update factor."""
    bn.num_batches_tracked.add_(1)
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


def _relu_of_bn(z, mean, invstd, weight, bias):
    """relu(BatchNorm(z)) from the forward's batch statistics, in z's dtype."""
    alpha = invstd * weight
    beta = bias - mean * alpha
    shape = (1, -1, 1, 1)
    return torch.addcmul(beta.view(shape), z, alpha.view(shape)).to(z.dtype).relu_()


class _ConvBNReLUChain(torch.autograd.Function):
    """y = chain of relu(bn(conv(.))) over `layers`; saves the conv outputs only."""

    @staticmethod
    def forward(ctx, x, layers, compute_dtype, *params):
        saved = []
        y = x
        with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit below
            for k, layer in enumerate(layers):
                conv_w, bn_w, bn_b = params[PARAMS_PER_LAYER * k : PARAMS_PER_LAYER * (k + 1)]
                conv, bn = layer.conv, layer.bn
                z = F.conv2d(y.to(compute_dtype), conv_w.to(compute_dtype), None, conv.stride, conv.padding,
                             conv.dilation, conv.groups)
                if z.numel() <= z.size(1):
                    raise ValueError(f"Expected more than 1 value per channel when training, got input size {z.shape}")
                factor = _running_stats_factor(bn)
                y, mean, invstd = torch.native_batch_norm(z, bn_w, bn_b, bn.running_mean, bn.running_var, True,
                                                          factor, bn.eps)
                # Not in place: torch 2.11's torch.compile routes the gradient of an output that
                # forward mutated in place to the wrong slot, and every gradient comes out zero
                # (pytorch/pytorch#180642; seen here with torch 2.11.0, the lent GPUs' torch).
                y = y.relu()
                saved += [z, mean, invstd]
        ctx.layers = layers
        ctx.compute_dtype = compute_dtype
        ctx.save_for_backward(x, *params, *saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        layers, compute_dtype = ctx.layers, ctx.compute_dtype
        x, *rest = ctx.saved_tensors
        n_params = PARAMS_PER_LAYER * len(layers)
        params, saved = rest[:n_params], rest[n_params:]
        needs = ctx.needs_input_grad[3:]
        grads = [None] * n_params

        def layer_output(k):
            z, mean, invstd = saved[SAVED_PER_LAYER * k : SAVED_PER_LAYER * (k + 1)]
            return _relu_of_bn(z, mean, invstd, params[PARAMS_PER_LAYER * k + 1], params[PARAMS_PER_LAYER * k + 2])

        grad = grad_y
        y = layer_output(len(layers) - 1)
        for k in reversed(range(len(layers))):
            conv, bn = layers[k].conv, layers[k].bn
            conv_w, bn_w, _ = params[PARAMS_PER_LAYER * k : PARAMS_PER_LAYER * (k + 1)]
            z, mean, invstd = saved[SAVED_PER_LAYER * k : SAVED_PER_LAYER * (k + 1)]
            grad = torch.ops.aten.threshold_backward(grad.to(y.dtype), y, 0)  # ReLU's backward
            grad_z, grad_bn_w, grad_bn_b = torch.ops.aten.native_batch_norm_backward(
                grad, z, bn_w, None, None, mean, invstd, True, bn.eps,
                [True, needs[PARAMS_PER_LAYER * k + 1], needs[PARAMS_PER_LAYER * k + 2]],
            )
            y = layer_output(k - 1) if k > 0 else x.to(compute_dtype)
            need_input = k > 0 or ctx.needs_input_grad[0]
            grad, grad_conv_w, _ = torch.ops.aten.convolution_backward(
                grad_z, y, conv_w.to(compute_dtype), None, conv.stride, conv.padding, conv.dilation, False, [0, 0],
                conv.groups, [need_input, needs[PARAMS_PER_LAYER * k], False],
            )
            if grad_conv_w is not None:
                grad_conv_w = grad_conv_w.to(conv_w.dtype)
            grads[PARAMS_PER_LAYER * k : PARAMS_PER_LAYER * (k + 1)] = [grad_conv_w, grad_bn_w, grad_bn_b]
        grad_x = grad.to(x.dtype) if ctx.needs_input_grad[0] else None
        return (grad_x, None, None, *grads)


def conv_bn_relu_chain(x: torch.Tensor, layers: tuple[ConvModule, ...]) -> torch.Tensor:
    """Run `layers` (each conv -> BatchNorm in training -> ReLU) keeping only the conv outputs."""
    for layer in layers:
        _check_chain_layer(layer)
    device_type = x.device.type
    compute_dtype = x.dtype
    if torch.is_autocast_enabled(device_type) and x.dtype != torch.float64:
        compute_dtype = torch.get_autocast_dtype(device_type)
    params = [p for layer in layers for p in (layer.conv.weight, layer.bn.weight, layer.bn.bias)]
    return _ConvBNReLUChain.apply(x, tuple(layers), compute_dtype, *params)


class RecomputingDetailBranch(nn.Module):
    """DetailBranch whose training forward is one recomputing conv chain."""

    def __init__(self, branch: DetailBranch):
        super().__init__()
        self.detail_branch = branch.detail_branch
        for layer in self._layers():
            _check_chain_layer(layer)

    def _layers(self) -> tuple[ConvModule, ...]:
        return tuple(layer for stage in self.detail_branch for layer in stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self._layers()
        if self.training and torch.is_grad_enabled() and all(layer.bn.training for layer in layers):
            return conv_bn_relu_chain(x, layers)
        for stage in self.detail_branch:
            x = stage(x)
        return x


def use_recomputing_detail_branch(model: nn.Module) -> nn.Module:
    """Swap every DetailBranch in `model` for a RecomputingDetailBranch, in place."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, DetailBranch)
    ]
    for parent, name, child in targets:
        setattr(parent, name, RecomputingDetailBranch(child))
    return model
