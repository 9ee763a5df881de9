"""ViLT (Kim et al. 2021, "ViLT: Vision-and-Language Transformer Without Convolution or Region
Supervision"), through transformers.

Upstream: one ViT-B/32 transformer over [text tokens; image class token; image patches], with
BERT's text embeddings and two modality type embeddings (text, image), pretrained on image-text
matching and masked language modelling.

Used by: MaIL, as its trimodal encoder. MaIL takes ViLT apart (embeddings, blocks, final norm),
puts its own mask tokens with a third type embedding into the sequence, and reads the output
tokens of the image patches (F_I) and of the masks (F_M).

Weights: a local Hugging Face ViLT folder (config.json and the weights, e.g. a download of
dandelin/vilt-b32-mlm); its pretraining heads and pooler are not read.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from common.encoders.loading import load_hf_folder, sine_init_, warn_random

# "vilt-b32" is ViltConfig's default, the architecture of dandelin/vilt-b32-mlm: ViT-B/32 (d 768,
# 12 blocks, 12 heads, P 32), position grid for 384 px, 40 text positions, BERT's 30522 words.
# "tiny" is this library's CPU-sized variant with the same structure.
VILT_ARCHS = {
    "vilt-b32": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, patch_size=32, image_size=384),
    "tiny": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=384, patch_size=16, image_size=128),
}


class ViLTEncoder(nn.Module):
    """ViLT's transformer taken apart, so that a model can put its own tokens into the sequence.

    Parts, as ViLT names them: `text_embed` (BERT embeddings: word + position + segment, then
    LayerNorm), `patch_embed` (P x P convolution), `cls_token` (the image's class token),
    `pos_embed` (a grid for image_size / P patches, plus the class token's), `type_embed` (modality
    types: 0 text, 1 image), `blocks` (pre-norm ViT blocks), `norm` (the final LayerNorm).
    Images of any size: as ViLT does, the position grid is resized bilinearly (corners aligned)
    to each image's own patch grid (its real pixels, `image_mask`); padded patches get none and
    are never attended to.

    Arguments:
      arch: "vilt-b32" | "tiny"; a weights folder must hold that architecture.
      weights: a local Hugging Face ViLT folder (config.json and the weights, e.g. a download of
        dandelin/vilt-b32-mlm), read with local_files_only; None = random.
      vocab_size: rows of the word-embedding table (the tokenizer's vocabulary).
    Shapes: B batch, L words, h w patch grid, N = h*w, S sequence, d width.
    """

    pixel_mean = pixel_std = (0.5, 0.5, 0.5)  # what ViLT's weights expect (ViltImageProcessor)

    def __init__(self, arch: str = "vilt-b32", weights: str | None = None,
                 vocab_size: int = 30522):
        super().__init__()
        from transformers import ViltConfig, ViltModel

        if arch not in VILT_ARCHS:
            raise ValueError(f"unknown ViLT arch {arch!r}; choose from {sorted(VILT_ARCHS)}")
        spec = VILT_ARCHS[arch]
        if weights is None:
            vilt = ViltModel(ViltConfig(vocab_size=vocab_size, **spec), add_pooling_layer=False)
            # HF leaves these two at zero and expects a checkpoint; ViLT initialises them with
            # trunc_normal(0.02). From scratch: the class token so, the patch grid's positions
            # as the 2-D sine encoding (sine_init_)
            pos = vilt.embeddings.position_embeddings  # (1, 1 + g*g, d), the class token first
            nn.init.trunc_normal_(pos, std=0.02)
            nn.init.trunc_normal_(vilt.embeddings.cls_token, std=0.02)
            sine_init_(pos[0, 1:])
            warn_random(f"ViLT {arch} transformer", "pass a local Hugging Face ViLT folder")
        else:
            if not os.path.isdir(weights):
                raise FileNotFoundError(f"ViLT weights must be a local Hugging Face folder "
                                        f"(config.json + weights), not {weights!r}")
            vilt = load_hf_folder(ViltModel, weights, f"ViLT {arch} transformer",
                                  add_pooling_layer=False)
            got = {k: getattr(vilt.config, k) for k in spec}
            if got != spec:
                raise ValueError(f"{weights!r} holds a ViLT with {got}, not the {arch!r} "
                                 f"architecture {spec}")
            if vilt.config.vocab_size != vocab_size:
                raise ValueError(f"{weights!r} has {vilt.config.vocab_size} word embeddings, but "
                                 f"the tokenizer has {vocab_size} words: give its vocab.txt")
        emb = vilt.embeddings
        self.text_embed = emb.text_embeddings
        self.patch_embed = emb.patch_embeddings.projection
        self.cls_token, self.pos_embed = emb.cls_token, emb.position_embeddings
        self.type_embed = emb.token_type_embeddings
        self.blocks = vilt.encoder.layer
        self.norm = vilt.layernorm
        self.dim, self.heads = spec["hidden_size"], spec["num_attention_heads"]
        self.patch_size = spec["patch_size"]
        self.grid = spec["image_size"] // spec["patch_size"]  # side of the pretrained position grid
        self.max_text_len = vilt.config.max_position_embeddings

    def embed_text(self, ids: Tensor) -> Tensor:
        """Word tokens plus the text type embedding: (B, L) -> (B, L, d)."""
        if ids.shape[1] > self.max_text_len:
            raise ValueError(f"{ids.shape[1]} tokens exceed ViLT's {self.max_text_len} positions")
        return self.text_embed(input_ids=ids) + self.type_embed.weight[0]

    def image_positions(self, patch_valid: Tensor) -> Tensor:
        """Position embeddings (B, N, d) of each image's patches; patch_valid (B, h, w) marks the
        patches of real pixels (a top-left rectangle). ViLT resizes its grid to every image's
        patch rectangle (bilinear, corners aligned); sampling the grid at those coordinates does
        the same for the whole batch at once, and padded patches get zeros, as in ViLT."""
        B, h, w = patch_valid.shape
        rows = patch_valid[:, :, 0].sum(1).clamp(min=1)  # (B,) real patch rows
        cols = patch_valid[:, 0, :].sum(1).clamp(min=1)
        ys = torch.arange(h, device=patch_valid.device)[None] / (rows[:, None] - 1).clamp(min=1)
        xs = torch.arange(w, device=patch_valid.device)[None] / (cols[:, None] - 1).clamp(min=1)
        grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), -1) * 2 - 1
        table = self.pos_embed[:, 1:].transpose(1, 2).unflatten(2, (self.grid, self.grid))
        pos = nn.functional.grid_sample(table.expand(B, -1, -1, -1), grid.to(table.dtype),
                                        mode="bilinear", align_corners=True)  # (B, d, h, w)
        pos = pos * patch_valid[:, None]
        return pos.flatten(2).transpose(1, 2)  # (B, N, d)

    def embed_image(self, image: Tensor, image_mask: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """Image tokens [class; patches] plus positions and the image type embedding.

        image (B, 3, H, W), image_mask (B, H, W) True on real pixels (None: all real).
        Returns tokens (B, 1 + N, d), their key mask (B, 1 + N), patch positions (B, N, d).
        """
        x = self.patch_embed(image)  # (B, d, h, w)
        B, _, h, w = x.shape
        if image_mask is None:
            patch_valid = torch.ones(B, h, w, dtype=torch.bool, device=image.device)
        else:  # a patch is real if its pixels are (images are padded bottom-right)
            P = self.patch_size
            real = image_mask[:, None, : h * P, : w * P].float()
            patch_valid = nn.functional.max_pool2d(real, P)[:, 0] > 0  # (B, h, w)
        pos = self.image_positions(patch_valid)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        tokens = torch.cat([cls, x.flatten(2).transpose(1, 2) + pos], 1) + self.type_embed.weight[1]
        key_mask = torch.cat([patch_valid.new_ones(B, 1), patch_valid.flatten(1)], 1)
        return tokens, key_mask, pos

    def forward(self, tokens: Tensor, key_mask: Tensor) -> Tensor:
        """The transformer on any token sequence (B, S, d); key_mask (B, S) False on tokens that
        must never be attended to. Each block: z^ = MSA(LN(z)) + z, z = MLP(LN(z^)) + z^."""
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, nh, S, hs)
        mask = key_mask[:, None, None, :]  # (B, 1, 1, S)
        x = tokens
        for blk in self.blocks:  # ViltLayer's weights, attention on SDPA (ViLT's dropout is 0)
            att, h = blk.attention.attention, blk.layernorm_before(x)
            q, k, v = split(att.query(h)), split(att.key(h)), split(att.value(h))
            o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + blk.attention.output.dense(o.transpose(1, 2).flatten(2))
            x = x + blk.output.dense(blk.intermediate(blk.layernorm_after(x)))
        return self.norm(x)
