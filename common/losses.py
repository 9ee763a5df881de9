"""Losses used by the papers. Logits in, mean over the batch out.

Shapes: B batch, H W mask size, K candidates, D feature size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017) on per-pixel logits, averaged over pixels and batch.

    alpha = 0.25 and gamma = 2 are the focal paper's defaults (none of our papers gives others).
    """
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean()


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Dice loss (Milletari et al. 2016), 1 - (2|P∩T| + eps) / (|P| + |T| + eps), per sample."""
    p = torch.sigmoid(logits).flatten(1)  # (B, H*W)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return (1 - dice).mean()


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy on logits, averaged over pixels and batch."""
    return F.binary_cross_entropy_with_logits(logits, target)


def select_loss(scores: Tensor, valid: Tensor, target_index: Tensor) -> Tensor:
    """Cross-entropy over candidate scores (MaIL Eq. 7); padded candidates take no probability.

    scores (B, K) logits, valid (B, K) bool, target_index (B,) index of the candidate with the
    largest IoU with the ground truth.
    """
    scores = scores.masked_fill(~valid, float("-inf"))
    return F.cross_entropy(scores, target_index)


def reconstruction_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between a reconstructed and a reference feature (M3Dec LFR, Eq. 4)."""
    return F.mse_loss(pred, target)
