"""Bilateral Guided Aggregation (spec §2.3):
    detail * sigmoid(up(semantic)) + up(detail_down * sigmoid(semantic_down))
with up = bilinear resize (align_corners=False) to detail's spatial size."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bisenet_fast import backends
from bisenet_fast.ops._checks import FLOAT_DTYPES, check_tensor


def bga_aggregate_reference(detail, semantic, detail_down, semantic_down):
    """Eager oracle, in the order mmseg's BGALayer computes it."""
    size = detail.shape[-2:]
    fuse1 = detail * torch.sigmoid(F.interpolate(semantic, size=size, mode="bilinear", align_corners=False))
    fuse2 = F.interpolate(detail_down * torch.sigmoid(semantic_down), size=size, mode="bilinear", align_corners=False)
    return fuse1 + fuse2


def check_bga_inputs(detail, semantic, detail_down, semantic_down) -> None:
    check_tensor("detail", detail, dim=4, dtypes=FLOAT_DTYPES)
    n, c = detail.shape[:2]
    low = None
    for name, t in (("semantic", semantic), ("detail_down", detail_down), ("semantic_down", semantic_down)):
        check_tensor(name, t, dim=4, dtypes=(detail.dtype,), device=detail.device)
        if t.shape[:2] != (n, c):
            raise ValueError(f"{name} must have batch and channels ({n}, {c}) like detail, got {tuple(t.shape)}")
        if low is None:
            low = t.shape[-2:]
        elif t.shape[-2:] != low:
            raise ValueError(f"{name} must have spatial size {tuple(low)} like semantic, got {tuple(t.shape[-2:])}")
    if min(detail.shape[-2:]) == 0 or min(low) == 0:
        raise ValueError("bga_aggregate: spatial sizes must be non-empty")


def bga_aggregate(detail, semantic, detail_down, semantic_down):
    check_bga_inputs(detail, semantic, detail_down, semantic_down)
    backend = backends.resolve("bga_aggregate", detail.device)
    if backend == "eager":
        return bga_aggregate_reference(detail, semantic, detail_down, semantic_down)
    raise NotImplementedError(f"bga_aggregate: backend {backend!r} is not implemented yet")
