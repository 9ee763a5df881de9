"""MARIS: Referring Image Segmentation via Mutual-Aware Attention Features.
Zhang, Liu, Yin, Yue, Yang. AAAI 2024, arXiv:2311.15727.

A frozen SAM image encoder gives shallow, middle and deep features (its 2nd-4th global-attention
blocks); a frozen CLIP text encoder gives word features. Feature Enhancement fuses the three
visual levels (Eq. 1-2). Two Mutual-Aware Attention blocks compute one affinity between pixels
and words and use it both ways: language-aware visual features and vision-aware linguistic
features (Eq. 3-5). The Mask Decoder lets a single learned multi-modal query token gather the
vision-aware words and interact with the visual features (Eq. 6-8); its output, through an MLP,
is dotted with upsampled visual features to give the mask. Loss: focal + dice (Eq. 9).

Shapes: B batch, C SAM width, C' CLIP text width, D model width, h w feature map (64 x 64 for
SAM at 1024), N = h*w, L words, H W input size.

Interpretations (where the paper is silent or contradicts itself):
- Attention mask (Eq. 4). The text says the mask removes *irrelevant* pairs, those whose
  relevance M = sigmoid(Z_v Z_l^T) is low, but the formula keeps pairs with M < tau. We follow
  the text: a pair is masked (-inf) when M < tau. Padded words are always masked, and a pixel
  (or word) whose pairs are all masked attends to nothing (zeros, never NaN).
- tau is given only in the unavailable supplementary material; we use 0.5, the point where the
  sigmoid relevance says "more relevant than not" (config `tau`).
- Language-Guided Attention (Eq. 5, "A^T"). Read literally, A^T Z_v sums each word's share of
  every pixel's softmax over words. The text says this branch "weights different image regions
  for each word", i.e. a distribution over regions, so we take the softmax of the same masked
  affinity along the pixel axis. Eq. 3 has no 1/sqrt(D) scaling and neither do we.
- Width. The paper writes F_v in R^{HxWxC} and W_v in R^{CxC} without giving C after Feature
  Enhancement; we use D = 256 (config `dim`) from the FE MLPs onward, as SAM's decoder does.
- The MLP of Eq. 1-2 is two linear layers with GELU (width D); CBA is a 3x3 conv (2D -> D),
  BatchNorm and GELU, as the paper says.
- Mask Decoder. The number of decoder blocks is not given: 2 (config). Each block is exactly
  Eq. 6-8 (attention plus residual, no norms or FFNs, none being mentioned); 8 heads. The
  visual tokens carry SAM's absolute position embedding, so no new one is added.
- Upsampling. "Two sequential blocks, each a convolutional layer and an upsample operation":
  3x3 conv + BatchNorm + GELU then 2x bilinear, widths 64 and 32 (D/4 and D/8, as SAM's decoder
  upscales to 32 channels; the tiny config keeps them too: with D/8 = 8 channels it learned
  slower); the MLP on the query token (2 layers) outputs 32. The mask (4h x 4w) is resized
  bilinearly to the input size.
- Text encoder. "A text encoder pretrained by CLIP": we use CLIP ViT-B/16's (width 512) per-token
  features after the final LayerNorm, before the projection. Sentences are cut at 20 tokens.
- Training recipe. The paper defers its implementation details to a supplementary we do not
  have, so every value is ours: AdamW, lr 1e-4, weight decay 1e-2, 5% warm-up then polynomial
  decay (power 0.9), 50 epochs, batch 32; focal alpha 0.25, gamma 2; dice and focal weight 1.
- Freezing. The paper freezes both encoders: the `paper` configs do, whatever weights are given
  (`freeze_encoders=True`; train.py refuses to start them without the weight files unless
  `--random-init`). Other configs (None) freeze an encoder iff its weights are given, since a
  random frozen encoder carries no information; the model says so when it trains one.
- Text encoder weights: OpenAI's CLIP was trained with QuickGELU, so the paper configs build
  `ViT-B-16-quickgelu`; an open_clip GELU checkpoint needs `--set clip_arch=ViT-B-16`.
- Training loop (train.py; none of it is in the paper): gradient clipping at norm 1.0 and
  random horizontal flips with "left"/"right" swapped in the sentence (config `clip_grad`,
  `hflip`), because the tiny configs are trained from scratch and position words must stay
  true under a flip; `best.pt` is the epoch with the best val mIoU, so val numbers of
  `best.pt` are optimistic (report the test splits, or `last.pt`).
- Padding: SAM pads the image bottom-right with zeros (after normalisation) and so do we; the
  image_mask is not used, as in SAM.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import optim
from common.encoders import CLIPTextEncoder, SAMImageEncoder
from common.layers import MLP, Attention, safe_softmax
from common.losses import dice_loss, sigmoid_focal_loss
from common.model import InputSpec, RISModel, freeze
from common.tokenizers import ClipTokenizer


@dataclass
class MARISConfig:
    sam_arch: str = "vit_h"  # "SAM uses a ViT-H" (Sec. Image Encoder)
    image_size: int = 1024  # SAM's input, longest side, padded square (Sec. Image Encoder)
    global_blocks: tuple[int, ...] = (1, 2, 3)  # 2nd-4th global-attention blocks -> F_v1..F_v3
    clip_arch: str = "ViT-B-16-quickgelu"  # open_clip name of OpenAI's CLIP (QuickGELU); which
    # CLIP the paper uses is not said; ViT-B/16 is CRIS's and ReLA-era RIS work's
    max_tokens: int = 20  # CLIP tokens incl. SOT/EOT (not given; RefCOCO sentences avg. 3.6 words)
    dim: int = 256  # D, width after Feature Enhancement (not given, see Interpretations)
    heads: int = 8  # heads of the decoder's MHSA / MHCA (not given)
    num_ma_blocks: int = 2  # "two sequential Mutual-Aware Attention blocks"
    num_decoder_blocks: int = 2  # not given
    tau: float = 0.5  # Eq. (4) threshold (value only in the supplementary)
    up_dims: tuple[int, ...] = (64, 32)  # widths of the two upsampling blocks (D/4, D/8, as SAM)
    image_weights: str | None = None  # segment-anything checkpoint (sam_vit_h_4b8939.pth)
    text_weights: str | None = None  # open_clip / OpenAI CLIP checkpoint
    freeze_encoders: bool | None = None  # None: freeze an encoder iff its weights are given
    # training recipe (ours: the paper's is in a supplementary we do not have); global batch
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup: float = 0.05
    epochs: int = 50
    batch_size: int = 32
    clip_grad: float = 1.0  # max gradient norm, 0 = none; not in the paper (Interpretations)
    hflip: bool = True  # training flips, "left"/"right" swapped; not in the paper (ditto)


# The encoder files each paper config starts from: train.py refuses to start a paper config
# without them (unless --random-init), so that "paper" never silently means "from scratch".
PAPER_WEIGHTS = {
    "paper": {"image_weights": "SAM ViT-H, sam_vit_h_4b8939.pth (segment-anything)",
              "text_weights": "OpenAI CLIP ViT-B/16, ViT-B-16.pt (QuickGELU)"},
    "paper-vit-b": {"image_weights": "SAM ViT-B, sam_vit_b_01ec64.pth (segment-anything)",
                    "text_weights": "OpenAI CLIP ViT-B/16, ViT-B-16.pt (QuickGELU)"},
}

CONFIGS = {
    "paper": MARISConfig(freeze_encoders=True),
    "paper-vit-b": MARISConfig(sam_arch="vit_b", freeze_encoders=True),
    # CPU-sized, same code paths: 96 px, SAM "tiny" (patch 8 -> 12x12 tokens), tiny CLIP text.
    # 96 px, not 128: a step is 1.6x faster for about the same learning per step (val mIoU after
    # 750 steps, one run each: 0.51 at 96 px, 0.40-0.52 at 128), so 11 epochs fit 15 minutes
    # with room for a slow machine (README: 0.590 in 702 s; 8 epochs at 128 px: 0.607 in 730 s)
    # tau 0.1: trained from scratch, tau 0.5 masks half of the (random) pairs at the start and
    # learns slower (val mIoU at 250 steps, one run each: tau 0.5: 0.37, 0.1: 0.40, 0: 0.39).
    # It does not reach val mIoU 0.7 in 15 minutes: sentences that pick the extreme of a group
    # ("the circle on the left") stay at ~0.34 mIoU all run (README, "The built-in synthetic data")
    "tiny": MARISConfig(sam_arch="tiny", image_size=96, clip_arch="tiny", dim=64, heads=4, tau=0.1,
                        lr=1e-3, warmup=0.03, epochs=11, batch_size=16),
}


class FeatureEnhancement(nn.Module):
    """Feature Enhancement (Sec. Feature Enhancement, Eq. 1-2): shallow + middle, then + deep."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        mlp = lambda d: MLP(d, dim, dim, num_layers=2, act=nn.GELU)
        cba = lambda: nn.Sequential(nn.Conv2d(2 * dim, dim, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(dim), nn.GELU())
        self.mlp_v1, self.mlp_v2, self.mlp_v3, self.mlp_hat = (mlp(in_dim), mlp(in_dim),
                                                               mlp(in_dim), mlp(dim))
        self.cba1, self.cba2 = cba(), cba()

    def forward(self, f_v1: Tensor, f_v2: Tensor, f_v3: Tensor) -> Tensor:
        to_map = lambda x: x.permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)
        # Eq. (1): F^ = CBA([MLP(F_v1), MLP(F_v2)])
        f_hat = self.cba1(torch.cat([to_map(self.mlp_v1(f_v1)), to_map(self.mlp_v2(f_v2))], 1))
        # Eq. (2): F_v = CBA([MLP(F^), MLP(F_v3)])
        f_hat = self.mlp_hat(f_hat.permute(0, 2, 3, 1))
        f_v = self.cba2(torch.cat([to_map(f_hat), to_map(self.mlp_v3(f_v3))], 1))
        return f_v  # (B, D, h, w)


