"""Darknet-53 (Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement"), YOLOv3's backbone,
in plain PyTorch.

Upstream: a stem and five stride-2 stages of residual blocks (1x1 then 3x3 conv, BatchNorm,
LeakyReLU 0.1), trained for ImageNet classification and then inside YOLOv3 for COCO detection.

Used by: M3Dec's CNN setting (as in MCN and VLT): the outputs of its last two stages (H/16 and
H/32), which M3Dec's visual neck fuses into F_vis.

Weights: Darknet's own binary files, yolov3.weights (its first 52 convolutions: Darknet-53
trained for COCO detection) or darknet53.conv.74 (ImageNet), read by `load_darknet_binary`; or a
state dict of this module. Inputs are RGB in [0, 1] with no mean/std normalisation.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from common.encoders.loading import load_checked, load_state_dict_file, skip_init, warn_random

# YOLOv3's Darknet-53: a 3x3 stem of `width` channels, then five stages, each a stride-2 3x3 conv
# that doubles the channels and `depths[i]` residual blocks. "tiny" is this library's CPU-sized
# variant with the same structure.
DARKNET_ARCHS = {"darknet53": dict(width=32, depths=(1, 2, 8, 8, 4)),
                 "tiny": dict(width=8, depths=(1, 1, 1, 2, 1))}


def _conv_bn_leaky(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1))


class _DarknetResidual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn_leaky(c, c // 2, 1), _conv_bn_leaky(c // 2, c, 3))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Darknet53(nn.Module):
    """Darknet-53, YOLOv3's backbone, returning the output of each of its five stages.

    Arguments:
      arch: "darknet53" | "tiny".
      weights: a state dict of this module (a .pth/.pt file), or a Darknet binary file
        (`yolov3.weights`, whose first 52 convolutions are Darknet-53 trained on COCO, as MCN,
        VLT and M3Dec use; or `darknet53.conv.74`, ImageNet); None = random.
    Returns (forward): five maps (B, C_i, H / 2^(i+1), W / 2^(i+1)), C_i = `channels[i]`.
    """

    # Darknet's weights take RGB scaled to [0, 1], with no mean/std normalisation
    pixel_mean, pixel_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self, arch: str = "darknet53", weights: str | None = None):
        super().__init__()
        if arch not in DARKNET_ARCHS:
            raise ValueError(f"unknown Darknet arch {arch!r}; choose from {sorted(DARKNET_ARCHS)}")
        width, depths = DARKNET_ARCHS[arch]["width"], DARKNET_ARCHS[arch]["depths"]
        self.channels = [width * 2 ** (i + 1) for i in range(len(depths))]
        with skip_init(weights is not None):  # every tensor is loaded from the file below
            self.stem = _conv_bn_leaky(3, width, 3)
            self.stages = nn.ModuleList(
                nn.Sequential(_conv_bn_leaky(c // 2, c, 3, stride=2),
                              *(_DarknetResidual(c) for _ in range(d)))
                for c, d in zip(self.channels, depths))
        if weights is None:
            warn_random(f"Darknet {arch}", "pass yolov3.weights or a state dict of this module")
        elif weights.endswith((".weights", ".74")):
            load_darknet_binary(self, weights, f"Darknet-53 ({arch})")
        else:
            load_checked(self, load_state_dict_file(weights), weights, f"Darknet-53 ({arch})")

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def load_darknet_binary(module: nn.Module, path: str, what: str = "Darknet-53") -> None:
    """Darknet's own weight format: a header, then for every convolution in network order its
    BatchNorm bias, weight, running mean and variance, then its kernel (float32). The allowance:
    only the first convolutions are read, the rest of a yolov3.weights file is YOLO's detection
    head. A file that ends early is a ValueError. Prints one line (see `load_checked`)."""
    import struct

    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path!r}")
    with open(path, "rb") as f:
        major, minor, _ = struct.unpack("<3i", f.read(12))
        f.read(8 if major * 10 + minor >= 2 else 4)  # images seen during training
        raw = f.read()
    if len(raw) % 4:
        raise ValueError(f"{path} holds {len(raw)} bytes after its header, not float32 values: "
                         "not a darknet weights file")
    values = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    # registration order is Darknet's layer order
    convs = [m for m in module.modules() if isinstance(m, nn.Sequential)
             and isinstance(m[0], nn.Conv2d)]
    pos = 0
    with torch.no_grad():
        for i, (conv, bn) in enumerate(m[:2] for m in convs):
            for t in (bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight):
                if pos + t.numel() > values.numel():
                    raise ValueError(f"{path} ends in convolution {i + 1} of the {len(convs)} of "
                                     f"the {what}: not a file of this architecture")
                t.copy_(values[pos : pos + t.numel()].view_as(t))
                pos += t.numel()
    rest = values.numel() - pos
    note = f" ({rest} further values, a detection head, left out)" if rest else ""
    print(f"loaded {path}: {len(convs)}/{len(convs)} convolutions ({5 * len(convs)} tensors) "
          f"into {what}{note}")
