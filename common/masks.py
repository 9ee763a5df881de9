"""Binary masks as numpy arrays (H, W) of bool: the morphology and measures the simulated
detector (common.proposals) draws its errors with."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation (radius > 0) or erosion (radius < 0) by an octagon of that radius (3x3
    square and cross steps in turn, a cheap disc); outside the image is background, so erosion
    also eats from the border."""
    if radius == 0:
        return mask.copy()
    # erosion = the complement of the complement's dilation (the complement is 1 outside)
    m = torch.from_numpy(mask if radius > 0 else ~mask).float()[None, None]  # (1, 1, H, W)
    r = abs(radius)
    m = F.pad(m, (r, r, r, r), value=float(radius < 0))
    for step in range(r):
        if step % 2 == 0:  # square
            m = F.max_pool2d(m, 3, stride=1, padding=1)
        else:  # cross
            m = torch.maximum(F.max_pool2d(m, (1, 3), stride=1, padding=(0, 1)),
                              F.max_pool2d(m, (3, 1), stride=1, padding=(1, 0)))
    grown = (m[0, 0, r:-r, r:-r] > 0).numpy()  # (H, W)
    return grown if radius > 0 else ~grown


def shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift by (dy, dx) pixels; what leaves the image is lost, what enters is background."""
    out = np.zeros_like(mask)
    H, W = mask.shape
    ys, yd = slice(max(0, -dy), min(H, H - dy)), slice(max(0, dy), min(H, H + dy))
    xs, xd = slice(max(0, -dx), min(W, W - dx)), slice(max(0, dx), min(W, W + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def equivalent_radius(mask: np.ndarray) -> float:
    return math.sqrt(mask.sum() / math.pi)  # equivalent radius, pixels


def box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max(), xs.min(), xs.max()
