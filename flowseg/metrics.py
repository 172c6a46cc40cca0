"""Benchmark segmentation metrics (docs/method.md, section 6).

One N x N confusion matrix is accumulated over the whole split (ignore label excluded), then
IoU_k = TP_k / (TP_k + FP_k + FN_k), and mIoU is the mean over the classes whose union is non-empty.
This is the dataset-level number benchmarks report, not a mean of per-image scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from flowseg.encoding import IGNORE_INDEX


@dataclass
class SegmentationMetrics:
    miou: float
    pixel_accuracy: float
    mean_class_accuracy: float
    iou: list[float]              # per class, nan where the union is empty
    class_accuracy: list[float]   # per class TP / (TP + FN), nan where the class never occurs
    confusion: Tensor             # (N, N) int64, rows = ground truth, cols = prediction


def _nanmean(values: Tensor) -> float:
    present = values[~values.isnan()]
    return present.mean().item() if present.numel() else math.nan


class ConfusionMatrix:
    """Accumulates confusion[gt, pred] over batches; mergeable across processes with all_reduce."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class index in [0, {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch of predictions and ground truth, (B, H, W) integer maps each."""
        for name, tensor in (("pred", pred), ("target", target)):
            if not isinstance(tensor, Tensor) or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got {getattr(tensor, 'dtype', type(tensor))}")
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(
                f"pred and target must both be (B, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        n = self.num_classes
        valid = target != self.ignore_index
        gt, pr = target[valid].long(), pred[valid].long()
        if ((gt < 0) | (gt >= n)).any():
            raise ValueError(f"target has values outside [0, {n}) other than ignore_index {self.ignore_index}: "
                             f"{torch.unique(gt[(gt < 0) | (gt >= n)])[:10].tolist()}")
        if ((pr < 0) | (pr >= n)).any():
            raise ValueError(f"pred has values outside [0, {n}) at labelled pixels: "
                             f"{torch.unique(pr[(pr < 0) | (pr >= n)])[:10].tolist()}")
        counts = torch.bincount((gt * n + pr).to(self.confusion.device), minlength=n * n)
        self.confusion += counts.view(n, n)

    def all_reduce(self) -> None:
        """Sum the matrix over all processes when torch.distributed is initialised; no-op otherwise."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.confusion, op=dist.ReduceOp.SUM)

    def compute(self) -> SegmentationMetrics:
        cm = self.confusion.to(torch.float64)
        tp = cm.diagonal()
        gt_count, pred_count = cm.sum(1), cm.sum(0)
        union = gt_count + pred_count - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), math.nan)
        class_accuracy = torch.where(gt_count > 0, tp / gt_count.clamp_min(1), math.nan)
        total = cm.sum()
        pixel_accuracy = (tp.sum() / total).item() if total > 0 else math.nan
        return SegmentationMetrics(
            miou=_nanmean(iou), pixel_accuracy=pixel_accuracy, mean_class_accuracy=_nanmean(class_accuracy),
            iou=iou.tolist(), class_accuracy=class_accuracy.tolist(), confusion=self.confusion.clone(),
        )

    def reset(self) -> None:
        self.confusion.zero_()
