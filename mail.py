"""MaIL: A Unified Mask-Image-Language Trimodal Network for Referring Image Segmentation.
Li, Wang, Mei, Liu. arXiv:2111.10747 (2021).

One transformer, initialised from ViLT, reads image patches, words and the patches of K candidate
instance masks at once (Eq. 3-5). The decoder scores each candidate from the image features F_I
pooled inside its mask and keeps the best one's mask features F_M^rho (Eq. 6; select loss, Eq.
7); F_I and F_M^rho, each reduced by a 1x1 conv, are concatenated with a coordinate map (Eq. 8)
and upsampled by log2(P) conv blocks to the mask. Loss: focal + dice + 0.1 x select.

Shapes: B batch, K candidate masks, L words, H W input size, P patch size, h w = H/P W/P patch
grid, N = h*w, N' mask tokens kept, d transformer width.

Interpretations (where the paper is silent or contradicts itself):
- Candidates (a detector's, Sec. 4.1) come from the data pipeline, which alone sees their scores
  and bounds K (`max_candidates`, `min_score`); annotated instances hold the answer (oracle). On
  the synthetic data a simulated Mask R-CNN gives them (common.proposals): never the annotation.
- Mask tokens (Eq. 3-4, "a similar procedure"): P x P patches of each binary mask through their
  own conv, initialised as ViLT's RGB projection summed over colours (timm's one-channel rule) so
  that the pretrained weights see a white shape on grey, plus the position of the image patch at
  their place and t_M, which starts as ViLT's image type t_I (mask tokens are patches too).
- No mask-identity embedding, as none is mentioned: two masks equal on a shared patch give equal
  tokens and F_M there. In Eq. 4's [masks; image; words] ViLT's image class token stays, as trained.
- "Valid area" (N' = sum_k H_k W_k / P^2): the patch-grid bounding box of the patches the mask
  touches, as the paper gives each mask a height and width; only those tokens enter, padded to
  the batch's largest N' and never attended to; F_M^k is zero outside.
- Eq. 6 across resolutions: F_I upsampled (nearest) and averaged over the mask's pixels, so each
  patch weighs its share of the mask (empty mask: f_k = 0); the score MLP: 2 layers, width d, ReLU.
- rho = argmax of the valid scores in training too, as the paper gives no teacher forcing nor
  relaxation: L_select alone trains the score MLP, focal + dice alone the 1x1 reductions and the
  head; both train the encoder, mask embedding and t_M included (via f_k, F_I, F_M^rho).
- Eq. 7's alpha: the valid candidate of largest IoU with the ground truth, so that proposals work
  too; a sample whose candidates all miss it takes no part in L_select.
- Head (SETR-PUP [40]): blocks 256 wide (SETR's; not given), bilinear with align_corners=False;
  logits resized to H x W when P does not divide H.
- Padded batches (the ViLT setting; not in the paper) give each image its output alone: Eq. 8's O
  spans its own patches, the head masks the padding (SegmentationHead), padded pixels get
  PAD_LOGIT (background, no gradient); only BN's batch statistics see them.
- Focal (alpha 0.25, gamma 2) and dice weigh 1 each, as the paper gives no weights. Focal is the
  mean over the real pixels of the batch: counting padding would scale an image's loss by how
  much padding its batch-mates cause (dice needs no such care: padding has p = t = 0).
- Text: BERT-uncased WordPiece ([CLS] ... [SEP]), 15 tokens (20 for G-Ref), from a local
  vocab.txt (`vocab`, else `text_weights`, else the ViLT folder's); without one a sentence is an
  error naming the flag, whatever the weights. Only `tokenizer="auto"` (tiny, ours) falls back to
  open_clip's BPE, so that a model without downloads still reads sentences.
- Images: ViLT's statistics (mean = std = 0.5) and, in the ViLT setting, ViLT's per-image resizing
  of the position grid to the real patches (common.encoders.ViLTEncoder).
- AdamW's decay (1e-2, Sec. 4.1) on every parameter, as no exclusion is named; ViLT is
  fine-tuned, as in the paper (`freeze_encoders` freezes it).
- Training loop: the paper configs follow Sec. 4.1 and nothing more (no clipping, no flips); the
  tiny config, trained from scratch on small data, adds clipping at 1.0 (`clip_grad`) and flips
  swapping "left"/"right" (`hflip`), ours. `best.pt` is the epoch of best val mIoU (the paper's
  rule is unsaid), so its val is optimistic.

Ablations (Sec. 4.3; config defaults are the full model, `ABLATIONS` names the rows):
- Tab. 2: `encoder_modality` "image+language" (variant 1, "w/o mask modality", Fig. 4b) is ViLT
  as pretrained, no mask tokens or t_M; `decoder_modality` "image" (variants 1, 3) drops F_M from
  Eq. 8 and with it selection, score MLP and L_select; "mask" (variant 4) drops F_I from Eq. 8
  only: the candidates are still scored from F_I (Eq. 6's f_k), as the paper names no other
  feature to score with, so F_I reaches the decoder through rho and L_select.
- Tab. 3: `mask_selection` "mean" / "maximum" pool F_M^k (0 off its valid area) over the valid
  candidates, unscored; "weighted_sum" weighs them by softmax(s_k) ("normalizes the learned
  scores") and keeps L_select.
- `select_weight` 0 ("w/o select loss", in no table): the MLP learns only through "weighted_sum";
  with "adaptive_select" it keeps its initialisation, frozen (DDP refuses untouched parameters).
- Tab. 2 variant 6 ("without multi-modal pre-train weight") is the config `paper-unimodal`: the
  same network started from a ViT-B/32 and BERT-base, each pre-trained on one modality
  (`load_unimodal_weights`), not from random weights: the paper's motivation (Sec. 1, 4.3)
  contrasts aligned multi-modal weights with separately pre-trained uni-modal encoders, and its
  53.96 is called "comparable to the state-of-the-art", which weights from scratch on RefCOCO+
  would hardly give. Which ViT and BERT is not said; `--random-init` remains a from-scratch run.
  It is a config, not an `ABLATIONS` row: on the tiny config (random weights) both are the same.
- Not built: Tab. 2 variant 2 ("mask-cropped images"): the paper does not say whether each
  candidate crops its own image, how those pixels are embedded, nor how Eq. 6 scores without F_I.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import optim
from common.encoders import ViLTEncoder
from common.encoders.bert import BERT_VOCAB_SIZE
from common.encoders.loading import load_hf_folder
from common.layers import MLP, coord_map, extend_border, patch_coord_map, real_patches
from common.losses import dice_loss, select_loss, sigmoid_focal_loss
from common.model import InputSpec, RISModel, check_choices, freeze
from common.tokenizers import ClipTokenizer, find_wordpiece_vocab, wordpiece_tokenizer

IGNORE = -100  # F.cross_entropy's ignore_index: a sample without a select-loss target
PAD_LOGIT = -1e4  # padded pixels (ViLT setting): background, no loss gradient; finite, fp16-safe
VOCAB_HINT = ("MaIL tokenises with BERT-uncased WordPiece (Sec. 4.1): pass its vocab.txt "
              "(--text-weights, or a ViLT folder holding one); tokenizer='auto' falls back to "
              "open_clip's BPE")
VIS_MAX_CANDIDATES = 10  # candidate panels drawn by vis_panels, best scores first
# the ablation fields' values (Tab. 2's modalities, Tab. 3's strategies), the full model's first
CHOICES = {"encoder_modality": ("image+mask+language", "image+language"),
           "decoder_modality": ("image+mask", "image", "mask"),
           "mask_selection": ("adaptive_select", "mean", "maximum", "weighted_sum")}
# the other fields with named values, the paper's first
OPTIONS = {"tokenizer": ("wordpiece", "auto"), "pretraining": ("multi-modal", "uni-modal")}


@dataclass(frozen=True)
class MaILConfig:
    vilt_arch: str = "vilt-b32"  # ViT-B/32 from ViLT: P=32, d=768, 12 blocks, 12 heads (Sec. 4.1)
    image_size: int = 384  # ViLT setting: shorter side 384 (Sec. 4.1); square setting: 416
    max_size: int | None = 640  # ViLT setting: longer side at most 640; None = square image_size
    max_tokens: int = 15  # 15 tokens for RefCOCO/RefCOCO+, 20 for G-Ref (Sec. 4.1)
    reduction: int = 3  # r: the two 1x1 convs divide the channels by r (Sec. 4.1)
    head_dim: int = 256  # width of the upsampling blocks (not given; SETR-PUP's [40])
    select_weight: float = 0.1  # lambda of L_select (Sec. 4.1); 0 = "w/o select loss"
    # ablations (Sec. 4.3, module docstring): the defaults are the full model (Tab. 2 variant 5)
    encoder_modality: str = "image+mask+language"  # Tab. 2; or "image+language" (variant 1)
    decoder_modality: str = "image+mask"  # Tab. 2; or "image" (variants 1, 3), "mask" (4)
    mask_selection: str = "adaptive_select"  # Tab. 3; or "mean", "maximum", "weighted_sum"
    # BERT-uncased WordPiece (Sec. 4.1) from `vocab`, else text_weights', else the ViLT folder's
    # vocab.txt; "auto" (tiny, ours): WordPiece where one is found, else open_clip's BPE
    tokenizer: str = "wordpiece"
    vocab: str | None = None  # WordPiece vocab.txt (or a folder holding one)
    # "multi-modal": ViLT's weights (Sec. 4.1); "uni-modal": Tab. 2 variant 6, a ViT image
    # encoder's and BERT's weights, each pre-trained alone (`load_unimodal_weights`)
    pretraining: str = "multi-modal"
    image_weights: str | None = None  # local Hugging Face folder: ViLT (dandelin/vilt-b32-mlm),
    #   or with pretraining="uni-modal" a ViT-B/32 (e.g. google/vit-base-patch32-384)
    text_weights: str | None = None  # a BERT vocab.txt, as `vocab`; with pretraining="uni-modal"
    #   a local Hugging Face BERT folder (bert-base-uncased) with its vocab.txt
    freeze_encoders: bool | None = None  # None/False: fine-tune ViLT, as the paper does
    max_candidates: int = 20  # K bound, not in the paper: ~7 instances per COCO image on average
    min_score: float = 0.05  # Mask R-CNN's test threshold (torchvision, detectron2)
    # training recipe (Sec. 4.1); batch_size is the global batch
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup: float = 0.1
    epochs: int = 10
    batch_size: int = 128
    clip_grad: float = 0.0  # max gradient norm, 0 = none: the paper names no clipping
    hflip: bool = False  # training flips ("left"/"right" swapped): the paper names none


# The encoder files a paper config needs: train.py refuses to start without them (--random-init
# aside), so that "paper" never silently means "from scratch".
_VILT = {"image_weights": "a local ViLT folder saved from dandelin/vilt-b32-mlm (with vocab.txt)"}
_UNIMODAL = {"image_weights": "a local ViT-B/32 folder (e.g. google/vit-base-patch32-384)",
             "text_weights": "a local BERT folder saved from bert-base-uncased (with vocab.txt)"}
PAPER_WEIGHTS = {"paper": _VILT, "paper-416": _VILT, "paper-gref": _VILT,
                 "paper-unimodal": _UNIMODAL}

CONFIGS = {
    "paper": MaILConfig(),
    "paper-416": MaILConfig(image_size=416, max_size=None),
    "paper-gref": MaILConfig(max_tokens=20),
    # Tab. 2 variant 6 ("without multi-modal pre-train weight"): uni-modal ViT + BERT weights
    "paper-unimodal": MaILConfig(pretraining="uni-modal"),
    # CPU-sized, same code paths: 128 px square, ViLT "tiny" (P=16: 8x8 patches, 4 blocks), BPE
    # without a vocab; from scratch, so clipping and flips (ours) steady it and enlarge the data
    "tiny": MaILConfig(vilt_arch="tiny", image_size=128, max_size=None, head_dim=32,
                       tokenizer="auto", lr=1e-3, warmup=0.05, epochs=12, batch_size=16,
                       clip_grad=1.0, hflip=True),
}

# The paper's ablation rows (Sec. 4.3, RefCOCO+ val) as overrides of the full model (docstring)
ABLATIONS: dict[str, dict[str, object]] = {
    "w/o mask modality": {"encoder_modality": "image+language", "decoder_modality": "image"},
    "decoder image only": {"decoder_modality": "image"},  # Tab. 2 variant 3
    "decoder mask only": {"decoder_modality": "mask"},  # Tab. 2 variant 4
    "selection mean": {"mask_selection": "mean"},  # Tab. 3
    "selection maximum": {"mask_selection": "maximum"},
    "selection weighted sum": {"mask_selection": "weighted_sum"},
    "w/o select loss": {"select_weight": 0.0},  # in no table of the paper
}


# transformers 5's ViT layer names -> ViLT's (transformers 4's ViT has ViLT's own names)
VIT_TO_VILT = {"attention.q_proj.": "attention.attention.query.",
               "attention.k_proj.": "attention.attention.key.",
               "attention.v_proj.": "attention.attention.value.",
               "attention.o_proj.": "attention.output.dense.",
               "mlp.fc1.": "intermediate.dense.", "mlp.fc2.": "output.dense."}


def load_unimodal_weights(vilt: ViLTEncoder, vit_folder: str, bert_folder: str | None) -> None:
    """Tab. 2 variant 6: ViLT's transformer from encoders each pre-trained on one modality. A
    Hugging Face ViT folder gives the patch projection, class token, position grid, blocks and
    final LayerNorm (a ViLT block is a ViT block); a BERT folder gives the word, position and
    segment embeddings and their LayerNorm (ViLT's text embedding is BERT's). The modality type
    embeddings keep their random start: no uni-modal model has them."""
    from transformers import BertModel, ViTModel

    vit = load_hf_folder(ViTModel, vit_folder, "ViT image encoder", add_pooling_layer=False)
    want = dict(hidden_size=vilt.dim, num_attention_heads=vilt.heads, patch_size=vilt.patch_size,
                num_hidden_layers=len(vilt.blocks), image_size=vilt.grid * vilt.patch_size)
    got = {k: getattr(vit.config, k) for k in want}
    if got != want:
        raise ValueError(f"{vit_folder!r} holds a ViT with {got}, not this ViLT's {want}")
    state, blocks = vit.state_dict(), {}
    for name, value in state.items():
        for prefix in ("encoder.layer.", "layers."):
            if name.startswith(prefix):
                i, rest = name[len(prefix):].split(".", 1)
                for old, new in VIT_TO_VILT.items():
                    rest = new + rest[len(old):] if rest.startswith(old) else rest
                blocks[f"{i}.{rest}"] = value
    with torch.no_grad():
        vilt.blocks.load_state_dict(blocks)  # strict: every tensor of every block
        vilt.patch_embed.weight.copy_(state["embeddings.patch_embeddings.projection.weight"])
        vilt.patch_embed.bias.copy_(state["embeddings.patch_embeddings.projection.bias"])
        vilt.cls_token.copy_(state["embeddings.cls_token"])
        vilt.pos_embed.copy_(state["embeddings.position_embeddings"])
        vilt.norm.load_state_dict({k[len("layernorm."):]: v for k, v in state.items()
                                   if k.startswith("layernorm.")})
        if bert_folder is None:
            return
        bert = load_hf_folder(BertModel, bert_folder, "BERT text encoder", add_pooling_layer=False)
        emb, text = bert.embeddings, vilt.text_embed
        if emb.word_embeddings.weight.shape != text.word_embeddings.weight.shape:
            raise ValueError(f"{bert_folder!r} holds word embeddings "
                             f"{tuple(emb.word_embeddings.weight.shape)}, this ViLT "
                             f"{tuple(text.word_embeddings.weight.shape)}")
        text.word_embeddings.load_state_dict(emb.word_embeddings.state_dict())
        text.token_type_embeddings.load_state_dict(emb.token_type_embeddings.state_dict())
        text.LayerNorm.load_state_dict(emb.LayerNorm.state_dict())
        # ViLT reads max_text_len positions: BERT's first ones
        text.position_embeddings.weight.copy_(emb.position_embeddings.weight[: vilt.max_text_len])


class MaskEmbedding(nn.Module):
    """Mask tokens v_M (Sec. 3.2, Eq. 3-4): patches of each candidate's valid area, projected."""

    def __init__(self, dim: int, patch_size: int, image_proj: nn.Conv2d | None = None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(1, dim, patch_size, stride=patch_size)
        if image_proj is not None:  # a binary mask seen as a grey image (see Interpretations)
            with torch.no_grad():
                self.proj.weight.copy_(image_proj.weight.sum(1, keepdim=True))
                self.proj.bias.copy_(image_proj.bias)

    def forward(self, cand_masks: Tensor, cand_valid: Tensor) -> tuple[Tensor, Tensor]:
        """cand_masks (B, K, H, W) bool, cand_valid (B, K) -> tokens (B, K, N, d) without position
        or type, and `area` (B, K, h, w): True inside each valid candidate's valid area."""
        B, K = cand_masks.shape[:2]
        m = cand_masks.flatten(0, 1)[:, None].float()  # (B*K, 1, H, W)
        tokens = self.proj(m).flatten(2).transpose(1, 2).unflatten(0, (B, K))  # (B, K, N, d)
        h, w = m.shape[-2] // self.patch_size, m.shape[-1] // self.patch_size
        touched = real_patches(m[:, 0], self.patch_size, h, w)  # (B*K, h, w) any mask pixel
        # H_k x W_k: the bounding box of the touched patches (rows/cols between first and last)
        span = lambda a: a.cummax(-1).values & a.flip(-1).cummax(-1).values.flip(-1)
        rows, cols = span(touched.any(2)), span(touched.any(1))  # (B*K, h), (B*K, w)
        area = (rows[:, :, None] & cols[:, None, :]).unflatten(0, (B, K))  # (B, K, h, w)
        return tokens, area & cand_valid[:, :, None, None]


class TrimodalEncoder(nn.Module):
    """Mask-Image-Language trimodal transformer encoder (Sec. 3.2, Eq. 3-5); without
    `mask_modality`, ViLT's image-language encoder (Tab. 2 variant 1), which returns no F_M."""

    def __init__(self, vilt: ViLTEncoder, pretrained: bool, mask_modality: bool):
        super().__init__()
        self.vilt = vilt
        self.mask_embed = self.mask_type = None
        if mask_modality:
            self.mask_embed = MaskEmbedding(vilt.dim, vilt.patch_size,
                                            vilt.patch_embed if pretrained else None)
            # t_M, the new modality type, starts as ViLT's image type t_I
            self.mask_type = nn.Parameter(vilt.type_embed.weight[1].detach().clone()[None, None])

    def forward(self, image: Tensor, text: Tensor, text_mask: Tensor, cand_masks: Tensor,
                cand_valid: Tensor, image_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # v_I + t_I: [class; patches] (B, 1 + N, d) and their positions (B, N, d)
        img, img_keep, pos = self.vilt.embed_image(image, image_mask)
        B, P = image.shape[0], self.vilt.patch_size
        h, w = image.shape[-2] // P, image.shape[-1] // P
        words = self.vilt.embed_text(text)  # v_L + t_L (B, L, d)
        if self.mask_embed is None:  # Tab. 2 variant 1: z^0 = [v_I + t_I; v_L + t_L]
            z = self.vilt(torch.cat([img, words], 1), torch.cat([img_keep, text_mask], 1))
            return z[:, 1 : 1 + h * w].transpose(1, 2).unflatten(2, (h, w)), None  # F_I
        # v_M + t_M: every candidate's patches with the position of the same image patch
        masks, area = self.mask_embed(cand_masks, cand_valid)  # (B, K, N, d), (B, K, h, w)
        masks = (masks + pos[:, None] + self.mask_type).flatten(1, 2)  # (B, K*N, d)
        keep = area.flatten(1)  # (B, K*N)
        # keep only the valid areas (N' tokens), valid ones first, padded to the batch's largest N'
        # (N' is data, which a meta tensor lacks: the tests' meta shape checks keep all K*N)
        n = keep.shape[1] if keep.is_meta else int(keep.sum(1).max())
        order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :n]  # (B, N')
        masks = masks.gather(1, order[..., None].expand(-1, -1, masks.shape[-1]))  # (B, N', d)
        mask_keep = keep.gather(1, order)  # (B, N')
        # Eq. (4): z^0 = [v_M + t_M; v_I + t_I; v_L + t_L]; Eq. (5): the transformer blocks
        z = self.vilt(torch.cat([masks, img, words], 1),
                      torch.cat([mask_keep, img_keep, text_mask], 1))  # (B, N' + 1 + N + L, d)
        # split z^D into z_M (back on all K*N patches, 0 off the valid areas) and z_I: F_M^k, F_I
        z_m, z_i = z[:, :n], z[:, n + 1 : n + 1 + h * w]
        f_m = torch.zeros(B, keep.shape[1], z.shape[-1], device=z.device, dtype=z.dtype)
        f_m = f_m.scatter(1, order[..., None].expand_as(z_m), z_m * mask_keep[..., None])
        f_m = f_m.unflatten(1, (-1, h, w)).permute(0, 1, 4, 2, 3)  # (B, K, d, h, w)
        f_i = z_i.transpose(1, 2).unflatten(2, (h, w))  # (B, d, h, w)
        return f_i, f_m


def masked_average_pool(f_i: Tensor, cand_masks: Tensor, patch_size: int) -> Tensor:
    """Eq. (6): f_k = AVG(F_I * m_k), the mean of F_I (B, d, h, w) over each mask's pixels
    (B, K, H, W): every patch weighs the share of the mask it holds. Returns (B, K, d)."""
    h, w = f_i.shape[-2:]
    m = cand_masks[..., : h * patch_size, : w * patch_size].float()
    share = F.avg_pool2d(m.flatten(0, 1), patch_size).unflatten(0, m.shape[:2])  # (B, K, h, w)
    total = torch.einsum("bkhw,bdhw->bkd", share, f_i)
    return total / share.sum((-2, -1)).clamp(min=1e-6)[..., None]


def pool_mask_features(f_m: Tensor, cand_valid: Tensor, how: str) -> Tensor:
    """Tab. 3's "Mean" and "Maximum": the mask features F_M^k (B, K, d, h, w), zero outside each
    valid area, pooled over the valid candidates (B, K). Returns (B, d, h, w)."""
    if how == "maximum":
        return f_m.masked_fill(~cand_valid[:, :, None, None, None], float("-inf")).amax(1)
    return f_m.sum(1) / cand_valid.sum(1).clamp(min=1)[:, None, None, None]  # padding is zero


def best_candidate(cand_masks: Tensor, cand_valid: Tensor, target: Tensor) -> Tensor:
    """alpha of Eq. (7): index (B,) of the valid candidate with the largest IoU with the target
    (B, 1, H, W); IGNORE where no candidate overlaps it."""
    t = target[:, :1] > 0.5  # (B, 1, H, W)
    inter = (cand_masks & t).flatten(2).sum(2).float()
    union = (cand_masks | t).flatten(2).sum(2).float()
    iou = (inter / union.clamp(min=1)).masked_fill(~cand_valid, -1.0)  # (B, K)
    best, alpha = iou.max(1)
    return alpha.masked_fill(best <= 0, IGNORE)


class SegmentationHead(nn.Module):
    """Segmentation head (Sec. 3.3, SETR-PUP): log2(P) x [3x3 conv + BN + ReLU + 2x bilinear],
    then a 1x1 conv to one channel. With `real` (B, h, w), the real patches of a padded batch,
    padding is zeroed before each 3x3 conv and border-filled before each upsampling: alone and
    padded, an image gets the same output."""

    def __init__(self, in_dim: int, dim: int, num_blocks: int):
        super().__init__()
        block = lambda a: nn.Sequential(
            nn.Conv2d(a, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        self.blocks = nn.Sequential(*[block(in_dim if i == 0 else dim) for i in range(num_blocks)])
        self.out = nn.Conv2d(dim, 1, 1)

    def forward(self, x: Tensor, real: Tensor | None = None) -> Tensor:
        # x: F^ of Eq. (8) (B, 2d/r + 2, h, w); each block doubles h and w
        for conv, bn, relu, up in self.blocks:
            x = relu(bn(conv(x if real is None else x * real[:, None])))
            if real is not None:
                x = extend_border(x, real)
                real = real.repeat_interleave(2, 1).repeat_interleave(2, 2)  # (B, 2h, 2w)
            x = up(x)
        return self.out(x)  # (B, 1, h*P, w*P)


class MaIL(RISModel):
    """MaIL (Fig. 2).
    Arguments: image (B, 3, H, W) normalised with ViLT's statistics; image_mask (B, H, W) True on
      real pixels (the ViLT setting pads); text (B, L) token ids, text_mask (B, L) True on real
      tokens; cand_masks (B, K, H, W) bool candidate masks, cand_valid (B, K) False on padding
      (not read, and not needed, without the mask modality: `input_names_for`);
      target (B, 1, H, W) in {0, 1}, optional: adds the loss.
    Returns: mask_logits (B, 1, H, W), cand_masks and image_mask (when given); where candidates are
      scored, mask_scores (B, K) (-inf on padding) and selected (B,) = rho; with a target: loss,
      loss_focal, loss_dice and, where built, loss_select."""

    input_names = ("image", "text", "text_mask", "cand_masks", "cand_valid")

    @classmethod
    def input_names_for(cls, cfg: MaILConfig) -> tuple[str, ...]:
        """Tab. 2 variant 1 (no mask modality) reads no candidates: it needs no proposals."""
        return cls.input_names if "mask" in cfg.encoder_modality else cls.input_names[:3]

    def __init__(self, cfg: MaILConfig):
        super().__init__()
        check_choices(cfg, CHOICES)  # Tab. 2 variant 2 is not built (docstring)
        check_choices(cfg, OPTIONS)
        if "mask" in cfg.decoder_modality and "mask" not in cfg.encoder_modality:
            raise ValueError("a decoder of mask features needs them from the encoder")
        self.input_names = self.input_names_for(cfg)
        unimodal = cfg.pretraining == "uni-modal"
        # the vocab.txt: given, else the BERT folder's (uni-modal) or the ViLT folder's
        vocab = find_wordpiece_vocab(cfg.vocab or (None if unimodal else cfg.text_weights),
                                     cfg.text_weights if unimodal else cfg.image_weights)
        self.cfg = dataclasses.replace(cfg, vocab=vocab)  # a checkpoint re-reads the same words
        if vocab or cfg.tokenizer == "wordpiece":  # no vocab: an error once a sentence comes
            self.tokenizer = wordpiece_tokenizer(vocab, cfg.max_tokens, VOCAB_HINT)
        else:  # "auto" without a vocab (tiny): nothing to download
            self.tokenizer = ClipTokenizer(cfg.max_tokens)
        words = getattr(self.tokenizer, "vocab_size", BERT_VOCAB_SIZE)
        vilt = ViLTEncoder(cfg.vilt_arch, None if unimodal else cfg.image_weights, words)
        if unimodal and cfg.image_weights:
            load_unimodal_weights(vilt, cfg.image_weights, cfg.text_weights)
        P, d = vilt.patch_size, vilt.dim
        vilt_setting = cfg.max_size is not None  # else square images (Sec. 4.1)
        self.input_spec = InputSpec(cfg.image_size, "shorter" if vilt_setting else "square",
                                    max_size=cfg.max_size, pad_multiple=P if vilt_setting else 1,
                                    mean=vilt.pixel_mean, std=vilt.pixel_std)  # ViLT's
        self.encoder = TrimodalEncoder(vilt, pretrained=cfg.image_weights is not None,
                                       mask_modality="mask" in cfg.encoder_modality)
        if cfg.freeze_encoders:
            freeze(self.encoder.vilt)
        # the decoder parts the ablation keeps (Tab. 2's decoder modality, Tab. 3's strategy)
        image_in, mask_in = "image" in cfg.decoder_modality, "mask" in cfg.decoder_modality
        scored = mask_in and cfg.mask_selection in ("adaptive_select", "weighted_sum")
        self.score = MLP(d, d, 1, num_layers=2) if scored else None  # s_k = MLP(f_k), Eq. (6)
        if scored and cfg.mask_selection == "adaptive_select" and cfg.select_weight == 0:
            self.score.requires_grad_(False)  # "w/o select loss": argmax passes no gradient
        r = d // cfg.reduction  # the two 1x1 convs (Sec. 3.3)
        self.reduce_i = nn.Conv2d(d, r, 1) if image_in else None
        self.reduce_m = nn.Conv2d(d, r, 1) if mask_in else None
        num_blocks = P.bit_length() - 1  # log2(P) blocks recover the input resolution
        if 2**num_blocks != P:
            raise ValueError(f"patch size {P} is not a power of two")
        self.head = SegmentationHead((image_in + mask_in) * r + 2, cfg.head_dim, num_blocks)

    def forward(self, image: Tensor, text: Tensor, text_mask: Tensor,
                cand_masks: Tensor | None = None, cand_valid: Tensor | None = None,
                image_mask: Tensor | None = None,
                target: Tensor | None = None) -> dict[str, Tensor]:
        B, _, H, W = image.shape
        if cand_masks is not None:
            cand_masks = cand_masks & cand_valid[:, :, None, None]  # padding holds nothing
        elif "cand_masks" in self.input_names:
            raise ValueError("this MaIL reads candidate masks: pass cand_masks and cand_valid")
        # 1. trimodal encoder (Eq. 3-5): F_I (B, d, h, w), F_M (B, K, d, h, w)
        f_i, f_m = self.encoder(image, text, text_mask, cand_masks, cand_valid, image_mask)
        h, w = f_i.shape[-2:]
        # the ViLT setting pads each batch: every image's own patches (B, h, w), None otherwise
        padded = image_mask is not None and self.cfg.max_size is not None
        real = real_patches(image_mask, self.encoder.vilt.patch_size, h, w) if padded else None
        # 2. adaptive mask selection (Eq. 6): F_M^rho (B, d, h, w), scores s_k (B, K), rho (B,)
        f_m_rho, scores, rho = self.select(f_i, f_m, cand_masks, cand_valid)
        # 3. Eq. (8): F^ = Concat(F_I, F_M^rho, O), 1x1-reduced by r (those Tab. 2's row keeps)
        coords = (coord_map(B, h, w, device=f_i.device, dtype=f_i.dtype) if real is None
                  else patch_coord_map(real, f_i.dtype))  # O (B, 2, h, w)
        parts = [(self.reduce_i, f_i), (self.reduce_m, f_m_rho)]
        f_hat = torch.cat([reduce(x) for reduce, x in parts if reduce is not None] + [coords], 1)
        # 4. segmentation head: log2(P) upsampling blocks back to the input resolution
        logits = self.head(f_hat, real)  # (B, 1, h*P, w*P)
        if logits.shape[-2:] != (H, W):
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        if padded:  # pixels outside the image: background, and no loss gradient
            logits = logits.masked_fill(~image_mask[:, None], PAD_LOGIT)
        out = {"mask_logits": logits}
        if cand_masks is not None:
            out["cand_masks"] = cand_masks
        if scores is not None:
            out["mask_scores"], out["selected"] = scores, rho
        if image_mask is not None:
            out["image_mask"] = image_mask
        if target is not None:
            # focal + dice + lambda * L_select (Sec. 3.3, Eq. 7)
            # focal averages over the images' own pixels: padding (PAD_LOGIT, target 0) adds
            # exactly 0 to its sum, and counting it would dilute the mean by a share that
            # depends on the rest of the batch (dice: padding holds p = t = 0, inert)
            real_share = image_mask.float().mean() if padded else 1.0
            out["loss_focal"] = sigmoid_focal_loss(logits, target) / real_share
            out["loss_dice"] = dice_loss(logits, target)
            out["loss"] = out["loss_focal"] + out["loss_dice"]
            if scores is not None and self.cfg.select_weight > 0:
                alpha = best_candidate(cand_masks, cand_valid, target)
                has_alpha = (alpha != IGNORE)[:, None]
                # rows without a target are ignored, yet kept finite so that no NaN reaches a
                # gradient; a batch with no target at all gives 0
                out["loss_select"] = torch.nan_to_num(select_loss(
                    scores.masked_fill(~has_alpha, 0.0), cand_valid | ~has_alpha, alpha))
                out["loss"] = out["loss"] + self.cfg.select_weight * out["loss_select"]
        return out

    def select(self, f_i: Tensor, f_m: Tensor | None, cand_masks: Tensor, cand_valid: Tensor
               ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Eq. (6), or the ablation's replacement: the mask feature the decoder takes (B, d, h,
        w), the scores s_k (B, K) (-inf on padding) and rho (B,), each None where it has none."""
        how = self.cfg.mask_selection
        if self.reduce_m is None:  # Tab. 2: the decoder takes F_I alone, nothing is selected
            return None, None, None
        if how in ("mean", "maximum"):  # Tab. 3: every candidate, unscored
            return pool_mask_features(f_m, cand_valid, how), None, None
        # aligned features f_k = AVG(F_I * m_k) (B, K, d), scores s_k = MLP(f_k), rho = argmax
        f_k = masked_average_pool(f_i, cand_masks, self.encoder.vilt.patch_size)
        scores = self.score(f_k)[..., 0].masked_fill(~cand_valid, float("-inf"))  # (B, K)
        rho = scores.argmax(1)
        if how == "weighted_sum":  # Tab. 3: sum_k softmax(s)_k F_M^k
            return torch.einsum("bk,bkdhw->bdhw", scores.softmax(1), f_m), scores, rho
        return f_m[torch.arange(len(rho), device=rho.device), rho], scores, rho  # F_M^rho

    def configure_optimizers(self, lr: float, total_steps: int):
        """AdamW, linear warm-up over 10% of the steps, then linear decay to zero (Sec. 4.1)."""
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=lr,
                                weight_decay=self.cfg.weight_decay, fused=True)
        return opt, optim.warmup_linear(opt, total_steps, warmup=self.cfg.warmup)

    def vis_panels(self, out: dict[str, Tensor], i: int) -> list[tuple[str, Tensor]]:
        """Fig. 5: the candidate masks with their scores (and softmax share), best first; the
        selected one is marked; none for an ablation without scores."""
        if "mask_scores" not in out:
            return []
        scores, masks = out["mask_scores"][i].float(), out["cand_masks"][i]
        if "image_mask" in out:  # crop the padding, so panels align with the image
            real = out["image_mask"][i]
            masks = masks[:, : int(real.any(1).sum()), : int(real.any(0).sum())]
        probs = torch.softmax(scores, 0)
        rho = int(out["selected"][i]) if self.cfg.mask_selection == "adaptive_select" else None
        panels = []
        for k in scores.argsort(descending=True)[:VIS_MAX_CANDIDATES].tolist():
            if torch.isinf(scores[k]):
                break  # padded candidates
            mark = "  SELECTED" if k == rho else ""
            panels.append((f"mask {k}: s={scores[k]:.2f} p={probs[k]:.2f}{mark}", masks[k].float()))
        return panels


MODEL = MaIL
