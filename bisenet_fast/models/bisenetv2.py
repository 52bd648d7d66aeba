"""The BiSeNetV2 backbone exactly as mmsegmentation builds it (spec §2), with its names.

The backbone's own norm/act settings are never passed on in mmseg: every block uses plain
BatchNorm2d and ReLU, which is what is built here.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from bisenet_fast import ops
from bisenet_fast.models.conv_module import ConvModule, DepthwiseSeparableConvModule


class DetailBranch(nn.Module):
    def __init__(self, detail_channels=(64, 64, 128), in_channels=3):
        super().__init__()
        stages = []
        for i, channels in enumerate(detail_channels):
            if i == 0:
                stages.append(
                    nn.Sequential(ConvModule(in_channels, channels, 3, 2), ConvModule(channels, channels, 3, 1))
                )
            else:
                stages.append(
                    nn.Sequential(
                        ConvModule(detail_channels[i - 1], channels, 3, 2),
                        ConvModule(channels, channels, 3, 1),
                        ConvModule(channels, channels, 3, 1),
                    )
                )
        self.detail_branch = nn.ModuleList(stages)

    def forward(self, x):
        for stage in self.detail_branch:
            x = stage(x)
        return x


class StemBlock(nn.Module):
    def __init__(self, in_channels=3, out_channels=16):
        super().__init__()
        self.conv_first = ConvModule(in_channels, out_channels, 3, 2)
        self.convs = nn.Sequential(
            ConvModule(out_channels, out_channels // 2, 1, 1, padding=0),
            ConvModule(out_channels // 2, out_channels, 3, 2),
        )
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=False)
        self.fuse_last = ConvModule(out_channels * 2, out_channels, 3, 1)

    def forward(self, x):
        x = self.conv_first(x)
        return self.fuse_last(torch.cat([self.convs(x), self.pool(x)], dim=1))


class GELayer(nn.Module):
    """Gather-and-Expansion layer (spec §2.2); registration order as mmseg's."""

    def __init__(self, in_channels, out_channels, exp_ratio=6, stride=1):
        super().__init__()
        mid_channels = in_channels * exp_ratio
        self.stride = stride
        self.conv1 = ConvModule(in_channels, in_channels, 3, 1)
        if stride == 1:
            self.dwconv = nn.Sequential(ConvModule(in_channels, mid_channels, 3, 1, groups=in_channels))
            self.shortcut = None
        else:
            self.dwconv = nn.Sequential(
                ConvModule(in_channels, mid_channels, 3, stride, groups=in_channels, act=False),
                ConvModule(mid_channels, mid_channels, 3, 1, groups=mid_channels),
            )
            self.shortcut = nn.Sequential(
                DepthwiseSeparableConvModule(in_channels, out_channels, 3, stride, dw_act=False, pw_act=False)
            )
        self.conv2 = nn.Sequential(ConvModule(mid_channels, out_channels, 1, 1, padding=0, act=False))
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.conv2(self.dwconv(self.conv1(x)))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.act(y + identity)


class CEBlock(nn.Module):
    def __init__(self, in_channels=128, out_channels=128):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.BatchNorm2d(in_channels))
        self.conv_gap = ConvModule(in_channels, out_channels, 1, 1, padding=0)
        self.conv_last = ConvModule(out_channels, out_channels, 3, 1)

    def forward(self, x):
        return self.conv_last(x + self.conv_gap(self.gap(x)))


class SemanticBranch(nn.Module):
    def __init__(self, semantic_channels=(16, 32, 64, 128), in_channels=3, exp_ratio=6):
        super().__init__()
        self.stage1 = StemBlock(in_channels, semantic_channels[0])
        for i in range(1, len(semantic_channels)):
            cin, cout = semantic_channels[i - 1], semantic_channels[i]
            layers = [GELayer(cin, cout, exp_ratio, 2), GELayer(cout, cout, exp_ratio, 1)]
            if i == len(semantic_channels) - 1:
                layers += [GELayer(cout, cout, exp_ratio, 1), GELayer(cout, cout, exp_ratio, 1)]
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers))
        self.stage4_CEBlock = CEBlock(semantic_channels[-1], semantic_channels[-1])
        self.stage_names = [f"stage{i + 1}" for i in range(len(semantic_channels))] + ["stage4_CEBlock"]

    def forward(self, x):
        outs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outs.append(x)
        return outs


