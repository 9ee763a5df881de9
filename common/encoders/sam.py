"""SAM's image encoder (Kirillov et al. 2023, "Segment Anything"), through segment-anything.

Upstream: a ViT (ViT-B/L/H, patch 16, 1024 px input) of windowed-attention blocks with four
global-attention blocks among them, then a convolutional neck whose output SAM's prompt-driven
mask decoder reads.

Used by: MARIS, frozen: the outputs of the 2nd, 3rd and 4th global-attention blocks are F_v1,
F_v2, F_v3 (`global_blocks=(1, 2, 3)`), channels last, (B, 64, 64, C) at 1024 px. The neck and
the blocks after the last one returned are not built.

Weights: segment-anything's checkpoints (sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth,
sam_vit_b_01ec64.pth); only their `image_encoder.` tensors up to the last block returned are read.
Inputs normalised with SAM's pixel statistics (`pixel_mean`, `pixel_std`).

Shapes: B batch, C channels, h w patch grid, N = h*w, nh heads, hd head width.
"""

from __future__ import annotations

from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.encoders.loading import (
    load_checked,
    load_state_dict_file,
    sine_init_,
    skip_init,
    warn_random,
)
from common.model import SAM_MEAN, SAM_STD

# segment-anything's build_sam.py settings; "tiny" is this library's CPU-sized variant with the
# same structure (windowed blocks and four global-attention blocks) at depth 6, only two of its
# blocks windowed, to keep a MARIS tiny step fast on a CPU
SAM_ARCHS = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "tiny": dict(embed_dim=64, depth=6, num_heads=2, global_attn_indexes=(1, 3, 4, 5),
                 patch_size=8, window_size=4),
}


@cache
def _sdpa_sam_attention():
    """segment-anything's Attention with its softmax(q k^T * scale + rel-pos) v computed by
    `F.scaled_dot_product_attention`, the decomposed relative positions passed as an additive
    bias (they are built from the unscaled q, as in segment-anything)."""
    from segment_anything.modeling.image_encoder import Attention, get_rel_pos

    class SDPAAttention(Attention):
        def forward(self, x: Tensor) -> Tensor:
            B, H, W, _ = x.shape
            qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # (B, nh, N, hd)
            bias = None
            if self.use_rel_pos:
                r_h = get_rel_pos(H, H, self.rel_pos_h)  # (H, H, hd)
                r_w = get_rel_pos(W, W, self.rel_pos_w)  # (W, W, hd)
                q_grid = q.unflatten(2, (H, W))  # (B, nh, H, W, hd)
                rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, r_h)  # (B, nh, H, W, H)
                rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, r_w)  # (B, nh, H, W, W)
                bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, self.num_heads,
                                                                           H * W, H * W)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, N, hd)
            return self.proj(x.transpose(1, 2).reshape(B, H, W, -1))

    return SDPAAttention


class SAMImageEncoder(nn.Module):
    """SAM's ViT image encoder returning the outputs of chosen global-attention blocks.

    Blocks after the last requested one and SAM's neck are not built: nothing unused is kept.

    Arguments:
      arch: "vit_h" | "vit_l" | "vit_b" | "tiny".
      img_size: square input side (1024 for SAM's weights).
      global_blocks: which global-attention blocks to return, counted from 0 (MARIS: 1, 2, 3).
      weights: a segment-anything checkpoint (sam_vit_h_4b8939.pth, ...) or None.
    Returns (forward): list of (B, h, w, C) features, channels last, h = w = img_size / patch.
    """

    pixel_mean, pixel_std = SAM_MEAN, SAM_STD  # what SAM's weights expect (0-1 scale)

    def __init__(self, arch: str = "vit_h", img_size: int = 1024,
                 global_blocks: tuple[int, ...] = (1, 2, 3), weights: str | None = None):
        super().__init__()
        from segment_anything.modeling.image_encoder import ImageEncoderViT

        if arch not in SAM_ARCHS:
            raise ValueError(f"unknown SAM arch {arch!r}; choose from {sorted(SAM_ARCHS)}")
        spec = dict(patch_size=16, window_size=14) | SAM_ARCHS[arch]
        self.out_indexes = [spec["global_attn_indexes"][i] for i in global_blocks]
        with skip_init(weights is not None):  # every tensor is loaded from the file below
            vit = ImageEncoderViT(
                img_size=img_size, patch_size=spec["patch_size"], embed_dim=spec["embed_dim"],
                depth=spec["depth"], num_heads=spec["num_heads"], mlp_ratio=4,
                norm_layer=partial(nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
                global_attn_indexes=spec["global_attn_indexes"], window_size=spec["window_size"],
            )
        self.patch_embed, self.pos_embed = vit.patch_embed, vit.pos_embed
        self.blocks = vit.blocks[: max(self.out_indexes) + 1]
        for blk in self.blocks:  # same weights and maths, on the fused attention kernel
            blk.attn.__class__ = _sdpa_sam_attention()
        self.dim, self.patch_size, self.img_size = spec["embed_dim"], spec["patch_size"], img_size
        if weights is None:
            # SAM initialises its absolute position embedding to zeros and loads it from the
            # checkpoint; trained from scratch it starts as the 2-D sine encoding
            sine_init_(self.pos_embed[0].flatten(0, 1))
            warn_random(f"SAM {arch} image encoder", "pass a segment-anything checkpoint")
        else:  # shapes must match: segment-anything's weights are for patch 16 at 1024 px
            # a SAM file also holds the prompt encoder, the mask decoder and the encoder's neck;
            # blocks after the last one returned are not built
            unused = ("prompt_encoder.", "mask_decoder.", "image_encoder.neck.") + tuple(
                f"image_encoder.blocks.{i}." for i in range(len(self.blocks), spec["depth"]))
            load_checked(self, load_state_dict_file(weights), weights,
                         f"SAM {arch} image encoder", prefix="image_encoder.", skip=unused)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.patch_embed(x) + self.pos_embed  # (B, h, w, C)
        feats = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.out_indexes:
                feats.append(x)
        return feats
