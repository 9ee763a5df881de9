"""Swin Transformer (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows"), torchvision's implementation.

Upstream: a hierarchical ViT with shifted-window attention, four stages at strides 4, 8, 16 and
32, trained for ImageNet classification.

Used by: M3Dec's transformer setting: the outputs of its 3rd and 4th stages (H/16 and H/32),
which M3Dec's visual neck fuses into F_vis.

Weights, in either publisher's file format (the names are converted on load):
- Microsoft's (the official repository's releases, e.g. swin_base_patch4_window12_384_22k.pth,
  ImageNet-22K, window 12, the file LAVT's README trains from): `{"model": state dict}` with
  names `patch_embed.`, `layers.i.blocks.j.`, `layers.i.downsample.`;
- torchvision's (swin_b-68c6b09e.pth, ImageNet-1K, window 7): names `features.k.`.
Their final norm and classifier are not read; relative-position indices and shift masks, which
are functions of the window size, are rebuilt rather than read. Inputs normalised with
ImageNet's statistics (both publishers').

Windows: a stage whose map is not a multiple of the window is zero-padded right and bottom
before the cyclic shift, as in Microsoft's segmentation and detection backbones (which LAVT's
backbone is built on); timm shifts before padding, so it agrees only where no padding is needed.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from common.encoders.loading import load_checked, load_state_dict_file, skip_init, warn_random
from common.model import IMAGENET_MEAN, IMAGENET_STD

SWIN_B = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])
SWIN_ARCHS = {
    "swin_b": dict(SWIN_B, window_size=7),  # torchvision.models.swin_b (ImageNet-1K)
    "swin_b_w12": dict(SWIN_B, window_size=12),  # Microsoft's ImageNet-22K, 384 px release
    "tiny": dict(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], window_size=4),
}
# Stochastic depth (the largest block-drop probability, growing linearly with depth) while
# training: LAVT's backbone uses 0.3 (lib/segmentation.py); torchvision's swin_b builder 0.5,
# its ImageNet recipe's. The CPU-sized variant trains from scratch without it.
STOCHASTIC_DEPTH = {"swin_b": 0.3, "swin_b_w12": 0.3, "tiny": 0.0}


class SwinImageEncoder(nn.Module):
    """Swin Transformer from torchvision, returning the output of each of its four stages.

    Arguments:
      arch: "swin_b" (window 7) | "swin_b_w12" (window 12) | "tiny" (window 4); see SWIN_ARCHS.
      weights: a weight file in Microsoft's or torchvision's format (module docstring) of the
        same window size; None = random.
    Returns (forward): four maps (B, C_i, H / 2^(i+2), W / 2^(i+2)), C_i = `channels[i]`,
      channels first (torchvision's stages are channels last).
    """

    pixel_mean, pixel_std = IMAGENET_MEAN, IMAGENET_STD  # both publishers trained so

    def __init__(self, arch: str = "swin_b", weights: str | None = None):
        super().__init__()
        from torchvision.models.swin_transformer import SwinTransformer

        if arch not in SWIN_ARCHS:
            raise ValueError(f"unknown Swin arch {arch!r}; choose from {sorted(SWIN_ARCHS)}")
        spec = dict(SWIN_ARCHS[arch])
        window = spec.pop("window_size")
        with skip_init(weights is not None):  # every tensor is loaded from the file below
            net = SwinTransformer(patch_size=[4, 4], window_size=[window, window],
                                  stochastic_depth_prob=STOCHASTIC_DEPTH[arch], **spec)
        self.features = net.features  # patch embedding, then (stage, patch merging) x 3, stage
        self.channels = [spec["embed_dim"] * 2**i for i in range(4)]
        if weights is None:
            warn_random(f"Swin {arch}", "pass a Swin weight file (Microsoft's or torchvision's)")
        else:  # the file's final norm and classifier are not used
            state = load_state_dict_file(weights)
            if "patch_embed.proj.weight" in state:
                state = from_microsoft(state, self.state_dict())
            load_checked(self, state, weights, f"Swin {arch}", skip=("norm.", "head."))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)  # (B, h, w, C)
            if i % 2 == 1:  # the output of a stage
                feats.append(x.permute(0, 3, 1, 2))
        return feats


_MICROSOFT_NAMES = [  # (Microsoft's name prefix, torchvision's), applied in order
    (r"patch_embed\.proj\.", "features.0.0."),  # the 4x4 patch convolution
    (r"patch_embed\.norm\.", "features.0.2."),
    (r"layers\.(\d+)\.blocks\.(\d+)\.", lambda m: f"features.{2 * int(m[1]) + 1}.{m[2]}."),
    # patch merging ends stage i in Microsoft's layout; torchvision lists it after the stage
    (r"layers\.(\d+)\.downsample\.", lambda m: f"features.{2 * int(m[1]) + 2}."),
    (r"(features\.\d+\.\d+\.)mlp\.fc1\.", r"\1mlp.0."),  # torchvision's MLP is a Sequential
    (r"(features\.\d+\.\d+\.)mlp\.fc2\.", r"\1mlp.3."),
]


def from_microsoft(state: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """Microsoft's Swin names -> torchvision's. The file's relative-position indices and shift
    masks are dropped and the module's own indices kept (the same function of the window size,
    whose bias tables' shapes the loader checks); names no pattern matches pass through
    unchanged, so that the loader names them."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(("relative_position_index", "attn_mask")):
            continue
        for pattern, replacement in _MICROSOFT_NAMES:
            name = re.sub("^" + pattern, replacement, name)
        out[name] = tensor
    return out | {k: v for k, v in own.items() if k.endswith("relative_position_index")}