class BGALayer(nn.Module):
    """Bilateral Guided Aggregation (spec §2.3); the gating runs as the fused op."""

    def __init__(self, out_channels=128, align_corners=False):
        super().__init__()
        if align_corners:
            raise ValueError("BGALayer: only align_corners=False (mmseg's setting) is supported")
        c = out_channels
        self.detail_dwconv = nn.Sequential(DepthwiseSeparableConvModule(c, c, 3, 1, dw_act=False, pw_norm=False, pw_act=False))
        self.detail_down = nn.Sequential(
            ConvModule(c, c, 3, 2, act=False),
            nn.AvgPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=False),
        )
        self.semantic_conv = nn.Sequential(ConvModule(c, c, 3, 1, act=False))
        self.semantic_dwconv = nn.Sequential(DepthwiseSeparableConvModule(c, c, 3, 1, dw_act=False, pw_norm=False, pw_act=False))
        self.conv = ConvModule(c, c, 3, 1)

    def forward(self, x_d, x_s):
        fused = ops.bga_aggregate(
            self.detail_dwconv(x_d), self.semantic_conv(x_s), self.detail_down(x_d), self.semantic_dwconv(x_s)
        )
        return self.conv(fused)


class BiSeNetV2(nn.Module):
    """Backbone; forward returns (bga, stage1, stage2, stage3, stage4)[i] for i in out_indices."""

    def __init__(
        self,
        in_channels=3,
        detail_channels=(64, 64, 128),
        semantic_channels=(16, 32, 64, 128),
        semantic_expansion_ratio=6,
        bga_channels=128,
        out_indices=(0, 1, 2, 3, 4),
        align_corners=False,
    ):
        super().__init__()
        if not (detail_channels[-1] == semantic_channels[-1] == bga_channels):
            raise ValueError(
                "detail_channels[-1], semantic_channels[-1] and bga_channels must be equal, got "
                f"{detail_channels[-1]}, {semantic_channels[-1]}, {bga_channels}"
            )
        # The BGA layer meets the detail branch, downsampled 4x more, with the last semantic
        # stage: both 1/32 of the input when the semantic branch has one stage more.
        if len(semantic_channels) != len(detail_channels) + 1:
            raise ValueError(
                f"semantic_channels must have one stage more than detail_channels (their outputs meet in the BGA "
                f"layer at one resolution), got {len(semantic_channels)} and {len(detail_channels)} stages"
            )
        if (isinstance(semantic_expansion_ratio, bool) or not isinstance(semantic_expansion_ratio, numbers.Integral)
                or semantic_expansion_ratio < 1):
            raise ValueError(f"semantic_expansion_ratio must be a positive int, got {semantic_expansion_ratio!r}")
        out_indices = tuple(out_indices)
        count = 1 + len(semantic_channels)  # bga, then each semantic stage before the CE block
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and -count <= i < count
                   for i in out_indices):
            raise ValueError(f"out_indices must be indices into the backbone's {count} outputs, got {out_indices}")
        self.out_indices = tuple(int(i) for i in out_indices)
        self.detail = DetailBranch(detail_channels, in_channels)
        self.semantic = SemanticBranch(semantic_channels, in_channels, semantic_expansion_ratio)
        self.bga = BGALayer(bga_channels, align_corners)
        self.init_weights()

    def init_weights(self):
        """mmseg's init without init_cfg: Kaiming normal (fan_out, relu) convs, BN 1/0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x_detail = self.detail(x)
        semantic_outs = self.semantic(x)
        outs = [self.bga(x_detail, semantic_outs[-1])] + semantic_outs[:-1]
        return tuple(outs[i] for i in self.out_indices)

    def fuse(self, dtype: torch.dtype | None = None, autotune: bool = False):
        """The inference form (bisenet_fast/models/fused.py): BN folded, fused GE kernels,
        channels_last, `dtype` float32 (default), float16 or bfloat16. This model is unchanged.
        autotune: each GE layer runs the fastest of its implementations for each input size,
        timed on that size's first call (bisenet_fast/models/autotune.py)."""
        from bisenet_fast.models.fused import FusedBiSeNetV2

        return FusedBiSeNetV2(self, dtype, autotune)


def resize_bilinear(x, size):
    """mmseg's resize for this model: size-based bilinear, align_corners=False."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
