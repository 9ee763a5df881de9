"""MARIS: Referring Image Segmentation via Mutual-Aware Attention Features.
Zhang, Liu, Yin, Yue, Yang. AAAI 2024, arXiv:2311.15727.

A frozen SAM image encoder gives shallow, middle and deep features (its 2nd-4th global-attention
blocks); a frozen CLIP text encoder gives word features. Feature Enhancement fuses the three
visual levels (Eq. 1-2). Two Mutual-Aware Attention blocks compute one affinity between pixels
and words and use it both ways: Vision-Guided Attention weights the words for each pixel
(language-aware visual features F_lav), Language-Guided Attention weights the pixels for each
word (vision-aware linguistic features F_val) (Eq. 3-5). The Mask Decoder lets a single learned
multi-modal query token gather F_val and interact with F_lav (Eq. 6-8); the query token, through
an MLP, is dotted with the upsampled visual features to give the mask. Loss: focal + dice (Eq. 9).

Shapes: B batch, C SAM width, C' CLIP text width, D model width, h w feature map (64 x 64 for
SAM at 1024), N = h*w, L words, H W input size.

Ablations (Tab. 2-5, RefCOCO val): `ABLATIONS` maps each row to the config fields that build it;
the default config is the full model (#4). Not built, because the paper gives too little: Tab. 3
#5-#7 (ReSTR's transformer encoder, VLT's spatial dynamic fusion, BRINet's bidirectional
cross-modal module in place of MA: other papers' modules, named in one sentence each; the paper
calls SDF "equivalent to using only Visual-Guided Attention", but the row measures VLT's module)
and Tab. 5 #11 (ViT-DET's multi-scale features: the paper does not say how several scales
replace the single-scale F_v the rest of MARIS takes).

Interpretations (where the paper is silent or contradicts itself):
- Attention mask (Eq. 4): the text masks *irrelevant* pairs, the formula those with M >= tau; we
  follow the text (its stated purpose) and mask (-inf) pairs with sigmoid(Z_v Z_l^T) < tau, and
  padded words; a pixel (or word) with every pair masked attends to nothing (zeros, not NaN), as
  a softmax over nothing is undefined. tau (only in the unavailable supplementary) is 0.5, where
  the sigmoid relevance says "more relevant than not".
- Language-Guided Attention (Eq. 5, "A^T"): the softmax of the same masked affinity along the
  pixel axis, not the transpose of A, because the text says this branch "weights different image
  regions for each word"; `a_transpose="literal"` uses A transposed, as Eq. 5 writes it. Eq. 3
  has no 1/sqrt(D), nor do we.
- Width D = 256 from Feature Enhancement's MLPs onward, a departure: the paper keeps SAM's width
  C throughout (F_v in R^{HxWxC}, W_v C x C, W_l C' x C, F_lav, F_val and F_m with C channels:
  1280 for ViT-H); we take the width SAM's own mask decoder uses on these same features, as C
  would run 1280-channel attention over 4096 pixel tokens in every decoder layer
  (`--set dim=1280` builds the paper's widths for ViT-H).
- Feature Enhancement: each MLP of Eq. 1-2 is two linear layers with GELU (width D), the
  smallest MLP; CBA is a 3x3 conv (2D -> D), BatchNorm and GELU, as the paper says.
- Mask Decoder: 2 blocks (not given), each exactly Eq. 6-8 (attention plus residual, no norms or
  FFNs, none being mentioned), 8 heads; no new position embedding: the visual tokens carry SAM's.
- Upsampling ("two sequential blocks, each a convolutional layer and an upsample operation"):
  3x3 conv + BatchNorm + GELU then 2x bilinear, widths D/4 and D/8 (64, 32) as SAM's decoder
  upscales, kept at 64 and 32 in the tiny config so the mask head is not starved; the query MLP
  (2 layers) outputs 32; the mask (4h x 4w) is resized bilinearly to the input.
- Text encoder ("a text encoder pretrained by CLIP"): CLIP ViT-B/16's per-token features after
  the final LayerNorm, before the projection, the CLIP of CRIS-era RIS work, built as
  `ViT-B-16-quickgelu` because OpenAI trained it with QuickGELU (an open_clip GELU checkpoint
  needs `--set clip_arch=ViT-B-16`); sentences are cut at 20 tokens, well above RefCOCO's average.
- Words: CLIP's start- and end-of-text tokens are real tokens of F_l, so they count as words
  everywhere (the L of Eq. 3-5, F_val's rows, F_c of Eq. 7); the paper's F_l is the text
  encoder's output, L_t tokens long, and CLIP's end token is the one that carries the sentence.
- Padding: SAM pads the image bottom-right with zeros (after normalisation) and ignores the
  padding mask; so do we, to see the features SAM was trained to give.
- Freezing: the paper freezes both encoders, so the `paper` configs do whatever weights are given
  (train.py refuses them without weight files unless `--random-init`); other configs freeze an
  encoder iff its weights are given, as a frozen random encoder carries no information.
- Training recipe (deferred to the supplementary, so every value is ours, a common
  transformer-decoder recipe): AdamW, lr 1e-4, weight decay 1e-2, 5% warm-up then polynomial
  decay (power 0.9), 50 epochs, batch 32; focal alpha 0.25, gamma 2; loss weights 1 (Eq. 9 adds
  the two terms). The paper configs add nothing the paper does not state: no gradient clipping,
  no augmentation (so `--cache-features` runs them as they are). Only the tiny config, trained
  from scratch, clips gradients at norm 1.0 and flips images horizontally with "left"/"right"
  swapped so that position words stay true (`clip_grad`, `hflip`); `best.pt` is the
  best-val-mIoU epoch, so its val numbers are optimistic (report the test splits, or `last.pt`).
- "w/o FE" (Tab. 2, 5 #1) and "w/o MA" (Tab. 2 #2): one linear layer stands in for the removed
  module, the least that brings the remaining feature to width D: F_v = F_v3 W (C -> D), and
  F_lav = F_v, F_val = F_l W (C' -> D, W_l of Eq. 3 without any attention).
- "w/o DE" (Tab. 2 #3, "we use the SAM's decoder"): segment-anything's MaskDecoder and
  TwoWayTransformer as SAM builds them (depth 2, MLP 8 x width, 4 mask tokens, IoU head) at
  width D, randomly initialised like ours; F_lav is its image embedding with SAM's random Fourier
  position encoding, F_val's real words its sparse prompt tokens ("prompt tokens containing
  output tokens and linguistic features"), no dense prompt (zeros), one sample at a time (SAM
  repeats the image per prompt set), its single-mask output (mask token 0) the mask. The IoU
  head and the other three hypernetwork MLPs never reach the loss: frozen, so every trainable
  parameter gets a gradient (DDP requires it).
- "w/ TOI-A" (Tab. 4 #9, SAM's token-to-image attention "into each block of our decoder"): after
  Eq. 7, F_c = MHCA(F_c, F_lav, F_lav) + F_c, where SAM's block has it (after the token
  self-attention, before the image-to-token attention), an MHCA like the block's others.
- "w/o ELP" (Tab. 4 #10, "similar to VLT, we multiply F_val with F_lav to obtain the input
  feature of the Mask Decoder"): F_lav times F_val averaged over the real words (elementwise: it
  keeps F_lav's N x D shape with no new weights), and F_c = [F_m] alone: the decoder sees no
  words, and F_m, attending only to itself in Eq. 7, turns the query into a learned constant
  (the same F̂_m for every sample): the sentence reaches the mask only through F_lav.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import Tensor, nn

from common import optim
from common.encoders import CLIPTextEncoder, SAMImageEncoder
from common.layers import MLP, Attention, masked_mean, safe_softmax
from common.losses import dice_loss, sigmoid_focal_loss
from common.model import CacheableEncoders, InputSpec, RISModel, check_choices, freeze_encoders
from common.tokenizers import ClipTokenizer


@dataclass(frozen=True)
class MARISConfig:
    sam_arch: str = "vit_h"  # "SAM uses a ViT-H" (Sec. Image Encoder)
    image_size: int = 1024  # SAM's input, longest side, padded square (Sec. Image Encoder)
    global_blocks: tuple[int, ...] = (1, 2, 3)  # 2nd-4th global-attention blocks -> F_v1..F_v3
    clip_arch: str = "ViT-B-16-quickgelu"  # OpenAI's CLIP ViT-B/16 (not said; see Interpretations)
    max_tokens: int = 20  # CLIP tokens incl. SOT/EOT (not given; RefCOCO sentences avg. 3.6 words)
    dim: int = 256  # D, width after Feature Enhancement: a departure, the paper keeps SAM's C
    # (1280 for ViT-H) throughout (see Interpretations)
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
    clip_grad: float = 0.0  # max gradient norm, 0 = none: the paper clips nothing (tiny: 1.0)
    hflip: bool = False  # training flips: the paper has none (tiny: "left"/"right" swapped)
    # ablations (Tab. 2-5; defaults = the full model, "Ours" #4; see ABLATIONS, Interpretations)
    feature_enhancement: bool = True  # Eq. 1-2; False: "w/o FE", F_v3 alone (Tab. 2, 5 #1)
    mutual_aware_attention: bool = True  # Eq. 3-5; False: "w/o MA" (Tab. 2 #2)
    # tau = 0 keeps every pair (sigmoid >= 0): "w/o attn. mask" (Tab. 3 #8)
    a_transpose: str = "pixel_softmax"  # "A^T" of Eq. 5: "pixel_softmax" | "literal"
    mask_decoder: str = "maris"  # "maris" (Eq. 6-8) | "sam": SAM's decoder, "w/o DE" (Tab. 2 #3)
    toi_attention: bool = False  # True: SAM's token-to-image attn. in each block (Tab. 4 #9)
    explicit_linguistic_guidance: bool = True  # F_val in the decoder; False: "w/o ELP" (Tab. 4 #10)


# The encoder files each paper config starts from (train.py refuses to start without them,
# unless --random-init)
PAPER_WEIGHTS = {
    "paper": {"image_weights": "SAM ViT-H, sam_vit_h_4b8939.pth (segment-anything)",
              "text_weights": "OpenAI CLIP ViT-B/16, ViT-B-16.pt (QuickGELU)"},
    "paper-vit-b": {"image_weights": "SAM ViT-B, sam_vit_b_01ec64.pth (segment-anything)",
                    "text_weights": "OpenAI CLIP ViT-B/16, ViT-B-16.pt (QuickGELU)"},
}

CONFIGS = {
    "paper": MARISConfig(freeze_encoders=True),
    # ours, not in the paper (which uses ViT-H only): SAM ViT-B, same recipe, a smaller encoder
    "paper-vit-b": MARISConfig(sam_arch="vit_b", freeze_encoders=True),
    # CPU-sized, trained from scratch on the synthetic data: 96 px, "tiny" SAM (12x12 tokens) and
    # CLIP, D = 64; tau 0.1, as random relevances at tau 0.5 would mask half the pairs at step 0;
    # gradient clipping and flips, as a from-scratch run needs (see Interpretations)
    "tiny": MARISConfig(sam_arch="tiny", image_size=96, clip_arch="tiny", dim=64, heads=4, tau=0.1,
                        lr=1e-3, warmup=0.03, epochs=11, batch_size=16, clip_grad=1.0,
                        hflip=True),
}

# Tab. 2-5 rows built here -> config overrides (train.py --set) on any config; see the docstring
ABLATIONS: dict[str, dict[str, object]] = {
    "w/o FE": {"feature_enhancement": False},  # Tab. 2 #1 = Tab. 5 #1
    "w/o MA": {"mutual_aware_attention": False},  # Tab. 2 #2
    "w/o DE": {"mask_decoder": "sam"},  # Tab. 2 #3: SAM's decoder
    "w/o attn. mask": {"tau": 0.0},  # Tab. 3 #8
    "w/ TOI-A": {"toi_attention": True},  # Tab. 4 #9
    "w/o ELP": {"explicit_linguistic_guidance": False},  # Tab. 4 #10
    "Ours": {},  # #4, every table's reference row: the full model
}


class FeatureEnhancement(nn.Module):
    """Feature Enhancement (Sec. Feature Enhancement, Eq. 1-2): shallow + middle, then + deep."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        mlp = lambda d: MLP(d, dim, dim, num_layers=2, act=nn.GELU)
        cba = lambda: nn.Sequential(nn.Conv2d(2 * dim, dim, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(dim), nn.GELU())
        self.mlp_v1, self.mlp_v2, self.mlp_v3 = mlp(in_dim), mlp(in_dim), mlp(in_dim)  # on F_vi
        self.mlp_hat = mlp(dim)  # on F^ (Eq. 2)
        self.cba1, self.cba2 = cba(), cba()

    def forward(self, f_v1: Tensor, f_v2: Tensor, f_v3: Tensor) -> Tensor:
        """F_v1, F_v2, F_v3 (B, h, w, C), channels last as SAM gives them -> F_v (B, D, h, w)."""
        to_map = lambda x: x.permute(0, 3, 1, 2)  # MLPs act channels last, CBA on (B, D, h, w)
        # Eq. (1): F^ = CBA([MLP(F_v1), MLP(F_v2)]), the early enhanced feature
        f_hat = self.cba1(torch.cat([to_map(self.mlp_v1(f_v1)), to_map(self.mlp_v2(f_v2))], 1))
        f_hat_mlp = self.mlp_hat(f_hat.permute(0, 2, 3, 1))  # MLP(F^) (B, h, w, D)
        # Eq. (2): F_v = CBA([MLP(F^), MLP(F_v3)])
        return self.cba2(torch.cat([to_map(f_hat_mlp), to_map(self.mlp_v3(f_v3))], 1))


class MutualAwareAttention(nn.Module):
    """Mutual-Aware Attention block (Sec. Mutual-Aware Attention, Eq. 3-5, Fig. 4)."""

    def __init__(self, vis_dim: int, text_dim: int, dim: int, tau: float,
                 a_transpose: str = "pixel_softmax"):
        super().__init__()
        if a_transpose not in ("pixel_softmax", "literal"):
            raise ValueError(f'a_transpose={a_transpose!r}: "pixel_softmax" or "literal"')
        self.w_v = nn.Linear(vis_dim, dim, bias=False)  # W_v
        self.w_l = nn.Linear(text_dim, dim, bias=False)  # W_l
        self.norm_v, self.norm_l = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tau, self.a_transpose = tau, a_transpose

    def forward(self, f_v: Tensor, f_l: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """F_v (B, N, C_v), F_l (B, L, C_l), text_mask (B, L) -> F_lav (B, N, D), F_val (B, L, D),
        A (B, N, L)."""
        z_v, z_l = self.w_v(f_v), self.w_l(f_l)  # Eq. (3): Z_v (B, N, D), Z_l (B, L, D)
        affinity = torch.einsum("bnd,bld->bnl", z_v, z_l)  # Z_v Z_l^T (B, N, L)
        # Eq. (4): mask pairs whose relevance sigmoid(Z_v Z_l^T) is below tau, and padded words
        keep = (torch.sigmoid(affinity) >= self.tau) & text_mask[:, None, :]
        logits = affinity.masked_fill(~keep, float("-inf"))  # Z_v Z_l^T + M
        attn = safe_softmax(logits, dim=2)  # A: each pixel's weights over words (B, N, L), Fig. 4a
        # "A^T": each word's weights over pixels, a softmax over pixels (Fig. 4b); "literal":
        # A's weights transposed, as Eq. (5) writes it
        attn_t = attn if self.a_transpose == "literal" else safe_softmax(logits, dim=1)
        # Eq. (5): F_lav = LN(A Z_l + Z_v), F_val = LN(A^T Z_v + Z_l)
        f_lav = self.norm_v(torch.einsum("bnl,bld->bnd", attn, z_l) + z_v)  # (B, N, D)
        f_val = self.norm_l(torch.einsum("bnl,bnd->bld", attn_t, z_v) + z_l)  # (B, L, D)
        return f_lav, f_val, attn


class DecoderBlock(nn.Module):
    """One Mask Decoder block (Sec. Mask Decoder, Eq. 6-8)."""

    def __init__(self, dim: int, heads: int, toi_attention: bool = False):
        super().__init__()
        self.self_attn_v = Attention(dim, heads)  # MHSA of Eq. (6)
        self.self_attn_c = Attention(dim, heads)  # MHSA of Eq. (7)
        self.cross_attn = Attention(dim, heads)  # MHCA of Eq. (8)
        # "w/ TOI-A" (Tab. 4 #9): SAM's token-to-image attention, tokens reading the pixels
        self.token_to_image = Attention(dim, heads) if toi_attention else None

    def forward(self, f_lav: Tensor, f_c: Tensor, c_mask: Tensor) -> tuple[Tensor, Tensor]:
        """F_lav (B, N, D), F_c = [F_m, F_val] (B, 1 + L, D), c_mask (B, 1 + L) True on real
        tokens -> the evolved F̄_lav (B, N, D) and F̂_c (B, 1 + L, D), the next block's inputs."""
        f_lav = self.self_attn_v(f_lav, f_lav, f_lav) + f_lav  # Eq. (6): F̂_lav
        f_c = self.self_attn_c(f_c, f_c, f_c, key_mask=c_mask) + f_c  # Eq. (7): F̂_c
        if self.token_to_image is not None:  # TOI-A, where SAM's block has it
            f_c = self.token_to_image(f_c, f_lav, f_lav) + f_c
        f_lav = self.cross_attn(f_lav, f_c, f_c, key_mask=c_mask) + f_lav  # Eq. (8): F̄_lav
        return f_lav, f_c


class SAMDecoder(nn.Module):
    """SAM's own mask decoder in place of the proposed one: "w/o DE" (Tab. 2 #3)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        # segment-anything's MaskDecoder as build_sam.py builds it, at width D
        self.decoder = MaskDecoder(
            transformer_dim=dim, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=8 * dim,
                                          num_heads=heads))
        self.pe = PositionEmbeddingRandom(dim // 2)  # SAM's image position encoding (a buffer)
        # only the single-mask output (mask token 0) reaches the loss (Interpretations)
        mlps = self.decoder.output_hypernetworks_mlps
        for unused in (self.decoder.iou_prediction_head, *mlps[1:]):
            unused.requires_grad_(False)

    def forward(self, f_lav: Tensor, f_val: Tensor, text_mask: Tensor, h: int, w: int) -> Tensor:
        """F_lav (B, N, D), F_val (B, L, D), text_mask (B, L) -> mask logits (B, 1, 4h, 4w)."""
        image = f_lav.transpose(1, 2).unflatten(2, (h, w))  # image embedding (B, D, h, w)
        image_pe = self.pe((h, w))[None]  # (1, D, h, w)
        no_mask = image.new_zeros(1, image.shape[1], 1, 1)  # dense prompt: no mask input
        # one sample at a time: SAM's decoder repeats the image for each prompt set, and its
        # attention has no key mask, so only the real words are given as prompt tokens
        masks = [self.decoder(image_embeddings=image[b:b + 1], image_pe=image_pe,
                              sparse_prompt_embeddings=f_val[b:b + 1, text_mask[b]],
                              dense_prompt_embeddings=no_mask, multimask_output=False)[0]
                 for b in range(image.shape[0])]
        return torch.cat(masks)


class MARIS(RISModel, CacheableEncoders):
    """MARIS (Fig. 3). forward(image, text, text_mask, target=None) -> dict.

    Arguments:
      image (B, 3, H, W) normalised with SAM's statistics, H = W = cfg.image_size (None when
        image_feats are given);
      text (B, L) CLIP token ids; text_mask (B, L) True on real tokens;
      target (B, 1, H, W) in {0, 1}, optional: adds the loss (Eq. 9);
      image_feats / text_feats: precomputed encode_image / encode_text outputs (common.cache).
    Returns: mask_logits (B, 1, H, W), attn (B, h*w, L) (A of Eq. 3, the last block's; none
      without MA), and with a target: loss, loss_focal, loss_dice.
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
        freeze_encoders("MARIS", {"image": (self.image_encoder, cfg.image_weights),
                                  "text": (self.text_encoder, cfg.text_weights)},
                        cfg.freeze_encoders)
        check_choices(cfg, {"mask_decoder": ("maris", "sam")})
        if cfg.mask_decoder == "sam" and (cfg.toi_attention
                                          or not cfg.explicit_linguistic_guidance):
            raise ValueError("toi_attention / explicit_linguistic_guidance change the proposed "
                             'decoder (Tab. 4): they need mask_decoder="maris"')
        D, C, C_l = cfg.dim, self.image_encoder.dim, self.text_encoder.out_dim
        if cfg.feature_enhancement:
            self.enhance = FeatureEnhancement(C, D)
        else:  # "w/o FE": the deep feature alone, brought to D
            self.project_v3 = nn.Linear(C, D)
        if cfg.mutual_aware_attention:
            text_dims = [C_l] + [D] * (cfg.num_ma_blocks - 1)
            self.mutual = nn.ModuleList(MutualAwareAttention(D, t, D, cfg.tau, cfg.a_transpose)
                                        for t in text_dims)
        else:  # "w/o MA": the words brought to D, no attention
            self.project_l = nn.Linear(C_l, D)
        if cfg.mask_decoder == "sam":  # "w/o DE"
            self.sam_decoder = SAMDecoder(D, cfg.heads)
            return
        self.query = nn.Parameter(torch.randn(1, 1, D) * 0.02)  # F_m, random initialisation
        self.decoder = nn.ModuleList(DecoderBlock(D, cfg.heads, cfg.toi_attention)
                                     for _ in range(cfg.num_decoder_blocks))
        up = lambda a, b: nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(b), nn.GELU(),
                                        nn.Upsample(scale_factor=2, mode="bilinear"))
        u1, u2 = cfg.up_dims
        self.upsample = nn.Sequential(up(D, u1), up(u1, u2))
        self.query_mlp = MLP(D, D, u2, num_layers=2)

    def encode_image(self, image: Tensor) -> dict[str, Tensor]:
        """F_v1, F_v2, F_v3 (B, h, w, C): SAM's 2nd-4th global-attention blocks."""
        f_v1, f_v2, f_v3 = self.image_encoder(image)
        return {"f_v1": f_v1, "f_v2": f_v2, "f_v3": f_v3}

    def encode_text(self, text: Tensor, text_mask: Tensor) -> dict[str, Tensor]:
        """F_l (B, L, C'): CLIP's per-token features."""
        return {"f_l": self.text_encoder(text, text_mask)[0]}

    def forward(self, image: Tensor | None, text: Tensor, text_mask: Tensor,
                image_mask: Tensor | None = None,
                target: Tensor | None = None, image_feats: dict[str, Tensor] | None = None,
                text_feats: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        H = W = self.cfg.image_size  # SAM's square canvas (image may be None: cached features)
        # 1. frozen encoders (or their cached features): F_v1, F_v2, F_v3 (B, h, w, C), F_l
        image_feats, text_feats = self.encoded(image, text, text_mask, image_feats, text_feats)
        f_l = text_feats["f_l"]  # (B, L, C')
        # 2. Feature Enhancement (Eq. 1-2): F_v (B, D, h, w)
        if self.cfg.feature_enhancement:
            f_v = self.enhance(image_feats["f_v1"], image_feats["f_v2"], image_feats["f_v3"])
        else:  # "w/o FE" (Tab. 2, 5 #1): F_v3 W
            f_v = self.project_v3(image_feats["f_v3"]).permute(0, 3, 1, 2)
        h, w = f_v.shape[-2:]
        # 3. Mutual-Aware Attention blocks (Eq. 3-5), each on the previous block's F_lav, F_val
        vis, words = f_v.flatten(2).transpose(1, 2), f_l  # F_v (B, N, D), F_l (B, L, C')
        if self.cfg.mutual_aware_attention:
            for block in self.mutual:
                vis, words, attn = block(vis, words, text_mask)
        else:  # "w/o MA" (Tab. 2 #2): F_lav = F_v, F_val = F_l W
            words, attn = self.project_l(words), None
        f_lav, f_val = vis, words  # (B, N, D), (B, L, D); attn: A (B, N, L) of the last block
        # 4.-5. Mask Decoder (Eq. 6-8), or SAM's for "w/o DE" (Tab. 2 #3): (B, 1, 4h, 4w)
        decode = self.sam_decoder if self.cfg.mask_decoder == "sam" else self.decode
        logits = decode(f_lav, f_val, text_mask, h, w)
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        out = {"mask_logits": logits}
        if attn is not None:
            out["attn"] = attn
        if target is not None:  # Eq. (9): L = L_focal + L_dice
            out["loss_focal"] = sigmoid_focal_loss(logits, target)
            out["loss_dice"] = dice_loss(logits, target)
            out["loss"] = out["loss_focal"] + out["loss_dice"]
        return out

    def decode(self, f_lav: Tensor, f_val: Tensor, text_mask: Tensor, h: int, w: int) -> Tensor:
        """The proposed Mask Decoder (Sec. Mask Decoder): F_lav (B, N, D), F_val (B, L, D),
        text_mask (B, L) -> mask logits (B, 1, 4h, 4w)."""
        B = f_lav.shape[0]
        query = self.query.expand(B, -1, -1)  # F_m (B, 1, D), never padding
        if self.cfg.explicit_linguistic_guidance:  # 4. F_c = [F_m, F_val] (Eq. 7)
            f_c = torch.cat([query, f_val], 1)  # (B, 1 + L, D)
            c_mask = torch.cat([text_mask.new_ones(B, 1), text_mask], 1)  # (B, 1 + L)
        else:  # "w/o ELP" (Tab. 4 #10): F_val multiplied into F_lav, as VLT; F_c = [F_m]
            f_lav = f_lav * masked_mean(f_val, text_mask)[:, None]  # (B, N, D)
            f_c, c_mask = query, text_mask.new_ones(B, 1)
        for block in self.decoder:  # Eq. (6)-(8)
            f_lav, f_c = block(f_lav, f_c, c_mask)
        # 5. upsample F̄_lav (two conv + 2x blocks), dot with MLP(F̂_m) (Sec. Mask Decoder, end)
        vis = self.upsample(f_lav.transpose(1, 2).unflatten(2, (h, w)))  # (B, u2, 4h, 4w)
        query = self.query_mlp(f_c[:, 0])  # MLP(F̂_m) (B, u2)
        return torch.einsum("bc,bchw->bhw", query, vis)[:, None]  # (B, 1, 4h, 4w)

    def configure_optimizers(self, lr: float, total_steps: int):
        """AdamW with warm-up and polynomial decay (our recipe: see Interpretations)."""
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=lr,
                                weight_decay=self.cfg.weight_decay, fused=True)
        return opt, optim.poly(opt, total_steps, power=0.9, warmup=self.cfg.warmup)

    def vis_panels(self, out: dict[str, Tensor], i: int) -> list[tuple[str, Tensor]]:
        """Vision-Guided Attention, as Fig. 5(a): each pixel's weight (A) on its top word."""
        if "attn" not in out:  # "w/o MA": there is no A
            return []
        attn = out["attn"][i]  # A (N, L)
        side = int(attn.shape[0] ** 0.5)
        return [("vision-guided (Fig. 5a): max over words", attn.max(1).values.reshape(side, -1))]


MODEL = MARIS
