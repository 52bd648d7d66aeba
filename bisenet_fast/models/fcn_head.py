"""mmseg's FCNHead as BiSeNetV2's configs build it (spec §3), with its names.

Registration order follows mmseg (conv_seg and dropout in BaseDecodeHead, then convs), so
the state_dict order is mmseg's. mmseg trains the heads with SyncBN; here they are plain
BatchNorm2d (same state_dict), converted to SyncBatchNorm by the trainer under DDP.
Two defaults differ from mmseg's FCNHead: concat_input False (mmseg: True; BiSeNetV2's
configs set False, and True is not supported here) and in_index 0 (mmseg: -1); every
BiSeNetV2 head passes both.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from bisenet_fast.models.conv_module import ConvModule


class FCNHead(nn.Module):
    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int = 19,
        in_index: int = 0,
        num_convs: int = 2,
        kernel_size: int = 3,
        dropout_ratio: float = 0.1,
        concat_input: bool = False,
    ):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1 for BiSeNetV2's heads, got {num_convs}")
        if concat_input:
            raise ValueError("concat_input=True (conv_cat) is not used by BiSeNetV2 and not supported")
        self.in_index = in_index
        self.num_classes = num_classes
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        convs = [ConvModule(in_channels, channels, kernel_size)]
        convs += [ConvModule(channels, channels, kernel_size) for _ in range(num_convs - 1)]
        self.convs = nn.Sequential(*convs)
        self.init_weights()

    def init_weights(self):
        """ConvModule init (Kaiming normal fan_out relu, BN 1/0); conv_seg ~ N(0, 0.01), for every
        head as spec §2.5 states. (mmseg's own run differs for the auxiliary heads: they sit in a
        plain nn.ModuleList, which mmcv's init_weights does not descend into, so their conv_seg
        keep PyTorch's default init. Only a from-scratch run's starting point differs.)"""
        for m in self.convs.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = self.convs(inputs[self.in_index])
        if self.dropout is not None:
            x = self.dropout(x)
        return self.conv_seg(x)
