"""Generic convolution and linear blocks: sigma(F W) as CRIS-style code writes it, on a feature
map (conv + BatchNorm + ReLU) and on token features (linear + ReLU), and the per-sample dynamic
convolution of mask heads that predict their own kernels.

Shapes: B batch, C channels, H W feature map, L tokens.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(in_dim: int, out_dim: int, kernel: int = 1) -> nn.Sequential:
    """(B, in_dim, H, W) -> (B, out_dim, H, W): a k x k convolution without bias ("same" zero
    padding for odd k), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_dim), nn.ReLU())


def linear_relu(in_dim: int, out_dim: int) -> nn.Sequential:
    """(..., in_dim) -> (..., out_dim): a linear layer and ReLU, applied to every token alone."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU())


def dynamic_conv(feats: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Per-sample convolutions with predicted kernels (CondInst, CRIS; MMNet's Eq. 14): feats
    (B, C, H, W), weight (B, Q, C, k, k), bias (B, Q) -> (B, Q, H, W); sample b is convolved with
    its own Q kernels, zero padding k // 2 keeping the grid (one grouped conv)."""
    B, C, H, W = feats.shape
    k = weight.shape[-1]
    out = F.conv2d(feats.reshape(1, B * C, H, W), weight.flatten(0, 1), bias.flatten(),
                   padding=k // 2, groups=B)  # (1, B*Q, H, W)
    return out.view(B, -1, H, W)
