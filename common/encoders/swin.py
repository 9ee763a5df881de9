"""Swin Transformer (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows"), torchvision's implementation.

Upstream: a hierarchical ViT with shifted-window attention, four stages at strides 4, 8, 16 and
32, trained for ImageNet classification.

Used by: M3Dec's transformer setting: the outputs of its 3rd and 4th stages (H/16 and H/32),
which M3Dec's visual neck fuses into F_vis.

Weights: torchvision's swin_b state dict (swin_b-68c6b09e.pth); its final norm and classifier
are not read. Inputs normalised with ImageNet's statistics.
"""

from __future__ import annotations

from torch import Tensor, nn

from common.encoders.loading import load_checked, load_state_dict_file, warn_random
from common.model import IMAGENET_MEAN, IMAGENET_STD

# torchvision's swin_b, and this library's CPU-sized variant with the same structure
SWIN_ARCHS = {"swin_b": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
              "tiny": dict(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])}


class SwinImageEncoder(nn.Module):
    """Swin Transformer from torchvision, returning the output of each of its four stages.

    Arguments:
      arch: "swin_b" (torchvision.models.swin_b, window 7) | "tiny" (window 4).
      weights: a state dict file of torchvision's swin_b (swin_b-68c6b09e.pth); None = random.
    Returns (forward): four maps (B, C_i, H / 2^(i+2), W / 2^(i+2)), C_i = `channels[i]`,
      channels first (torchvision's stages are channels last).
    """

    pixel_mean, pixel_std = IMAGENET_MEAN, IMAGENET_STD  # torchvision's swin_b was trained so

    def __init__(self, arch: str = "swin_b", weights: str | None = None):
        super().__init__()
        from torchvision.models import swin_b
        from torchvision.models.swin_transformer import SwinTransformer

        if arch not in SWIN_ARCHS:
            raise ValueError(f"unknown Swin arch {arch!r}; choose from {sorted(SWIN_ARCHS)}")
        if arch == "swin_b":
            net = swin_b(weights=None)
        else:
            net = SwinTransformer(patch_size=[4, 4], window_size=[4, 4], stochastic_depth_prob=0.0,
                                  **SWIN_ARCHS[arch])
        self.features = net.features  # patch embedding, then (stage, patch merging) x 3, stage
        self.channels = [SWIN_ARCHS[arch]["embed_dim"] * 2**i for i in range(4)]
        if weights is None:
            warn_random(f"Swin {arch}", "pass torchvision's swin_b state dict file")
        else:  # the file's final norm and classifier are not used
            load_checked(self, load_state_dict_file(weights), weights, f"Swin {arch}",
                         skip=("norm.", "head."))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)  # (B, h, w, C)
            if i % 2 == 1:  # the output of a stage
                feats.append(x.permute(0, 3, 1, 2))
        return feats
