"""M3Dec: Multi-Modal Mutual Attention and Iterative Interaction for Referring Image Segmentation.
Liu, Ding, Zhang, Jiang. IEEE Transactions on Image Processing 32, 2023; arXiv:2305.15302.

A backbone gives F_vis, a language encoder word features F_t and a sentence feature F_t', and a
transformer encoder turns F_vis into F_enc. The Multi-Modal Mutual Decoder (M3Dec) queries F_enc
with the words: its Mutual Attention (M3Att, Eq. 1-2b) normalises one word-pixel attention matrix
along both axes, attends vision per word and language per pixel, and fuses the two; Iterative
Multi-modal Interaction (IMI, Eq. 3) re-injects language between the decoder's layers; Language
Feature Reconstruction (LFR, Eq. 4) has its output rebuild the language feature. A Mask Decoder
uses the output as 1x1 dynamic kernels over F_enc. Loss: BCE + 0.1 x reconstruction MSE (Eq. 5).

Shapes: B batch, C width (256), h w the stride-16 feature map, N = h*w, L words (tokens), H W input.

Ablations (Sec. IV-B): `ABLATIONS` maps each table row to overrides of `dec_layers`,
`shared_attention`, `attention`, `imi`, `lfr`, `mask_decoder`. Not built, as the paper gives too
little: Table III's "VLT [11]" Mask Decoder (it "utilizes only the output of the decoder", which
VLT builds with query generation and balance modules M3Dec has not) and a VAL-only transformer
("fails to converge"; no number).

Interpretations (where the paper is silent or contradicts itself):
- F_vis at stride 16 (VisualNeck), as in VLT (same authors and setting): the paper gives none.
- Images stretched to image_size x image_size in both settings, as LAVT's code does at 480 px;
  VLT's code, whose 416 px the CNN setting follows, letterboxes instead (aspect kept, centred on
  grey), which the paper's "resized to 416 x 416" does not mention.
- Text: a GRU as in Table IV (the text says LSTM), directions summed as in VLT's code; F_t' =
  the final states of both directions, as Sec. III says ("the final state output"; VLT's code
  instead pools the word states with a learned attention). BERT: F_t = its last layer, F_t' =
  [CLS], each by a linear layer to C (the usual way).
- GloVe vectors stay fixed (`freeze_word_vectors`), as Sec. IV-A has GloVe "generate" the
  embeddings and VLT's code reads them, fixed, from spaCy; words GloVe lacks start random and
  stay so (VLT: zeros). `tiny` has no GloVe, so it trains its word vectors.
- Swin-B: the paper names no checkpoint; `paper-swin` reads Microsoft's ImageNet-22K, window-12
  release (swin_base_patch4_window12_384_22k.pth), the one LAVT, whose 480 px setting the paper
  follows, trains from (its README). torchvision's ImageNet-1K window-7 swin_b is accepted with
  `image_encoder="swin_b"`. Stochastic depth 0.3 while training, LAVT's (common.encoders.swin).
- GRU words: those seen `vocab_min_count` (2) times in training, kept in the config so that a
  checkpoint tokenises as training did; rarer ones are <unk>, so that training sees it.
- BERT reads 20 tokens with [CLS] and [SEP], so that about 15 words (the paper's count) fit.
- Transformer encoder: DETR's post-norm layers (FFN 2048, dropout 0.1), the 2-D sine encoding
  added once to its input so that F_enc carries position into M3Att and the Mask Decoder.
- M3Att is single-head, as Eq. (1) scales by 1/sqrt(C) (the 8 heads are the other attentions');
  its output layer maps HW -> C, so it is built for one `image_size`.
- M3Dec layer (Fig. 3c): self-attention, M3Att, cross-attention (query F_q, key and value the
  multi-modal feature), FFN, each with residual and LayerNorm, as in a standard decoder layer.
- "BN and ReLU unless noted" (Sec. IV-A) where no activation is stated: F_vis's projection, M3Att's
  output, IMI's F_l^n, LFR's first two layers, the Mask Decoder's convs but the logits; attention,
  FFNs and Eq. (3)-(4) keep their own.
- Padded words enter no softmax (Eq. 2b, 3), mean (Eq. 4) or BN statistics: padding changes nothing.
- IMI (Eq. 3) as written: no 1/sqrt(C), softmax over F_l^n's words; w_ci starts at 1 (a plain sum).
- LFR (Eq. 4): e is the fixed sine encoding. F_proj is neither detached nor normalised, as
  written (`lfr_target="paper"`): W_proj trains by L_rec alone, and L_rec can also fall by
  shrinking F_proj together with F_rec (it is 0 when both are 0, which carries no language).
  `lfr_target` offers a stop-gradient ("detached": W_proj stays at its initialisation) or a
  unit-rms F_proj ("normalised"), neither in the paper.
- Mask Decoder (Fig. 6): the N_t maps zero-padded to `max_len` channels for a fixed first conv;
  three 2x bilinear upsamplings give stride 2, then a resize to H x W.
- The logits' bias starts at the log-odds of p = 0.05 (RetinaNet's prior), as a referred object
  covers a small part of the image.
- Table I's rows keep IMI and LFR, as its shared 3-layer row is "Ours" (67.88).
- Independent A_mut (Table I): Eq. (2b)'s from Sec. IV-B's "two extra linear project layers".
- Generic (LAV only, Tables I-II): the M3Dec layer without M3Att, F_enc the cross-attention's key
  and value ("word features serve as the query ... vision features serve as key and value").
- IMI* (Table II #3): F'_dec^n = BN(F_dec^n + w_ci F_t), as F_i^n is "replaced with F_t".
- Concate (Table III): F_dec summed over the words, tiled and concatenated to F_enc before the
  convs, the plainest reading of "sum and concatenate them with the transformer encoder output".
- Step decay x0.1 at 80% and 90% of the steps (VLT's epochs 40, 45 of 50); pretrained encoders at
  0.1x the lr (`encoder_lr_scale`), so that fine-tuning keeps what they learnt.
- The public yolov3.weights saw RefCOCO's val/test images (COCO train2014), unlike the paper's
  backbone, so numbers with them are optimistic.
- Ours, in `tiny` only (the paper configs have neither): gradient clipping (`clip_grad`) and
  flips with "left"/"right" swapped (`hflip`), as tiny trains from scratch and a flip must keep a
  sentence true. `best.pt` is the epoch of best val mIoU (the paper does not say), so its val
  numbers flatter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import optim
from common.blocks import conv_bn_relu
from common.encoders import Darknet53, SwinImageEncoder, bert_and_tokenizer, gru_and_tokenizer
from common.layers import (
    Attention,
    PostNormEncoderLayer,
    TokenBatchNorm,
    feed_forward,
    masked_mean,
    safe_softmax,
    sine_pos_1d,
    sine_pos_2d,
)
from common.losses import bce_loss, reconstruction_loss
from common.model import InputSpec, RISModel, check_choices, freeze
from common.tokenizers import SHAPES_VOCAB, build_word_vocab

IMAGE_ENCODERS = {"darknet53": (Darknet53, "darknet53"), "darknet-tiny": (Darknet53, "tiny"),
                  "swin_b-w12": (SwinImageEncoder, "swin_b_w12"),  # ImageNet-22K, window 12
                  "swin_b": (SwinImageEncoder, "swin_b"),  # torchvision's ImageNet-1K, window 7
                  "swin-tiny": (SwinImageEncoder, "tiny")}
BERT_ENCODERS = {"bert-base": "bert-base", "bert-tiny": "tiny"}  # text_encoder -> BERT arch
LFR_TARGETS = ("paper", "detached", "normalised")  # LFR's target F_proj, see M3DecConfig
# the values each config switch may take (M3Dec checks them)
CHOICES = {"image_encoder": tuple(IMAGE_ENCODERS), "text_encoder": ("gru", *BERT_ENCODERS),
           "attention": ("m3att", "generic"), "imi": ("iterative", "same", "off"),
           "mask_decoder": ("kernels", "concat"), "lfr_target": LFR_TARGETS}
FEATURE_STRIDE = 16  # F_vis, F_enc (see Interpretations)
FOREGROUND_PRIOR = 0.05  # initial mask probability (RetinaNet's prior initialisation)
RMS_EPS = 1e-6  # lfr_target="normalised": keeps an all-zero F_proj finite


@dataclass(frozen=True)
class M3DecConfig:
    image_encoder: str = "darknet53"  # Table IV: DN-53 (CNN) or Swin-B; see IMAGE_ENCODERS
    text_encoder: str = "gru"  # Table IV: GRU (CNN) or BERT; "gru" | "bert-base" | "bert-tiny"
    image_size: int = 416  # "416 x 416 for CNN backbone, 480 x 480 for Transformer" (Sec. IV-A)
    max_len: int = 15  # "padded to 15 words" (20 for G-Ref); BERT: tokens incl. [CLS], [SEP]
    word_dim: int = 300  # GloVe vectors (Sec. IV-A)
    vocab: tuple[str, ...] = ()  # GRU words, from the training split (prepare_config)
    vocab_min_count: int = 2  # rarer training words map to <unk> (not given)
    bert_vocab: str | None = None  # BERT's vocab.txt or its folder; prepare_config: text_weights
    dim: int = 256  # C "for the transformers" (Sec. IV-A)
    heads: int = 8  # "8 for all transformer layers" (Sec. IV-A)
    ffn_dim: int = 2048  # not given (DETR's)
    enc_layers: int = 2  # N_enc, "2 encoder layers" (Sec. IV-A)
    dec_layers: int = 3  # N_dec, Table I: 3 layers
    mask_dim: int = 512  # "512 for the mask decoder" (Sec. IV-A)
    # ablations (Sec. IV-B, Tables I-III; see ABLATIONS); each default is "Ours"
    shared_attention: bool = True  # Table I: shared (default) or independent A_mut
    attention: str = "m3att"  # Table I-II: "m3att" (M3Att) or "generic" (LAV only)
    imi: str = "iterative"  # Table II: "iterative" (IMI), "same" (IMI*: F_t each time), "off"
    lfr: bool = True  # Table II: False removes LFR and its loss L_rec
    # LFR's target F_proj (Eq. 4): "paper" as written (trained by L_rec; it can shrink, see
    # Interpretations), "detached" (stop-gradient: W_proj fixed at its initialisation) or
    # "normalised" (unit root-mean-square per sample, so that its scale cannot fall); ours
    lfr_target: str = "paper"
    mask_decoder: str = "kernels"  # Table III: "kernels" (Ours) or "concat" ("Concate")
    dropout: float = 0.1  # not given
    w_mask: float = 1.0  # Eq. (5), Sec. IV-A
    w_rec: float = 0.1  # Eq. (5), Sec. IV-A
    image_weights: str | None = None  # yolov3.weights / Darknet state dict, or a Swin-B .pth
    text_weights: str | None = None  # GloVe text file (gru) or local BERT folder
    freeze_encoders: bool = False  # the paper does not freeze (see Interpretations)
    freeze_word_vectors: bool = True  # gru: GloVe "generates" the embeddings (Sec. IV-A): fixed
    # training recipe (Sec. IV-A); batch_size is the global batch
    lr: float = 0.005
    encoder_lr_scale: float = 0.1  # pretrained encoders' lr factor (not given)
    lr_milestones: tuple[float, ...] = (0.8, 0.9)  # "step decay" (VLT: epochs 40, 45 of 50)
    epochs: int = 50
    batch_size: int = 48
    clip_grad: float = 0.0  # max gradient norm, 0 = none: the paper clips nothing
    hflip: bool = False  # training flips: the paper names no augmentation


# The encoder files each paper config starts from: train.py refuses a paper config without them
# (unless --random-init), so that "paper" never silently means "from scratch".
_CNN = {"image_weights": "Darknet-53, yolov3.weights or darknet53.conv.74 (darknet binary)",
        "text_weights": "GloVe, glove.840B.300d.txt"}
_SWIN = {"image_weights": "Swin-B, Microsoft's swin_base_patch4_window12_384_22k.pth",
         "text_weights": "a local bert-base-uncased folder (save_pretrained)"}
PAPER_WEIGHTS = {"paper": _CNN, "paper-cnn": _CNN, "paper-swin": _SWIN}

CONFIGS = {
    "paper-cnn": M3DecConfig(),  # Table IV's CNN setting (Darknet-53 + GRU over GloVe)
    "paper-swin": M3DecConfig(image_encoder="swin_b-w12", text_encoder="bert-base",
                              image_size=480, max_len=20),  # Table IV's Transformer setting
    # CPU-sized, same code paths: 128 px -> 8 x 8 tokens, tiny Darknet, the shapes words; it
    # trains from scratch, so its word vectors train and it clips and flips (Interpretations)
    "tiny": M3DecConfig(image_encoder="darknet-tiny", image_size=128, word_dim=32,
                        vocab=SHAPES_VOCAB, dim=64, heads=4, ffn_dim=128, mask_dim=32,
                        dropout=0.0, lr=1e-3, encoder_lr_scale=1.0, epochs=12, batch_size=16,
                        freeze_word_vectors=False, clip_grad=1.0, hflip=True),
}
CONFIGS["paper"] = CONFIGS["paper-cnn"]

# The paper's ablation rows (RefCOCO val, Sec. IV-B) as overrides of any config. "ours" is Table I
# shared x3, Table II #4 and Table III "Ours"; Table II's baseline has neither IMI nor LFR.
ABLATIONS: dict[str, dict[str, object]] = {
    "ours": {},
    **{f"I shared x{n}": {"dec_layers": n} for n in (1, 2, 4)},
    **{f"I independent x{n}": {"shared_attention": False, "dec_layers": n} for n in (1, 2, 3, 4)},
    **{f"I generic x{n}": {"attention": "generic", "dec_layers": n} for n in (1, 2, 3, 4)},
    "II #0 baseline (generic LAV)": {"attention": "generic", "imi": "off", "lfr": False},
    "II #1 baseline (M3Att)": {"imi": "off", "lfr": False},
    "II #2 baseline + IMI": {"lfr": False},
    "II #3 baseline + IMI*": {"imi": "same", "lfr": False},
    "III concate": {"mask_decoder": "concat"},
}


def prepare_config(cfg: M3DecConfig, train_sentences) -> M3DecConfig:
    """Fix the vocabulary in the config before a new model is built (train.py calls this), so that
    the checkpoint holds it: the GRU's words from the training sentences, BERT's weights' vocab."""
    if cfg.text_encoder == "gru":
        return replace(cfg, vocab=build_word_vocab(train_sentences, cfg.vocab_min_count))
    return replace(cfg, bert_vocab=cfg.bert_vocab or cfg.text_weights)


