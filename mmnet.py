"""MMNet: Multi-Mask Network for Referring Image Segmentation.
Yan, Wang, He, Liu. arXiv:2305.14969 (2023).

CLIP encodes the image (stage features x2, x3; from the attention pool the spatial z and the
global z_bar, Eq. 1) and the sentence (word features F_t, EOS feature F_tg). A Fusion Neck
multiplies the deepest visual level with F_tg and aggregates three levels (Eq. 2-5). A
Multi-Query Generator turns dense visual features and words fused with the global visual feature
into N_q queries, each a different attention over the words (Eq. 6-10). A Vision-Language
Decoder lets the visual features attend to the queries (Eq. 11-13). Each query gives its own mask
by a dynamic 3x3 convolution (Eq. 14), a Multi-Query Estimator scores the queries (Eq. 15), and
the prediction is the score-weighted sum of the masks' probabilities (Eq. 16). Loss: BCE.

Shapes: B batch, C model width (512), C_p = C/2, D CLIP embedding width, h w the x3 grid
(H/16 for a ResNet, H/patch for a ViT), N = h*w, Q = N_q queries, L words, H W input size.

Ablations (Sec. 4.4, Tables 2-4; rows in ABLATIONS): N_q (Table 2); w/o MMP (Table 3), the
S_q-weighted sum of the queries goes through the projector as one query (the decoder still sees
all N_q), as the paper "still generated multiple queries but only obtained one mask"; w/o MQE
(Table 4), the masks count alike ("directly adding multiple masks without any scores"); w/o f_vg
(Table 4), Eq. (8) and F_vg are not built and F_t (width C_t) replaces F_tv in Eq. (9-10). Not
built: w/o MMP with w/o MQE, because the paper weights the queries only by the estimator. With
Eq. (16) on probabilities (the default) every row is another function of the same weights: a
mixture of sigmoids is neither the sigmoid of the mixed query nor the plain mean.

Interpretations (where the paper is silent or contradicts itself):
- sigma(F W) and Conv follow CRIS's code, because MMNet's neck (Eq. 2-5) is written in CRIS's
  notation on CRIS's stage features (Sec. 3.1: x2, x3 "similar to CRIS"): on a map sigma(F W)
  is a 1x1 conv + BN + ReLU (Eq. 2-3, 6), Conv a 1x1 (Eq. 4) or 3x3 (Eq. 5, Eq. 14's F_p) conv +
  BN + ReLU, and Eq. 7's "three convolution layers" are that 3x3 Conv twice and a 1x1 conv to N_q.
- Eq. (6) is the neck's own steps with new weights and no product with F_tg, as Sec. 3.2 says
  ("very similar to those in Fusion Neck ... we do not use element-wise multiplication with
  global textual feature"): FusionNeck without `text_dim`.
- sigma(F W) on tokens (Eq. 8-10) is a linear layer + ReLU: BatchNorm would mix padded words in.
- Eq. 2's F_m4 is the product of the two ReLUs, upsampled, nothing more, as the equation writes.
- The widths of F_v2, F_v3, F_v4, F_vg are all C, the one width the paper names; Up(.) is
  bilinear to the x3 grid, so that an odd grid still lines up.
- ViT encoder (the ResNet stages' counterparts): x2, x3 are the patch tokens after the blocks at
  1/3 and 2/3 of the depth, z the last block's through CLIP's ln_post and projection, z_bar the
  class token; the x3 grid is H/patch, its only grid (ViT-L-14 at 480: 34 x 34, 4 pixels unused).
- A ViT's "strides" are synthetic, so that the neck runs as on the ResNet ("use three convolution
  to obtain the three features ... After that, the operation is the same as ResNet"): F_v2, F_v3
  are 1x1 projections at the patch grid, F_v2 repeated 2x, which the neck's 2x2 Avg undoes
  exactly; F_v4 is a 2x2 stride-2 conv, a real downsampling as the ResNet's z is.
- F_tg ("linearly transformed") goes through CLIP's text projection (width D), the linear map
  CLIP trained for it; F_t are the token features after CLIP's final LayerNorm.
- Eq. 9's W_vd reads a flattened map (N values), so the model is built for one `image_size`.
- Eq. 9 has no 1/sqrt(C), as written; padded words get -inf.
- Initialisation (the paper gives none): the token maps of Eq. 8-10 (W_t, W_vg, W_vd, W_a,
  W_tv) are He-initialised with zero bias, the standard for a linear layer before a ReLU. With
  PyTorch's default (a sixth of the He variance, and in W_vd a bias shared by all queries) Eq. 9's
  logits start nearly equal over the words, every A_n nearly uniform, every F_qn nearly the same
  word average and the N_q masks nearly one mask, where the design wants queries "each
  corresponding to a different interpretation" (Sec. 3.2); the training signal to tell them apart
  then starts near zero. The raw cosine of two queries stays high under any init: Eq. 10 mixes
  ReLU outputs, all >= 0.
- Decoder: 3 pre-norm layers (as Eq. 11-13; the paper gives no number), a final LayerNorm and
  dropout 0.1, as in CRIS, the base; sine positional encodings (DETR, CRIS), 2-D on F_vt and 1-D
  over the query index on F_q, are added to queries and keys: attention alone is blind to position.
- The decoder does not update F_q (Eq. 11-13 update only F_vt): Eq. 14-15 use the generated F_q.
- Eq. 14 has two readings: F_pn = sigma(W_p F_qn) in the formula, "we use a linear layer to
  transform F_qn into F_pn" in the prose beside it (Sec. 3.4), as CRIS's projector, which MMNet's
  otherwise is (2x upsampling, a conv to C/2, a linear layer to 9 C_p + 1 values), has it. The
  prose is the default (`kernel_relu=False`): a ReLU'd bias is never negative, and with F_p's
  ReLU every mask logit would be >= 0 (with `kernel_relu=True`, F_p's Conv has no ReLU). The
  consequence: each mask is then linear in its query, so Eq. 16 on logits would make the N_q
  masks one mask of the S_q-weighted query (Table 3's "w/o MMP" exactly) and w/o MQE N_q times
  the mask of the mean query; the next bullet is what keeps the projector a component. The
  dynamic convolution has zero padding 1, to keep the grid.
- Eq. 15's self-attention layer keeps its residual (as Eq. 11), because without it every output
  is an average over all the queries, washing out what tells them apart.
- Eq. 16 has two readings: the sum of mask logits, or y = sum_n S_qn sigmoid(mask_n), a
  weighted sum of mask probabilities. The default is the second (`mix_probabilities`), because
  the paper's masks are predictions ("each mask represents a specific comprehension", scored by
  "the quality of the mask generated by this query"), y is "the final prediction mask"
  that the cross-entropy loss reads, and Table 3/4 report gaps that the first reading cannot
  give with Eq. 14's linear layer (bullet above): on probabilities, w/o MMP and w/o MQE differ
  from the full model whatever sigma is. y's logit is computed in log space and upsampled
  bilinearly to the input size; "cross-entropy loss" is BCE, because the mask is binary.
- w/o MQE on probabilities averages the masks (weights 1/N_q): "directly adding" N_q
  probabilities would leave [0, 1], which the cross-entropy needs; on logits it adds them.
- Encoders are fine-tuned at the same learning rate (`freeze_encoders` freezes them), because
  the paper says nothing else and CRIS fine-tunes CLIP.
- The text context is cut to the sentence length: with causal attention, padding changes nothing.
- Images are resized to a square, aspect not kept (Sec. 4.1: "resized to 480 x 480").
- Paper configs build `-quickgelu` towers, because the paper (and CRIS) loads OpenAI's CLIP,
  trained with QuickGELU; a GELU checkpoint needs the plain names (`--set image_arch=ViT-B-16`,
  and `text_arch`).
- Training loop: the paper configs clip nothing and flip nothing (Sec. 4.1 names neither); the
  tiny configs (ours) clip at norm 1 and flip with "left"/"right" swapped (`clip_grad`, `hflip`),
  as they train from scratch and a flip must keep a sentence true; `best.pt` is the best-val-mIoU
  epoch, so report the test splits or `last.pt`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import optim
from common.blocks import conv_bn_relu, dynamic_conv, linear_relu
from common.encoders import CLIPImageEncoder, CLIPTextEncoder
from common.layers import Attention, coord_map, feed_forward, safe_softmax, sine_pos_1d, sine_pos_2d
from common.losses import bce_loss
from common.model import InputSpec, RISModel, freeze
from common.tokenizers import ClipTokenizer


@dataclass(frozen=True)
class MMNetConfig:
    image_arch: str = "ViT-B-16-quickgelu"  # open_clip name; Table 1: ViT-B, ViT-L; Sec. 4.1: RN101
    text_arch: str = "ViT-B-16-quickgelu"  # the text tower of the same CLIP model (Sec. 3.1)
    image_size: int = 480  # "Input images are resized to 480 x 480" (Sec. 4.1)
    max_tokens: int = 17  # SOS/EOS included: 17 for RefCOCO(+), 22 for G-Ref (Sec. 4.1)
    dim: int = 512  # C: "the hidden layer size in all heads is set to 512" (Sec. 4.1)
    num_queries: int = 24  # N_q, best in Table 2, whose rows are N_q = 1, 2, 4, 8, 16, 24, 32
    heads: int = 8  # "Each Transformer block has 8 heads" (Sec. 4.1)
    ffn_dim: int = 2048  # "the feed-forward hidden dimension is set to 2048" (Sec. 4.1)
    decoder_layers: int = 3  # not given; CRIS, the base, uses 3
    dropout: float = 0.1  # not given; CRIS's decoder
    kernel_relu: bool = False  # Eq. (14)'s sigma on the dynamic kernel; Sec. 3.4: "a linear layer"
    mix_probabilities: bool = True  # Eq. (16) sums mask probabilities; False: logits (Interpr.)
    # Sec. 4.4's ablations (Tables 2-4; ABLATIONS lists the rows), the full model by default
    multi_mask_projector: bool = True  # MMP, Table 3: False = one mask from the S_q-weighted query
    query_estimator: bool = True  # MQE, Table 4: False = the masks added without any scores
    global_visual_feature: bool = True  # f_vg, Table 4: False = Eq. (8) removed, F_t used directly
    image_weights: str | None = None  # open_clip / OpenAI CLIP file for the image tower
    text_weights: str | None = None  # the same file (or another CLIP) for the text tower
    freeze_encoders: bool = False  # fine-tuned as CRIS; the paper is silent (Interpretations)
    # training recipe (Sec. 4.1): Adam, poly decay [3]; batch_size is the global batch
    lr: float = 1e-5
    power: float = 0.9  # DeepLab's polynomial power (ref. [3])
    warmup: float = 0.0  # no warm-up in the paper
    epochs: int = 100
    batch_size: int = 64
    clip_grad: float = 0.0  # max gradient norm, 0 = none: Sec. 4.1's recipe names no clipping
    hflip: bool = False  # flips ("left"/"right" swapped): Sec. 4.1 names no augmentation


# The encoder files each paper config starts from: train.py refuses to start a paper config
# without them (unless --random-init), so that "paper" never silently means "from scratch".
_CLIP = "OpenAI CLIP {}, {}.pt (QuickGELU); the same file for both towers"
PAPER_WEIGHTS = {config: dict.fromkeys(("image_weights", "text_weights"), _CLIP.format(*names))
                 for config, names in (("paper", ("ViT-B/16", "ViT-B-16")),
                                       ("paper-rn101", ("RN101", "RN101")),
                                       ("paper-vit-l", ("ViT-L/14", "ViT-L-14")),
                                       ("paper-rn50", ("RN50", "RN50")))}

CONFIGS = {
    "paper": MMNetConfig(),
    "paper-rn101": MMNetConfig(image_arch="RN101-quickgelu", text_arch="RN101-quickgelu"),
    "paper-vit-l": MMNetConfig(image_arch="ViT-L-14-quickgelu", text_arch="ViT-L-14-quickgelu"),
    # the ablation setting (Sec. 4.4): "we use ResNet50 as the vision backbone and the epoch is
    # set to 50", evaluated on RefCOCO+ testA; the text tower of the same CLIP (as Sec. 3.1)
    "paper-rn50": MMNetConfig(image_arch="RN50-quickgelu", text_arch="RN50-quickgelu", epochs=50),
    # CPU-sized, same code paths, trained from scratch on the synthetic data: a small CLIP ViT
    # (6 blocks, patch 8; its 16x16 position table resized to the 12x12 grid of 96 px, as the
    # paper's 224-px CLIP is for 480 px) and text tower, C = 64, 12 queries, 2 layers
    "tiny": MMNetConfig(image_arch="tiny", text_arch="tiny", image_size=96, dim=64, num_queries=12,
                        heads=4, ffn_dim=256, decoder_layers=2, dropout=0.0, lr=1e-3, warmup=0.03,
                        epochs=9, batch_size=16, clip_grad=1.0, hflip=True),
    # the ResNet path (attention pool, Eq. 1) at CPU size, for tests; not tuned to learn
    "tiny-rn": MMNetConfig(image_arch="tiny-rn", text_arch="tiny", image_size=128, dim=64,
                           num_queries=24, heads=4, ffn_dim=256, dropout=0.0, lr=1e-3,
                           warmup=0.03, epochs=8, batch_size=16, clip_grad=1.0, hflip=True),
}

# Sec. 4.4's ablation rows (Tables 2-4; the paper runs them on paper-rn50) as config overrides
# (`--set field=value`); Tables 3-4's full model is Table 2's N_q = 24 row, so their rows pin N_q.
ABLATIONS: dict[str, dict[str, object]] = {
    **{f"N_q={n}": {"num_queries": n} for n in (32, 24, 16, 8, 4, 2, 1)},  # Table 2
    **{f"N_q={n} w/o MMP": {"num_queries": n, "multi_mask_projector": False}
       for n in (24, 16, 8)},  # Table 3 (its rows with MMP are Table 2's)
    "w/o f_vg": {"num_queries": 24, "global_visual_feature": False},  # Table 4
    "w/o MQE": {"num_queries": 24, "query_estimator": False},
    "w/o f_vg, w/o MQE": {"num_queries": 24, "global_visual_feature": False,
                          "query_estimator": False},
}


class VisualProjection(nn.Module):
    """Sec. 3.1, Image Encoder: x2 -> F_v2, x3 -> F_v3, z -> F_v4, z_bar -> F_vg. A ViT's three
    maps share one patch grid: F_v2 is repeated to twice it and F_v4 learned at half of it, the
    ResNet's relative strides (see Interpretations); a ResNet's are 1x1 convs at its own grids."""

    def __init__(self, dims: dict[str, int], dim: int, vit: bool, global_feature: bool = True):
        super().__init__()
        self.v2, self.v3 = (nn.Conv2d(dims[k], dim, 1) for k in ("x2", "x3"))
        # ViT: half the patch grid by a learned 2x2 stride-2 conv, a real downsampling
        self.v4 = nn.Conv2d(dims["z"], dim, 2, stride=2) if vit else nn.Conv2d(dims["z"], dim, 1)
        self.vg = nn.Linear(dims["z"], dim) if global_feature else None  # none w/o f_vg (Table 4)
        self.vit = vit

    def forward(self, x2: Tensor, x3: Tensor, z: Tensor,
                z_bar: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        # ViT: x2, x3, z all (B, D, h, w) -> F_v2 (B, C, 2h, 2w), F_v3 (B, C, h, w),
        # F_v4 (B, C, h/2, w/2); ResNet: each at its own stage grid
        f_v2, f_v3, f_v4 = self.v2(x2), self.v3(x3), self.v4(z)
        if self.vit:  # repeated, no new information: the neck's 2x2 Avg gives back f_v2 exactly
            f_v2 = F.interpolate(f_v2, scale_factor=2, mode="nearest")
        f_vg = None if self.vg is None else self.vg(z_bar)  # F_vg (B, C)
        return f_v2, f_v3, f_v4, f_vg


class FusionNeck(nn.Module):
    """Fusion Neck (Sec. 3.1, Eq. 2-5) with `text_dim`; without it, the dense visual features of
    the Multi-Query Generator (Eq. 6), the same steps without the product with F_tg."""

    def __init__(self, dim: int, text_dim: int | None = None):
        super().__init__()
        self.w_v4 = conv_bn_relu(dim, dim)  # W_v4 (W'_v4)
        self.w_tg = linear_relu(text_dim, dim) if text_dim else None  # W_tg
        self.w_m4, self.w_v3 = conv_bn_relu(dim, dim), conv_bn_relu(dim, dim)  # W_m4, W_v3
        self.w_m3, self.w_v2 = conv_bn_relu(2 * dim, dim), conv_bn_relu(dim, dim)  # W_m3, W_v2
        self.aggregate = conv_bn_relu(5 * dim, dim)  # Conv of Eq. (4), 1x1
        self.coord_conv = conv_bn_relu(dim + 2, dim, 3)  # Conv of Eq. (5), 3x3

    def forward(self, f_v2: Tensor, f_v3: Tensor, f_v4: Tensor,
                f_tg: Tensor | None = None) -> Tensor:
        """F_v2 (B, C, 2h, 2w), F_v3 (B, C, h, w), F_v4 (B, C, h/2, w/2), F_tg (B, D_t) ->
        F_vt before Flatten (Eq. 5), or F'_v of Eq. (6) without F_tg, (B, C, h, w)."""
        B, _, h, w = f_v3.shape
        up = lambda x: F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        f_m4 = self.w_v4(f_v4)  # sigma(F_v4 W_v4) (B, C, h/2, w/2)
        if self.w_tg is not None:
            f_m4 = f_m4 * self.w_tg(f_tg)[:, :, None, None]  # Eq. (2): product with sigma(F_tg W)
        f_m4 = up(f_m4)  # (B, C, h, w)
        f_m3 = torch.cat([self.w_m4(f_m4), self.w_v3(f_v3)], 1)  # Eq. (3), (B, 2C, h, w)
        f_v2 = F.avg_pool2d(f_v2, 2, 2)  # F'_v2 = Avg(F_v2), (B, C, h, w)
        f_m2 = torch.cat([self.w_m3(f_m3), self.w_v2(f_v2)], 1)  # Eq. (3), (B, 2C, h, w)
        f_m = self.aggregate(torch.cat([f_m2, f_m3, f_m4], 1))  # Eq. (4), (B, C, h, w)
        coords = coord_map(B, h, w, device=f_m.device, dtype=f_m.dtype)  # F_coord (B, 2, h, w)
        return self.coord_conv(torch.cat([f_m, coords], 1))  # Eq. (5) before Flatten, (B, C, h, w)