class MutualAwareAttention(nn.Module):
    """Mutual-Aware Attention block (Sec. Mutual-Aware Attention, Eq. 3-5, Fig. 4)."""

    def __init__(self, vis_dim: int, text_dim: int, dim: int, tau: float):
        super().__init__()
        self.w_v = nn.Linear(vis_dim, dim, bias=False)  # W_v
        self.w_l = nn.Linear(text_dim, dim, bias=False)  # W_l
        self.norm_v, self.norm_l = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tau = tau

    def forward(self, f_v: Tensor, f_l: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z_v, z_l = self.w_v(f_v), self.w_l(f_l)  # Eq. (3): Z_v (B, N, D), Z_l (B, L, D)
        affinity = torch.einsum("bnd,bld->bnl", z_v, z_l)  # Z_v Z_l^T (B, N, L)
        # Eq. (4): mask pairs whose relevance sigmoid(Z_v Z_l^T) is below tau, and padded words
        keep = (torch.sigmoid(affinity) >= self.tau) & text_mask[:, None, :]
        logits = affinity.masked_fill(~keep, float("-inf"))
        attn_v = safe_softmax(logits, dim=2)  # A: each pixel's weights over words (B, N, L)
        attn_l = safe_softmax(logits, dim=1)  # each word's weights over pixels (B, N, L)
        # Eq. (5): F_lav = LN(A Z_l + Z_v), F_val = LN(A^T Z_v + Z_l)
        f_lav = self.norm_v(torch.einsum("bnl,bld->bnd", attn_v, z_l) + z_v)
        f_val = self.norm_l(torch.einsum("bnl,bnd->bld", attn_l, z_v) + z_l)
        return f_lav, f_val, attn_v


class DecoderBlock(nn.Module):
    """One Mask Decoder block (Sec. Mask Decoder, Eq. 6-8)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn_v = Attention(dim, heads)  # MHSA of Eq. (6)
        self.self_attn_c = Attention(dim, heads)  # MHSA of Eq. (7)
        self.cross_attn = Attention(dim, heads)  # MHCA of Eq. (8)

    def forward(self, f_lav: Tensor, f_c: Tensor, c_mask: Tensor) -> tuple[Tensor, Tensor]:
        f_lav = self.self_attn_v(f_lav, f_lav, f_lav) + f_lav  # Eq. (6)
        f_c = self.self_attn_c(f_c, f_c, f_c, key_mask=c_mask) + f_c  # Eq. (7)
        f_lav = self.cross_attn(f_lav, f_c, f_c, key_mask=c_mask) + f_lav  # Eq. (8)
        return f_lav, f_c


class MARIS(RISModel):
    """MARIS (Fig. 3). forward(image, text, text_mask, target=None) -> dict.

    Arguments:
      image (B, 3, H, W) normalised with SAM's statistics, H = W = cfg.image_size;
      text (B, L) CLIP token ids; text_mask (B, L) True on real tokens;
      target (B, 1, H, W) in {0, 1}, optional: adds the loss (Eq. 9).
    Returns: mask_logits (B, 1, H, W), word_attn (B, h*w, L) (the last block's A), and with a
      target: loss, loss_focal, loss_dice.
    """

    def __init__(self, cfg: MARISConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = InputSpec(cfg.image_size, "longest", mean=SAMImageEncoder.pixel_mean,
                                    std=SAMImageEncoder.pixel_std)  # SAM's statistics
        self.tokenizer = ClipTokenizer(cfg.max_tokens)
        self.image_encoder = SAMImageEncoder(cfg.sam_arch, cfg.image_size, cfg.global_blocks,
                                             cfg.image_weights)
        self.text_encoder = CLIPTextEncoder(cfg.clip_arch, cfg.text_weights, project=False)
        for name, enc, weights in (("image", self.image_encoder, cfg.image_weights),
                                   ("text", self.text_encoder, cfg.text_weights)):
            frozen = cfg.freeze_encoders if cfg.freeze_encoders is not None else weights is not None
            if frozen:
                freeze(enc)
            elif weights is None:
                warnings.warn(f"MARIS: the {name} encoder has random weights, so it is trained "
                              "(the paper freezes pretrained encoders)", stacklevel=2)
        D = cfg.dim
        self.enhance = FeatureEnhancement(self.image_encoder.dim, D)
        text_dims = [self.text_encoder.out_dim] + [D] * (cfg.num_ma_blocks - 1)
        self.mutual = nn.ModuleList(MutualAwareAttention(D, t, D, cfg.tau) for t in text_dims)
        self.query = nn.Parameter(torch.randn(1, 1, D) * 0.02)  # F_m, random initialisation
        self.decoder = nn.ModuleList(DecoderBlock(D, cfg.heads)
                                     for _ in range(cfg.num_decoder_blocks))
        up = lambda a, b: nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(b), nn.GELU(),
                                        nn.Upsample(scale_factor=2, mode="bilinear"))
        u1, u2 = cfg.up_dims
        self.upsample = nn.Sequential(up(D, u1), up(u1, u2))
        self.query_mlp = MLP(D, D, u2, num_layers=2)

    def frozen_parts(self) -> set[str]:
        """Which encoders are frozen, so that common.cache may store their features."""
        return {name for name, enc in (("image", self.image_encoder), ("text", self.text_encoder))
                if getattr(enc, "frozen", False)}

    def encode_image(self, image: Tensor) -> dict[str, Tensor]:
        """F_v1, F_v2, F_v3 (B, h, w, C): SAM's 2nd-4th global-attention blocks."""
        f_v1, f_v2, f_v3 = self.image_encoder(image)
        return {"f_v1": f_v1, "f_v2": f_v2, "f_v3": f_v3}

    def encode_text(self, text: Tensor, text_mask: Tensor) -> dict[str, Tensor]:
        """F_l (B, L, C'): CLIP's per-token features."""
        return {"f_l": self.text_encoder(text, text_mask)[0]}

    def forward(self, image: Tensor, text: Tensor, text_mask: Tensor,
                image_mask: Tensor | None = None,
                target: Tensor | None = None, image_feats: dict[str, Tensor] | None = None,
                text_feats: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """image_feats / text_feats: precomputed encode_image / encode_text outputs
        (common.cache).
        """
        B, _, H, W = image.shape
        # 1. frozen encoders: F_v1, F_v2, F_v3 (B, h, w, C) and F_l (B, L, C')
        image_feats = image_feats if image_feats is not None else self.encode_image(image)
        f_v1, f_v2, f_v3 = image_feats["f_v1"], image_feats["f_v2"], image_feats["f_v3"]
        f_l = (text_feats if text_feats is not None else self.encode_text(text, text_mask))["f_l"]
        # 2. Feature Enhancement (Eq. 1-2), flattened to F_v (B, N, D)
        f_v = self.enhance(f_v1, f_v2, f_v3)
        h, w = f_v.shape[-2:]
        f_lav, f_val = f_v.flatten(2).transpose(1, 2), f_l
        # 3. Mutual-Aware Attention blocks (Eq. 3-5)
        for block in self.mutual:
            f_lav, f_val, word_attn = block(f_lav, f_val, text_mask)
        # 4. Mask Decoder (Eq. 6-8): F_c = [F_m, F_val]; the query token is never padding
        f_c = torch.cat([self.query.expand(B, -1, -1), f_val], 1)  # (B, 1 + L, D)
        c_mask = torch.cat([text_mask.new_ones(B, 1), text_mask], 1)
        for block in self.decoder:
            f_lav, f_c = block(f_lav, f_c, c_mask)
        # 5. upsample the visual features, MLP on the query token F^_m, and their product
        vis = self.upsample(f_lav.transpose(1, 2).unflatten(2, (h, w)))  # (B, u2, 4h, 4w)
        kernel = self.query_mlp(f_c[:, 0])  # (B, u2)
        logits = torch.einsum("bc,bchw->bhw", kernel, vis)[:, None]
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        out = {"mask_logits": logits, "word_attn": word_attn}
        if target is not None:
            # Eq. (9): L = L_focal + L_dice
            out["loss_focal"] = sigmoid_focal_loss(logits, target)
            out["loss_dice"] = dice_loss(logits, target)
            out["loss"] = out["loss_focal"] + out["loss_dice"]
        return out

    def configure_optimizers(self, lr: float, total_steps: int):
        """AdamW with warm-up and polynomial decay (our recipe: see Interpretations)."""
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=lr,
                                weight_decay=self.cfg.weight_decay, fused=True)
        return opt, optim.poly(opt, total_steps, power=0.9, warmup=self.cfg.warmup)

    def vis_panels(self, out: dict[str, Tensor], i: int) -> list[tuple[str, Tensor]]:
        """Language-guided view of Fig. 5: each pixel's attention on its most-attended word."""
        attn = out["word_attn"][i]  # (N, L)
        side = int(attn.shape[0] ** 0.5)
        return [("max word attention", attn.max(1).values.reshape(side, -1))]


MODEL = MARIS