class VisualNeck(nn.Module):
    """F_vis (Sec. III): stride-32 map upsampled, joined to the stride-16 map, 1x1 conv to C."""

    def __init__(self, c16: int, c32: int, dim: int):
        super().__init__()
        self.proj = conv_bn_relu(c16 + c32, dim)  # 1x1

    def forward(self, f16: Tensor, f32: Tensor) -> Tensor:
        # f16 (B, C16, h, w) and f32 (B, C32, h/2, w/2): the backbone's last two maps
        up = F.interpolate(f32, size=f16.shape[-2:], mode="nearest")  # (B, C32, h, w)
        return self.proj(torch.cat([f16, up], 1))  # (B, C, h, w)


class MutualAttention(nn.Module):
    """Multi-Modal Mutual Attention, M3Att (Sec. III-A, Eq. 1-2b, Fig. 3b)."""

    def __init__(self, dim: int, num_pixels: int, shared: bool = True):
        super().__init__()
        self.to_lk, self.to_lv = nn.Linear(dim, dim), nn.Linear(dim, dim)  # F_L^k, F_L^v
        self.to_vk, self.to_vv = nn.Linear(dim, dim), nn.Linear(dim, dim)  # F_V^k, F_V^v
        # independent A_mut (Table I): "two extra linear project layers" give Eq. (2b)'s
        self.shared = shared
        if not shared:
            self.to_lk2, self.to_vk2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(num_pixels, dim)  # "project the channel number (HW) back to C"
        self.norm = TokenBatchNorm(dim)
        self.scale = dim**-0.5

    def forward(self, lang: Tensor, vis: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        # lang: the query features F_q (B, L, C); vis: F_enc (B, N, C)
        # Eq. (1): A_mut = F_L^k (F_V^k)^T / sqrt(C)  (B, L, N)
        a_mut = torch.einsum("blc,bnc->bln", self.to_lk(lang), self.to_vk(vis)) * self.scale
        # the A_mut of Eq. (2b): the same matrix (shared) or one from two extra keys (independent)
        a_mut_2b = a_mut if self.shared else torch.einsum(
            "blc,bnc->bln", self.to_lk2(lang), self.to_vk2(vis)) * self.scale
        # Eq. (2a): softmax over the pixels, LAV F_V^a = softmax(A_mut) F_V^v  (B, L, C)
        attn_v = torch.softmax(a_mut, dim=2)
        f_va = attn_v @ self.to_vv(vis)
        # Eq. (2b): softmax over the real words, VAL F_L^a = softmax(A_mut^T) F_L^v  (B, N, C)
        attn_l = safe_softmax(a_mut_2b.masked_fill(~text_mask[:, :, None], float("-inf")), dim=1)
        f_la = torch.einsum("bln,blc->bnc", attn_l, self.to_lv(lang))
        # F_mul = F_V^a (F_L^a)^T: each word's LAV vector as a kernel over the VAL  (B, L, N)
        f_mul = torch.einsum("blc,bnc->bln", f_va, f_la)
        out = F.relu(self.norm(self.to_out(f_mul), text_mask))  # (B, L, C)
        return out, attn_v


class M3DecLayer(nn.Module):
    """One Multi-Modal Mutual Decoder layer (Sec. III-A, Fig. 3c); mutual=False: "Generic"."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, num_pixels: int, shared: bool,
                 dropout: float, mutual: bool = True):
        super().__init__()
        self.self_attn = Attention(dim, heads, dropout=dropout)
        self.mutual = MutualAttention(dim, num_pixels, shared) if mutual else None
        self.cross_attn = Attention(dim, heads, dropout=dropout)
        self.ffn = feed_forward(dim, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, query: Tensor, f_enc: Tensor, text_mask: Tensor
                ) -> tuple[Tensor, Tensor | None]:
        # query (B, L, C): F_t, then the previous layer's output; self-attention on it gives F_q
        f_q = self.norm1(query + self.drop(self.self_attn(query, query, query, key_mask=text_mask)))
        if self.mutual is None:  # generic attention: F_q attends to the pixels of F_enc (LAV)
            f_mm, attn, kv_mask = f_enc, None, None
        else:  # M3Att fuses F_q with F_enc into a multi-modal feature (B, L, C)
            (f_mm, attn), kv_mask = self.mutual(f_q, f_enc, text_mask), text_mask
        # cross-attention: F_q queries again, the multi-modal feature is the value (and key)
        x = self.norm2(f_q + self.drop(self.cross_attn(f_q, f_mm, f_mm, key_mask=kv_mask)))
        return self.norm3(x + self.drop(self.ffn(x))), attn  # F_dec^n (B, L, C), (B, L, N)


class IMIBlock(nn.Module):
    """Iterative Multi-Modal Interaction (Sec. III-B, Eq. 3, Fig. 4); transform=False: IMI*."""

    def __init__(self, dim: int, transform: bool = True):
        super().__init__()
        self.transform = transform
        if transform:
            self.to_lang, self.lang_norm = nn.Linear(dim, dim), TokenBatchNorm(dim)  # F_l^n
            self.w_a, self.w_l = nn.Linear(dim, dim), nn.Linear(dim, dim)  # W_a^n, W'_l^n
        self.w_ci = nn.Parameter(torch.tensor(1.0))  # learnable scalar w_ci^n
        self.norm = TokenBatchNorm(dim)

    def forward(self, f_dec: Tensor, f_l: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        f_i = f_l  # IMI* (Table II #3): F_t, the same for every layer
        if self.transform:
            f_l = F.relu(self.lang_norm(self.to_lang(f_l), text_mask))  # F_l^n  (B, L, C)
            # Eq. (3): A_l^n = softmax(ReLU[F_dec^n W_a^n] (F_l^n)^T), over the real words
            logits = torch.einsum("bic,bjc->bij", F.relu(self.w_a(f_dec)), f_l)  # (B, L, L)
            attn = safe_softmax(logits.masked_fill(~text_mask[:, None, :], float("-inf")), dim=2)
            f_i = attn @ F.relu(self.w_l(f_l))  # F_i^n = A_l^n F'_l^n, F'_l^n = ReLU[F_l^n W'_l^n]
        f_dec = self.norm(f_dec + self.w_ci * f_i, text_mask)  # F'_dec^n = BN(F_dec^n + w_ci F_i^n)
        return f_dec, f_l


class LanguageReconstruction(nn.Module):
    """Language Feature Reconstruction, LFR (Sec. III-C, Eq. 4, Fig. 5): (F_rec, F_proj)."""

    def __init__(self, dim: int, target: str = "paper"):
        super().__init__()
        self.w_proj = nn.Linear(dim, dim)  # W_proj of Eq. (4)
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm1, self.norm2 = TokenBatchNorm(dim), TokenBatchNorm(dim)
        self.target = target  # one of LFR_TARGETS
        if target == "detached":  # no gradient reaches W_proj: a fixed random projection
            self.w_proj.requires_grad_(False)

    def forward(self, f_dec: Tensor, words: Tensor, sentence: Tensor, text_mask: Tensor
                ) -> tuple[Tensor, Tensor]:
        B, L, C = words.shape
        # Eq. (4): F_proj = 1/(N_t+1) sum ReLU([(F_t + e) (c) F_t'] W_proj), e: cosine positions
        e = sine_pos_1d(L, C, device=words.device).to(words.dtype)  # (L, C)
        seq = torch.cat([words + e, sentence[:, None]], 1)  # (B, L + 1, C)
        seq_mask = torch.cat([text_mask, text_mask.new_ones(B, 1)], 1)
        f_proj = masked_mean(F.relu(self.w_proj(seq)), seq_mask)  # (B, C)
        if self.target == "detached":  # stop-gradient: L_rec moves F_rec only
            f_proj = f_proj.detach()
        elif self.target == "normalised":  # unit rms per sample: L_rec cannot shrink the target
            f_proj = f_proj * torch.rsqrt(f_proj.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        # three stacked linear layers on F_dec, then average pooling over the words: F_rec
        x = F.relu(self.norm1(self.fc1(f_dec), text_mask))
        x = F.relu(self.norm2(self.fc2(x), text_mask))
        f_rec = masked_mean(self.fc3(x), text_mask)  # (B, C)
        return f_rec, f_proj


class MaskDecoder(nn.Module):
    """Mask Decoder (Sec. III-D, Fig. 6): F_dec as 1x1 dynamic kernels over F_enc, four convs;
    concat=True: Table III's "Concate" (see Interpretations)."""

    def __init__(self, dim: int, heads: int, max_len: int, mask_dim: int, dropout: float,
                 concat: bool = False):
        super().__init__()
        self.self_attn = Attention(dim, heads, dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.max_len, self.concat = max_len, concat
        conv = lambda a, b: conv_bn_relu(a, b, 3)
        up = lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.convs = nn.Sequential(conv(2 * dim if concat else max_len, mask_dim), up(),
                                   conv(mask_dim, mask_dim), up(), conv(mask_dim, mask_dim), up(),
                                   nn.Conv2d(mask_dim, 1, 3, padding=1))  # the logits
        # start at the log-odds of a small object (see Interpretations), not at p = 0.5
        nn.init.constant_(self.convs[-1].bias, -math.log((1 - FOREGROUND_PRIOR) / FOREGROUND_PRIOR))

    def forward(self, f_dec: Tensor, f_enc: Tensor, text_mask: Tensor) -> Tensor:
        # f_dec: M3Dec's output F_dec (B, L, C); f_enc: F_enc on its grid (B, C, h, w)
        L = f_dec.shape[1]
        if L > self.max_len:
            raise ValueError(f"{L} words exceed max_len={self.max_len}")
        kernels = self.norm(f_dec + self.self_attn(f_dec, f_dec, f_dec, key_mask=text_mask))
        kernels = kernels * text_mask[..., None]  # a padded word's map is zero
        if self.concat:  # the words summed, tiled and joined to F_enc  (B, 2C, h, w)
            maps = torch.cat([f_enc, kernels.sum(1)[:, :, None, None].expand_as(f_enc)], 1)
        else:
            maps = torch.einsum("blc,bchw->blhw", kernels, f_enc)  # N_t maps (B, L, h, w)
            maps = F.pad(maps, (0, 0, 0, 0, 0, self.max_len - L))  # (B, max_len, h, w)
        return self.convs(maps)  # (B, 1, 8h, 8w)


class M3Dec(RISModel):
    """M3Dec (Fig. 2). forward(image, text, text_mask, target=None) -> dict.
    Arguments: image (B, 3, H, W) as input_spec says, H = W = cfg.image_size; text (B, L) word
      (GRU) or WordPiece (BERT) ids; text_mask (B, L) True on real words; target (B, 1, H, W) 0/1.
    Returns: mask_logits (B, 1, H, W); mutual_attn (B, L, N), the last M3Att's softmax over the
      pixels (Eq. 2a; not with attention="generic"); word_ids, word_mask (the inputs, to title
      visualisations); with a target: loss, loss_mask and, with LFR, lang_rec, lang_proj (B, C)
      (F_rec, F_proj) and loss_rec (Eq. 5)."""

    def __init__(self, cfg: M3DecConfig):
        super().__init__()
        self.cfg, C = cfg, cfg.dim
        if cfg.image_size % 32:
            raise ValueError(f"image_size={cfg.image_size} must be a multiple of 32")
        check_choices(cfg, CHOICES)
        self.grid = cfg.image_size // FEATURE_STRIDE  # h = w
        # image encoder and F_vis (Sec. III); pixels as its weights expect (Darknet: [0, 1])
        encoder_cls, arch = IMAGE_ENCODERS[cfg.image_encoder]
        self.input_spec = InputSpec(cfg.image_size, "square", mean=encoder_cls.pixel_mean,
                                    std=encoder_cls.pixel_std)
        self.image_encoder = encoder_cls(arch, cfg.image_weights)
        self.neck = VisualNeck(*self.image_encoder.channels[-2:], C)
        # language encoder: F_t, F_t' (Sec. III); without a vocabulary its tokenizer only refuses
        if cfg.text_encoder == "gru":
            self.tokenizer, self.text_encoder = gru_and_tokenizer(
                cfg.vocab, cfg.max_len, C, cfg.word_dim, cfg.text_weights,
                hint="build the word vocabulary from the training split with m3dec.prepare_config")
            self.text_proj = nn.Identity()  # the GRU's width is already C
            if cfg.freeze_word_vectors:  # fixed GloVe vectors (see Interpretations)
                self.text_encoder.embed.weight.requires_grad_(False)
        else:
            self.tokenizer, self.text_encoder = bert_and_tokenizer(
                BERT_ENCODERS[cfg.text_encoder], cfg.text_weights, cfg.bert_vocab, cfg.max_len,
                hint="give a local BERT folder (with vocab.txt) as text_weights, or bert_vocab")
            self.text_proj = nn.Linear(self.text_encoder.dim, C)
        if cfg.freeze_encoders:
            for part in self.pretrained_parts():
                freeze(part)
        # transformer encoder, M3Dec (IMI between its layers), LFR, Mask Decoder (Fig. 2)
        self.encoder = nn.ModuleList(PostNormEncoderLayer(C, cfg.heads, cfg.ffn_dim, cfg.dropout)
                                     for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(
            M3DecLayer(C, cfg.heads, cfg.ffn_dim, self.grid**2, cfg.shared_attention, cfg.dropout,
                       mutual=cfg.attention == "m3att") for _ in range(cfg.dec_layers))
        n_imi = 0 if cfg.imi == "off" else cfg.dec_layers - 1
        self.imi = nn.ModuleList(IMIBlock(C, cfg.imi == "iterative") for _ in range(n_imi))
        self.lfr = LanguageReconstruction(C, cfg.lfr_target) if cfg.lfr else None
        self.mask_decoder = MaskDecoder(C, cfg.heads, cfg.max_len, cfg.mask_dim, cfg.dropout,
                                        concat=cfg.mask_decoder == "concat")

    def forward(self, image: Tensor, text: Tensor, text_mask: Tensor,
                image_mask: Tensor | None = None, target: Tensor | None = None
                ) -> dict[str, Tensor]:
        B, _, H, W = image.shape
        # 1. backbone features: F_vis (B, C, h, w); F_t (B, L, C) and F_t' (B, C)
        f_vis = self.neck(*self.image_encoder(image)[-2:])
        C, h, w = f_vis.shape[1:]
        words, sentence, _ = self.text_encoder(text, text_mask)
        words, sentence = self.text_proj(words) * text_mask[..., None], self.text_proj(sentence)
        # 2. transformer encoder, positional encoding added to its input: F_enc (B, N, C)
        f_enc = f_vis.flatten(2).transpose(1, 2) + sine_pos_2d(h, w, C, device=image.device)
        for layer in self.encoder:
            f_enc = layer(f_enc)
        # 3. M3Dec (Sec. III-A), F_t as the first query; IMI between its layers (Sec. III-B)
        f_dec, f_l = words, words
        for n, layer in enumerate(self.decoder):
            f_dec, attn = layer(f_dec, f_enc, text_mask)
            if n < len(self.imi):
                f_dec, f_l = self.imi[n](f_dec, f_l, text_mask)
        # 4. Mask Decoder (Sec. III-D) at stride 2, resized to the input
        logits = self.mask_decoder(f_dec, f_enc.transpose(1, 2).unflatten(2, (h, w)), text_mask)
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        out = {"mask_logits": logits, "word_ids": text, "word_mask": text_mask}
        if attn is not None:  # the generic (LAV only) layer has no M3Att
            out["mutual_attn"] = attn
        if target is not None:  # 5. the loss of Eq. (5), with LFR (Sec. III-C, training only)
            out["loss_mask"] = bce_loss(logits, target)
            out["loss"] = self.cfg.w_mask * out["loss_mask"]
            if self.lfr is not None:
                out["lang_rec"], out["lang_proj"] = self.lfr(f_dec, words, sentence, text_mask)
                out["loss_rec"] = reconstruction_loss(out["lang_rec"], out["lang_proj"])
                out["loss"] = out["loss"] + self.cfg.w_rec * out["loss_rec"]
        return out

    def pretrained_parts(self) -> list[nn.Module]:
        """Pretrained weights initialise these: the image encoder, GloVe's word vectors or BERT."""
        text = self.text_encoder.embed if self.cfg.text_encoder == "gru" else self.text_encoder
        return [self.image_encoder, text]

    def configure_optimizers(self, lr: float, total_steps: int):
        """Adam with step decay (Sec. IV-A); pretrained encoders at lr x encoder_lr_scale."""
        groups = optim.pretrained_groups(self.trainable_parameters(), self.pretrained_parts(),
                                         lr * self.cfg.encoder_lr_scale)
        opt = torch.optim.Adam(groups, lr=lr, fused=True)
        return opt, optim.step_decay(opt, total_steps, self.cfg.lr_milestones, gamma=0.1)

    def vis_panels(self, out: dict[str, Tensor], i: int) -> list[tuple[str, Tensor]]:
        """The last M3Att's attention of each word over the image (Eq. 2a), one panel per word."""
        if "mutual_attn" not in out:  # the generic (LAV only) ablation has no M3Att
            return []
        names, ids = self.tokenizer.token_names, out["word_ids"][i][out["word_mask"][i]].tolist()
        attn = out["mutual_attn"][i].unflatten(1, (self.grid, self.grid))  # (L, h, w)
        return [(f"{k}: {names[t] if names else f'token {k}'}", a / a.max().clamp(min=1e-12))
                for k, (t, a) in enumerate(zip(ids, attn))]


MODEL = M3Dec
