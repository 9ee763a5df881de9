"""Referring-segmentation metrics, as the papers report them.

Per (image, sentence) sample: IoU of the thresholded prediction with the ground truth, at the
image's original resolution. Over a split:
  mIoU    mean of the per-sample IoU,
  oIoU    sum of intersections / sum of unions ("overall IoU", most papers' "IoU"),
  Pr@X    share of samples with IoU >= X, X in 0.5 ... 0.9.
A sample whose prediction and ground truth are both empty has IoU 1 (nothing to find, nothing
found); an empty ground truth with a non-empty prediction has IoU 0. A split whose every
mask is empty has oIoU 1 by the same rule; an accumulator with no sample reports 0 throughout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_union(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample intersection and union of boolean masks (B, ...) -> (B,), (B,)."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    return (pred & target).sum(1).double(), (pred | target).sum(1).double()


def iou(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample IoU of boolean masks (B, ...) -> (B,); both empty -> 1."""
    inter, union = intersection_union(pred, target)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class IoUAccumulator:
    """Accumulates sums over a split; `all_reduce` sums them across DDP ranks.

    Each rank adds only its own samples, so a sample is never counted twice as long as the
    sampler does not repeat samples (see data.ShardSampler).
    """

    def __init__(self):
        # n, sum IoU, sum intersection, sum union, then one count per threshold
        self.sums = torch.zeros(4 + len(THRESHOLDS), dtype=torch.float64)

    def add(self, inter: float | Tensor, union: float | Tensor) -> float:
        """Add one sample; returns its IoU."""
        inter, union = float(inter), float(union)
        value = inter / union if union > 0 else 1.0
        self.sums[0] += 1
        self.sums[1] += value
        self.sums[2] += inter
        self.sums[3] += union
        for k, t in enumerate(THRESHOLDS):
            self.sums[4 + k] += value >= t
        return value

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one sample's boolean masks (any shape, same size)."""
        inter, union = intersection_union(pred[None], target[None])
        self.add(inter[0], union[0])

    def all_reduce(self) -> IoUAccumulator:
        if dist.is_available() and dist.is_initialized():
            sums = self.sums.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(sums)
            self.sums = sums.cpu()
        return self

    def compute(self) -> dict[str, float]:
        n = int(self.sums[0])
        out = {
            "mIoU": float(self.sums[1] / n) if n else 0.0,
            # every mask empty: 1, as for each of its samples; no sample at all: 0, as above
            "oIoU": float(self.sums[2] / self.sums[3]) if self.sums[3] > 0 else float(n > 0),
        }
        for k, t in enumerate(THRESHOLDS):
            out[f"Pr@{t}"] = float(self.sums[4 + k] / n) if n else 0.0
        out["n"] = n
        return out