class MultiQueryGenerator(nn.Module):
    """Multi-Query Generator (Sec. 3.2, Eq. 6-10): N_q word attentions, each a query. Without
    `global_visual` (Table 4, w/o f_vg) Eq. (8) is removed and Eq. (9-10) read F_t itself."""

    def __init__(self, dim: int, word_dim: int, num_queries: int, num_pixels: int,
                 global_visual: bool = True):
        super().__init__()
        self.dense = FusionNeck(dim)  # Eq. (6)
        self.to_queries = nn.Sequential(conv_bn_relu(dim, dim, 3), conv_bn_relu(dim, dim, 3),
                                        nn.Conv2d(dim, num_queries, 1))  # Eq. (7)
        self.global_visual = global_visual
        if global_visual:
            self.w_t, self.w_vg = linear_relu(word_dim, dim), linear_relu(dim, dim)  # Eq. (8)
        tv_dim = dim if global_visual else word_dim  # width of F_tv, or of F_t in its place
        self.w_vd, self.w_a = linear_relu(num_pixels, dim), linear_relu(tv_dim, dim)  # Eq. (9)
        self.w_tv = linear_relu(tv_dim, dim)  # Eq. (10)
        # He initialisation of the ReLU'd token maps (Interpretations): with PyTorch's default,
        # Eq. (9)'s logits start near zero, every word attention uniform, every query alike
        for name in ("w_t", "w_vg", "w_vd", "w_a", "w_tv"):
            if hasattr(self, name):
                nn.init.kaiming_normal_(getattr(self, name)[0].weight, nonlinearity="relu")
                nn.init.zeros_(getattr(self, name)[0].bias)

    def forward(self, f_v2: Tensor, f_v3: Tensor, f_v4: Tensor, f_vg: Tensor | None,
                words: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """F_v2, F_v3, F_v4 as in FusionNeck, F_vg (B, C) (None w/o f_vg), F_t (B, L, C_t),
        text_mask (B, L) -> F_q (B, Q, C) and the word attention a (B, Q, L) of Eq. (9)."""
        f_vd = self.to_queries(self.dense(f_v2, f_v3, f_v4)).flatten(2)  # Eq. (7): F_vd (B, Q, N)
        # Eq. (8): F_tv (B, L, C); w/o f_vg (Table 4) "we directly use textual features F_t"
        f_tv = self.w_t(words) * self.w_vg(f_vg)[:, None, :] if self.global_visual else words
        # Eq. (9): a_ni = sigma(f_vdn W_vd) sigma(f_tvi W_a)^T, softmax over the real words
        logits = torch.einsum("bqc,blc->bql", self.w_vd(f_vd), self.w_a(f_tv))  # (B, Q, L)
        attn = safe_softmax(logits.masked_fill(~text_mask[:, None, :], float("-inf")), dim=2)
        f_q = torch.einsum("bql,blc->bqc", attn, self.w_tv(f_tv))  # Eq. (10): F_q (B, Q, C)
        return f_q, attn


class DecoderLayer(nn.Module):
    """One Vision-Language Decoder layer (Sec. 3.3, Eq. 11-13), pre-norm."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout=dropout)  # MHA of Eq. (11-12)
        self.cross_attn = Attention(dim, heads, dropout=dropout)  # MHCA of Eq. (13)
        self.mlp = feed_forward(dim, ffn_dim, dropout)  # MLP of Eq. (13)
        self.drop = nn.Dropout(dropout)

    def forward(self, vis: Tensor, queries: Tensor, vis_pos: Tensor, query_pos: Tensor) -> Tensor:
        """F_vt (B, N, C), F_q (B, Q, C), positional encodings (N, C), (Q, C) -> F_s (B, N, C)."""
        v = self.norm1(vis)
        vis = vis + self.drop(self.self_attn(v + vis_pos, v + vis_pos, v))  # Eq. (11): F'_vt
        v = self.norm2(vis)
        vis = vis + self.drop(self.cross_attn(v + vis_pos, queries + query_pos, queries))  # F'_s
        return vis + self.drop(self.mlp(self.norm3(vis)))  # Eq. (13): F_s


class MultiMaskProjector(nn.Module):
    """Multi-Mask Projector (Sec. 3.4, Eq. 14): one dynamic 3x3 convolution per query."""

    def __init__(self, dim: int, kernel: int = 3, kernel_relu: bool = False):
        super().__init__()
        self.c_p, self.kernel, self.kernel_relu = dim // 2, kernel, kernel_relu  # C_p = C/2
        conv = [nn.Conv2d(dim, self.c_p, 3, padding=1, bias=False), nn.BatchNorm2d(self.c_p)]
        conv += [] if kernel_relu else [nn.ReLU()]
        self.vis = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), *conv,
                                 nn.Upsample(scale_factor=2, mode="bilinear"))  # Up(Conv(Up(.)))
        self.w_p = nn.Linear(dim, self.c_p * kernel * kernel + 1)  # W_p -> 9 C_p + 1 values

    def forward(self, f_s: Tensor, f_q: Tensor) -> Tensor:
        """F_s (B, C, h, w), F_q (B, Q, C) -> mask_n logits for every query (B, Q, 4h, 4w)."""
        f_p = self.vis(f_s)  # F_p (B, C_p, 4h, 4w)
        params = self.w_p(f_q)  # F_pn = W_p F_qn, (B, Q, 9 C_p + 1)
        if self.kernel_relu:
            params = F.relu(params)  # Eq. (14) literally: sigma(W_p F_qn)
        weight = params[..., :-1].unflatten(-1, (self.c_p, self.kernel, self.kernel))
        return dynamic_conv(f_p, weight, params[..., -1])  # mask_n for every n, (B, Q, 4h, 4w)


def mix_masks(masks: Tensor, weights: Tensor) -> Tensor:
    """Eq. (16) on probabilities: mask logits (B, Q, h, w) and weights (B, Q) summing to 1 ->
    the logit of y = sum_n S_qn sigmoid(mask_n), (B, 1, h, w). In log space, as
    log y - log(1 - y) with 1 - y = sum_n S_qn sigmoid(-mask_n), so it neither saturates nor
    divides by zero. In fp32 whatever the autocast dtype: in fp16 the clamp at its smallest
    normal (6e-5) would cap the weights' logs at -9.7."""
    masks, weights = masks.float(), weights.float()
    log_w = weights.clamp_min(torch.finfo(weights.dtype).tiny).log()[:, :, None, None]
    log_y = torch.logsumexp(log_w + F.logsigmoid(masks), dim=1)  # log y, (B, h, w)
    log_not_y = torch.logsumexp(log_w + F.logsigmoid(-masks), dim=1)  # log (1 - y)
    return (log_y - log_not_y)[:, None]


class MultiQueryEstimator(nn.Module):
    """Multi-Query Estimator (Sec. 3.4, Eq. 15): S_q = Softmax(W_s(MHSA(F_q))) over the queries."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = Attention(dim, heads)  # MHSA
        self.w_s = nn.Linear(dim, 1, bias=False)  # W_s; a bias, shared by all, the softmax drops

    def forward(self, f_q: Tensor) -> Tensor:
        """F_q (B, Q, C) -> S_q (B, Q), summing to 1 over the queries."""
        f_q = self.attn(f_q, f_q, f_q) + f_q  # MHSA layer with its residual (Interpretations)
        return torch.softmax(self.w_s(f_q)[..., 0], dim=1)  # (B, Q)


class MMNet(RISModel):
    """MMNet (Fig. 3). forward(image, text, text_mask, target=None) -> dict.

    Arguments:
      image (B, 3, H, W) normalised with CLIP's statistics, H = W = cfg.image_size;
      text (B, L) CLIP token ids with SOT/EOT; text_mask (B, L) True on real tokens;
      target (B, 1, H, W) in {0, 1}, optional: adds the loss.
    Returns: mask_logits (B, 1, H, W) the logit of Eq. 16's y, upsampled; query_masks
      (B, Q, 4h, 4w) mask logits of every query (Eq. 14; (B, 1, 4h, 4w) w/o MMP), query_scores
      (B, Q) (Eq. 15; all 1/N_q w/o MQE, all 1 with Eq. 16 on logits), word_attn (B, Q, L)
      (Eq. 9), and with a target: loss, loss_bce.
    """

    def __init__(self, cfg: MMNetConfig):
        super().__init__()
        self.cfg = cfg
        self.input_spec = InputSpec(cfg.image_size, "square", mean=CLIPImageEncoder.pixel_mean,
                                    std=CLIPImageEncoder.pixel_std)  # CLIP's statistics
        self.tokenizer = ClipTokenizer(cfg.max_tokens)
        self.image_encoder = CLIPImageEncoder(cfg.image_arch, cfg.image_weights)
        self.text_encoder = CLIPTextEncoder(cfg.text_arch, cfg.text_weights, project=True)
        if cfg.freeze_encoders:  # off by default: fine-tuned as CRIS (Interpretations)
            for name, enc, weights in (("image", self.image_encoder, cfg.image_weights),
                                       ("text", self.text_encoder, cfg.text_weights)):
                freeze(enc)
                if weights is None:
                    warnings.warn(f"MMNet: the {name} encoder is frozen with random weights",
                                  stacklevel=2)
        enc = self.image_encoder
        if not enc.is_vit and cfg.image_size % 32:
            raise ValueError(f"image_size {cfg.image_size}: a CLIP ResNet needs a multiple of 32")
        side = cfg.image_size // enc.x3_stride  # h = w of the x3 grid
        C = cfg.dim
        if not (cfg.multi_mask_projector or cfg.query_estimator):
            raise ValueError("MMNet without the Multi-Mask Projector weights the queries by the "
                             "Multi-Query Estimator's scores (Table 3): it needs query_estimator")
        self.project = VisualProjection(enc.dims, C, enc.is_vit, cfg.global_visual_feature)
        self.neck = FusionNeck(C, text_dim=self.text_encoder.out_dim)
        self.generator = MultiQueryGenerator(C, self.text_encoder.width, cfg.num_queries,
                                             num_pixels=side * side,
                                             global_visual=cfg.global_visual_feature)
        self.decoder = nn.ModuleList(DecoderLayer(C, cfg.heads, cfg.ffn_dim, cfg.dropout)
                                     for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(C)
        self.projector = MultiMaskProjector(C, kernel_relu=cfg.kernel_relu)
        self.estimator = MultiQueryEstimator(C, cfg.heads) if cfg.query_estimator else None

    def forward(self, image: Tensor, text: Tensor, text_mask: Tensor,
                image_mask: Tensor | None = None,
                target: Tensor | None = None) -> dict[str, Tensor]:
        B, _, H, W = image.shape
        # 1. CLIP encoders (Sec. 3.1): x2, x3 and [z_bar, z] = MHSA([mean(x4), x4]) (Eq. 1);
        #    word features F_t (B, L, C_t) and the EOS feature F_tg (B, D_t)
        x2, x3, _, z, z_bar = self.image_encoder(image)
        words, f_tg, _ = self.text_encoder(text, text_mask)
        f_v2, f_v3, f_v4, f_vg = self.project(x2, x3, z, z_bar)  # (B, C, 2h|h|h/2, ...), (B, C)
        # 2. Fusion Neck (Eq. 2-5): F_vt, visual features with the global textual feature
        f_vt = self.neck(f_v2, f_v3, f_v4, f_tg)  # (B, C, h, w)
        h, w = f_vt.shape[-2:]
        # 3. Multi-Query Generator (Eq. 6-10): F_q (B, Q, C)
        f_q, word_attn = self.generator(f_v2, f_v3, f_v4, f_vg, words, text_mask)
        # 4. Vision-Language Decoder (Eq. 11-13) with sine positional encodings: F_s (B, N, C)
        vis_pos = sine_pos_2d(h, w, f_vt.shape[1], device=image.device).to(f_vt.dtype)
        query_pos = sine_pos_1d(f_q.shape[1], f_q.shape[2], device=image.device).to(f_q.dtype)
        f_s = f_vt.flatten(2).transpose(1, 2)  # Flatten of Eq. (5): F_vt (B, N, C)
        for layer in self.decoder:
            f_s = layer(f_s, f_q, vis_pos, query_pos)
        f_s = self.decoder_norm(f_s).transpose(1, 2).unflatten(2, (h, w))  # (B, C, h, w)
        # 5. Multi-Query Estimator (Eq. 15); without it (Table 4) every mask counts the same:
        #    added, as probabilities averaged so that y stays one (Interpretations)
        Q, probs = f_q.shape[1], self.cfg.mix_probabilities
        scores = (self.estimator(f_q) if self.estimator is not None
                  else f_q.new_full(f_q.shape[:2], 1 / Q if probs else 1.0))  # S_q (B, Q)
        # 6. Multi-Mask Projector (Eq. 14), one mask per query, and their weighted sum (Eq. 16)
        if self.cfg.multi_mask_projector:
            masks = self.projector(f_s, f_q)  # (B, Q, 4h, 4w) logits
            if probs:  # y = sum_n S_qn sigmoid(mask_n), as its logit
                y = mix_masks(masks, scores)  # (B, 1, 4h, 4w)
            else:  # the logits summed
                y = torch.einsum("bq,bqhw->bhw", scores, masks)[:, None]  # (B, 1, 4h, 4w)
        else:  # Table 3 w/o MMP: the S_q-weighted sum of the queries, then a single mask
            f_q_bar = torch.einsum("bq,bqc->bc", scores, f_q)[:, None]  # (B, 1, C)
            y = masks = self.projector(f_s, f_q_bar)  # (B, 1, 4h, 4w)
        logits = F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False)
        out = {"mask_logits": logits, "query_masks": masks, "query_scores": scores,
               "word_attn": word_attn}
        if target is not None:
            out["loss_bce"] = out["loss"] = bce_loss(logits, target)  # "cross-entropy loss"
        return out

    def configure_optimizers(self, lr: float, total_steps: int):
        """Adam with polynomial decay (Sec. 4.1)."""
        opt = torch.optim.Adam(self.trainable_parameters(), lr=lr, fused=True)
        return opt, optim.poly(opt, total_steps, power=self.cfg.power, warmup=self.cfg.warmup)

    def vis_panels(self, out: dict[str, Tensor], i: int) -> list[tuple[str, Tensor]]:
        """Fig. 2, 5: each query's mask and score, best first, and their weighted sum (Eq. 16)."""
        scores, masks = out["query_scores"][i], out["query_masks"][i]  # (Q,), (Q, 4h, 4w)
        if not self.cfg.multi_mask_projector:  # Table 3, w/o MMP: one mask, nothing to weight
            return [("mask of the score-weighted query (w/o MMP)", masks[0].sigmoid())]
        panels = [(f"query {n}: score {scores[n]:.3f}", masks[n].sigmoid())
                  for n in scores.argsort(descending=True).tolist()]
        if self.cfg.mix_probabilities:  # Eq. (16) on probabilities
            weighted = torch.einsum("q,qhw->hw", scores, masks.sigmoid())
        else:
            weighted = torch.einsum("q,qhw->hw", scores, masks).sigmoid()
        name = "weighted sum" if self.estimator is not None else "sum (w/o MQE)"
        return panels + [(f"{name} of masks (Eq. 16)", weighted)]


MODEL = MMNet
