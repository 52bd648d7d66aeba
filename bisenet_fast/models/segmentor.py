"""mmseg's EncoderDecoder for BiSeNetV2: backbone, decode head, four auxiliary heads."""
from __future__ import annotations

import torch
from torch import nn

from bisenet_fast import ops
from bisenet_fast.models.bisenetv2 import BiSeNetV2, resize_bilinear
from bisenet_fast.models.fcn_head import FCNHead
from bisenet_fast.ops._checks import check_tensor

# (in_index, in_channels, channels) of auxiliary_head.0..3 (spec §3); each has 2 convs.
AUX_HEADS = ((1, 16, 16), (2, 32, 64), (3, 64, 256), (4, 128, 1024))


class BiSeNetV2Segmentor(nn.Module):
    """Drop-in for mmseg's BiSeNetV2 EncoderDecoder (state_dict keys identical).

    forward(x) -> logits (N, num_classes, H, W) resized to x's size (mmseg's whole-mode
    inference before softmax). loss(x, target) -> the five per-head losses as mmseg
    computes them; OHEM (mmseg 0.28+ semantics: one sampler per head) when `ohem` is set.
    """

    def __init__(
        self,
        num_classes: int = 19,
        ohem: bool = False,
        ohem_thresh: float = 0.7,
        ohem_min_kept: int = 10000,
        ignore_index: int = 255,
        dropout_ratio: float = 0.1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.ohem = ohem
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = ohem_min_kept
        self.ignore_index = ignore_index
        self.backbone = BiSeNetV2()
        self.decode_head = FCNHead(128, 1024, num_classes, in_index=0, num_convs=1, dropout_ratio=dropout_ratio)
        self.auxiliary_head = nn.ModuleList(
            FCNHead(cin, ch, num_classes, in_index=idx, num_convs=2, dropout_ratio=dropout_ratio)
            for idx, cin, ch in AUX_HEADS
        )

    def encode_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Decode-head logits at 1/8 resolution."""
        return self.decode_head(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_bilinear(self.encode_decode(x), x.shape[-2:])

    def fuse(self, dtype: torch.dtype | None = None, autotune: bool = False):
        """The inference form (bisenet_fast/models/fused.py): BN folded, fused GE kernels,
        channels_last, `dtype` float32 (default), float16 or bfloat16; decode head only.
        This model is unchanged.
        autotune: each GE layer runs the fastest of its implementations for each input size,
        timed on that size's first call (bisenet_fast/models/autotune.py)."""
        from bisenet_fast.models.fused import FusedBiSeNetV2Segmentor

        return FusedBiSeNetV2Segmentor(self, dtype, autotune)

    def head_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head-resolution logits of all five heads, keyed by mmseg's loss prefixes."""
        feats = self.backbone(x)
        logits = {"decode": self.decode_head(feats)}
        for i, head in enumerate(self.auxiliary_head):
            logits[f"aux_{i}"] = head(feats)
        return logits

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'decode.loss_ce', 'aux_0.loss_ce', ..., 'aux_3.loss_ce'}; their sum is mmseg's loss.

        target: (N, H, W) or mmseg's (N, 1, H, W) integer labels at x's (padded) size.
        """
        check_tensor("target", target)  # before the forward, and before reading its shape
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        thresh = self.ohem_thresh if self.ohem else None
        # The five heads read the same labels. On a GPU each label check is a host
        # synchronisation, so the decode head's op checks them and the others skip the check
        # (the CPU kernel checks each label as it reads it, at no cost). The check stays inside
        # the op, where torch.compile keeps the step in one graph.
        return {
            f"{name}.loss_ce": ops.ohem_cross_entropy(
                logits, target, thresh=thresh, min_kept=self.ohem_min_kept, ignore_index=self.ignore_index,
                check_labels=index == 0 or not target.is_cuda,
            )
            for index, (name, logits) in enumerate(self.head_logits(x).items())
        }
