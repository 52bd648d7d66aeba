"""mIoU as mmseg computes it (spec §9): per-class intersection / predicted / label areas
summed over the whole set (ignored pixels masked out), IoU_c = I / (P + L - I), and the
mean over classes with a non-zero union (NaN classes skipped). Not a mean of per-image IoUs."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def area_histograms(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255):
    """(intersection, predicted area, label area), each int64 (num_classes,), for one prediction."""
    if pred.shape != label.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and label {tuple(label.shape)} must have the same shape")
    label = label.long()  # a uint8 label compared with ignore_index=-1 would compare with 255
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep]
    if label.numel() and (int(label.min()) < 0 or int(label.max()) >= num_classes):
        raise ValueError(f"label values must be in [0, {num_classes}) or {ignore_index}")
    hit = pred[pred == label]
    count = lambda t: torch.bincount(t, minlength=num_classes)[:num_classes]  # noqa: E731
    return count(hit), count(pred[(pred >= 0) & (pred < num_classes)]), count(label)


class IoUAccumulator:
    """Sums the three histograms over a dataset; `all_reduce()` sums them over processes."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device="cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.areas = torch.zeros(3, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        inter, area_pred, area_label = area_histograms(pred.to(self.areas.device), label.to(self.areas.device),
                                                       self.num_classes, self.ignore_index)
        self.areas[0] += inter
        self.areas[1] += area_pred
        self.areas[2] += area_label

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.areas, op=dist.ReduceOp.SUM)

    def result(self) -> dict:
        """{'IoU': per-class list (NaN for zero union), 'Acc': per-class recall, 'mIoU', 'mAcc', 'aAcc'} in %."""
        inter, area_pred, area_label = self.areas.double().cpu()
        union = area_pred + area_label - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
        acc = torch.where(area_label > 0, inter / area_label.clamp(min=1), torch.full_like(inter, float("nan")))
        total = float(area_label.sum())
        return {
            "IoU": [100 * v for v in iou.tolist()],
            "Acc": [100 * v for v in acc.tolist()],
            "mIoU": 100 * nanmean(iou.tolist()),
            "mAcc": 100 * nanmean(acc.tolist()),
            "aAcc": 100 * float(inter.sum()) / total if total else float("nan"),
        }


def nanmean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def format_table(result: dict, class_names) -> str:
    """The per-class IoU / Acc table and the summary line, mmseg-style."""
    width = max(len(n) for n in class_names)
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}", "-" * (width + 16)]
    for name, iou, acc in zip(class_names, result["IoU"], result["Acc"]):
        lines.append(f"{name:<{width}}  {iou:6.2f}  {acc:6.2f}")
    lines.append("-" * (width + 16))
    lines.append(f"mIoU {result['mIoU']:.2f}  mAcc {result['mAcc']:.2f}  aAcc {result['aAcc']:.2f}")
    return "\n".join(lines)
