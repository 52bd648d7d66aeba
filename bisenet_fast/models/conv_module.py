"""mmcv's ConvModule and DepthwiseSeparableConvModule, with mmcv's parameter names.

ConvModule = conv -> bn -> activate; the conv has a bias only when there is no norm
(mmcv's bias='auto'); the ReLU is in-place, as mmcv builds it.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

NormLayer = Callable[[int], nn.Module]


class ConvModule(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        norm: bool = True,
        act: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2 if padding is None else padding,
            groups=groups,
            bias=not norm,
        )
        self.bn = norm_layer(out_channels) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


class DepthwiseSeparableConvModule(nn.Module):
    """depthwise_conv (k x k, groups=in) then pointwise_conv (1x1), each a ConvModule."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dw_norm: bool = True,
        dw_act: bool = True,
        pw_norm: bool = True,
        pw_act: bool = True,
    ):
        super().__init__()
        self.depthwise_conv = ConvModule(
            in_channels, in_channels, kernel_size, stride, groups=in_channels, norm=dw_norm, act=dw_act
        )
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1, norm=pw_norm, act=pw_act)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))
