"""The training form of the GE layers' expansion convs: each `dwconv` ConvModule (3x3 grouped
conv -> BatchNorm -> optional ReLU) of every GELayer becomes one bisenet_fast.ops.ge_expand_train
call, whose backward recomputes the conv output instead of keeping it (one expanded-size
activation less per conv; stride-2 layers have two such convs).

    use_fused_ge_training(model)   # in place; returns model

The replacement owns the original `conv` and `bn` modules under the same names, so
state_dict keys, checkpoints and optimizer parameter identities are unchanged. In eval mode
it runs the original conv and bn (running statistics), exactly as before. In training mode it
updates bn's running statistics and num_batches_tracked as nn.BatchNorm2d does (unbiased
variance, momentum, or a cumulative average when momentum is None). Under autocast it casts x
and the conv weight to the autocast dtype, as autocast does for nn.Conv2d; BN's parameters
stay float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bisenet_fast import ops
from bisenet_fast.models.bisenetv2 import GELayer
from bisenet_fast.models.conv_module import ConvModule


def _check_fusable(module: ConvModule) -> None:
    conv, bn = module.conv, module.bn
    if bn is None or not isinstance(bn, nn.BatchNorm2d):
        raise ValueError("fused GE training: the ConvModule must have a BatchNorm2d")
    if not (bn.affine and bn.track_running_stats):
        raise ValueError("fused GE training: the BatchNorm2d must be affine and track running statistics")
    if (
        conv.kernel_size != (3, 3)
        or conv.padding != (1, 1)
        or conv.dilation != (1, 1)
        or conv.stride not in ((1, 1), (2, 2))
        or conv.groups != conv.in_channels
        or conv.bias is not None
        or conv.padding_mode != "zeros"
    ):
        raise ValueError(f"fused GE training: expected a 3x3 grouped (groups=in_channels) conv without bias, got {conv}")


class FusedExpandConvModule(nn.Module):
    """ConvModule(3x3, groups=cin) -> BN -> [ReLU] as one fused op in training."""

    def __init__(self, module: ConvModule):
        super().__init__()
        _check_fusable(module)
        self.conv = module.conv
        self.bn = module.bn
        self.relu = module.activate is not None
        self.stride = module.conv.stride[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if not bn.training:
            out = bn(self.conv(x))
            return F.relu(out, inplace=True) if self.relu else out
        weight = self.conv.weight
        if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:  # autocast leaves float64 alone
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        out, mean, var = ops.ge_expand_train(x, weight, bn.weight, bn.bias, self.stride, self.relu, bn.eps)
        self._update_running_stats(mean, var, out.numel() // out.shape[1])
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        bn = self.bn
        bn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        unbiased = var * (count / (count - 1))
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def use_fused_ge_training(model: nn.Module) -> nn.Module:
    """Swap every GELayer's dwconv ConvModules for FusedExpandConvModule, in place."""
    for layer in model.modules():
        if isinstance(layer, GELayer):
            for i, module in enumerate(layer.dwconv):
                if isinstance(module, ConvModule):
                    layer.dwconv[i] = FusedExpandConvModule(module)
    return model
