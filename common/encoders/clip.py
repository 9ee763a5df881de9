"""CLIP's text and image towers (Radford et al. 2021), through open_clip.

Upstream: OpenAI's CLIP, a causal text transformer and a ResNet (ending in an attention pool) or
ViT image tower, trained contrastively; open_clip builds every architecture offline.

Used by:
- MMNet: the text tower's word features F_t and EOS feature F_tg in CLIP space (`project=True`);
  the image tower's stage features x2, x3 and the attention pool's [z_bar, z] = MHSA([mean(x4),
  x4]) (Eq. 1), kept spatial. A ViT has no stages: x2, x3, x4 are patch tokens after chosen blocks.
- MARIS: the text tower only, frozen: its word features F_l (`project=False`).

Weights: an open_clip checkpoint (.pt/.bin/.safetensors) or an OpenAI TorchScript archive (RN50.pt,
ViT-B-16.pt, ...: these need a "-quickgelu" arch). Each tower leaves the other tower's tensors.

Shapes: B batch, L tokens, C channels, h w feature map, D CLIP's embedding width.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from common.encoders.loading import (
    _is_torchscript,
    load_checked,
    load_state_dict_file,
    sine_init_,
    skip_init,
    warn_random,
)
from common.model import CLIP_MEAN, CLIP_STD

# --- the text tower (MMNet, MARIS) and what both towers share ---
TINY_CLIP_TEXT = dict(embed_dim=64, text_cfg=dict(context_length=77, vocab_size=49408, width=64,
                                                  heads=2, layers=2))


# Names in a CLIP file (open_clip's or OpenAI's) outside the towers, and those of the text tower;
# OpenAI's archives also hold three metadata scalars
CLIP_SHARED_NAMES = ("logit_scale", "logit_bias", "input_resolution", "context_length",
                     "vocab_size")
CLIP_TEXT_NAMES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                   "text_projection")


def check_clip_activation(path: str, arch: str, quick_gelu: bool) -> None:
    """OpenAI trained CLIP with QuickGELU and publishes TorchScript archives; open_clip names its
    towers' tensors alike, so a GELU tower would load one silently and compute other features:
    an archive is refused unless the architecture is a "-quickgelu" one (for both towers, so
    that one name serves both, though a ResNet image tower has no GELU). A plain state dict (an
    open_clip checkpoint) carries no such mark: its architecture name must be right."""
    if os.path.isfile(path) and _is_torchscript(path) and not quick_gelu:
        from open_clip.factory import get_model_config

        name = f"{arch}-quickgelu"
        hint = repr(name) if get_model_config(name) is not None else 'a "-quickgelu" one'
        raise ValueError(f"{path} is an OpenAI CLIP archive (TorchScript), trained with "
                         f"QuickGELU, but {arch!r} builds GELU: use the architecture {hint}")


def load_clip_file(module: nn.Module, path: str, what: str, skip: tuple[str, ...]) -> None:
    """Load one tower from a CLIP file (see `load_checked`; `skip`: the other tower's names)."""
    load_checked(module, load_state_dict_file(path), path, what, skip=skip + CLIP_SHARED_NAMES)


def clip_config(arch: str) -> dict:
    """open_clip's model config (an open_clip name such as "ViT-B-16", "RN50") or "tiny"."""
    if arch == "tiny":
        return dict(TINY_CLIP_TEXT)
    from open_clip.factory import get_model_config

    cfg = get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    return cfg


class CLIPTextEncoder(nn.Module):
    """CLIP's causal text transformer: per-token features, the EOS sentence feature, a pad mask.

    The positional embedding is used up to the sentence length (at most `context_length`), as
    CRIS does; because the attention is causal, padding after EOS never changes earlier tokens.

    Arguments:
      arch: an open_clip config name or "tiny". OpenAI's CLIP weights need the QuickGELU
        architectures: "ViT-B-16-quickgelu", "ViT-B-32-quickgelu", "ViT-L-14-quickgelu",
        "RN50-quickgelu", "RN101-quickgelu"; GELU names ("ViT-B-16", ...) are for open_clip
        checkpoints trained with GELU (e.g. LAION's).
      weights: an open_clip checkpoint (.pt/.bin/.safetensors) or an OpenAI CLIP file
        (TorchScript, refused for a GELU `arch`); None = random.
      project: keep CLIP's text projection (needed for the EOS sentence feature in CLIP space).
    Returns (forward): words (B, L, width), sentence (B, embed_dim or width), text_mask (B, L).
    """

    def __init__(self, arch: str = "ViT-B-16", weights: str | None = None, project: bool = True):
        super().__init__()
        from open_clip.model import _build_text_tower

        cfg = clip_config(arch)
        quick_gelu = cfg.get("quick_gelu", False)  # True for the "-quickgelu" names
        if weights is not None:
            check_clip_activation(weights, arch, quick_gelu)
        with skip_init(weights is not None):  # every tensor is loaded from the file below
            tower = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=quick_gelu)
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection if project else None
        self.width = tower.width
        self.out_dim = cfg["embed_dim"] if project else tower.width
        self.context_length = tower.context_length
        self.register_buffer("causal", tower.attn_mask, persistent=False)  # (77, 77) additive
        if weights is None:
            warn_random(f"CLIP {arch} text encoder", "pass an open_clip or OpenAI CLIP file")
        else:
            unused = ("visual.",) if project else ("visual.", "text_projection")
            load_clip_file(self, weights, f"CLIP {arch} text encoder", unused)

    def forward(self, ids: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        L = ids.shape[1]
        if L > self.context_length:
            raise ValueError(f"{L} tokens exceed CLIP's context length {self.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[:L]  # (B, L, width)
        x = self.transformer(x, attn_mask=self.causal[:L, :L])
        words = self.ln_final(x)  # (B, L, width)
        # EOS position = last real token (open_clip uses argmax of the ids, the EOT id is largest)
        eos = text_mask.long().sum(1) - 1
        sentence = words[torch.arange(ids.shape[0], device=ids.device), eos]  # (B, width)
        if self.text_projection is not None:
            sentence = sentence @ self.text_projection  # (B, embed_dim)
        return words, sentence, text_mask


# --- the image tower (MMNet), ResNet or ViT ---
# CPU-sized towers with the structure of open_clip's ViT ("tiny") and ModifiedResNet ("tiny-rn")
TINY_CLIP_VISION = {
    "tiny": dict(embed_dim=64, vision_cfg=dict(image_size=128, layers=6, width=64, head_width=32,
                                               patch_size=8)),
    "tiny-rn": dict(embed_dim=64, vision_cfg=dict(image_size=128, layers=[1, 1, 1, 1], width=8,
                                                  head_width=32)),
}


def resize_pos_embed(pos: Tensor, hw: tuple[int, int]) -> Tensor:
    """A (1 + g*g, C) positional embedding (global token first, then a g x g grid) for an h x w
    grid: the grid part is resized bicubically (as open_clip does for checkpoints); at g x g it
    is returned unchanged."""
    g = round((pos.shape[0] - 1) ** 0.5)
    if tuple(hw) == (g, g):
        return pos
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
    grid = torch.nn.functional.interpolate(grid, size=tuple(hw), mode="bicubic",
                                           align_corners=False)
    return torch.cat([pos[:1], grid.flatten(2)[0].T], 0)  # (1 + h*w, C)


class CLIPImageEncoder(nn.Module):
    """CLIP's image tower with its stage features, global feature and spatial feature (MMNet Eq. 1).

    ResNet (open_clip ModifiedResNet): x2, x3, x4 are the outputs of stages 2-4; the attention
    pool's multi-head self-attention over [mean(x4), x4] gives [z_bar, z] (Eq. 1). ViT: x2, x3,
    x4 are the patch tokens after the blocks at 1/3, 2/3 and full depth (`vit_blocks`), z the
    last block's patch tokens and z_bar its class token, both through ln_post and CLIP's proj.
    Positional embeddings (the attention pool's, built for 7x7 at 224 px, and the ViT's) are
    resized to the input's grid, so any input size works; at the native size nothing changes.

    Arguments:
      arch: an open_clip config name, "tiny" (a small ViT) or "tiny-rn" (a small ResNet).
        OpenAI's CLIP weights need the QuickGELU architectures: "RN50-quickgelu",
        "RN101-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu", ...
      weights: an open_clip checkpoint (.pt/.bin/.safetensors) or an OpenAI CLIP file
        (TorchScript, refused for a GELU `arch`); None = random.
      vit_blocks: ViT only, which blocks (counted from 1) give x2, x3, x4.
    Returns (forward): x2, x3, x4, z as (B, C, h, w) maps and z_bar (B, D); `dims` gives their
      channels. ResNet: x2 at H/8, x3 at H/16, x4 and z at H/32; ViT: all at H/patch
      (`x3_stride` is 16 or the patch size).
    """

    pixel_mean, pixel_std = CLIP_MEAN, CLIP_STD  # what CLIP's weights expect (0-1 scale)

    def __init__(self, arch: str = "ViT-B-16", weights: str | None = None,
                 vit_blocks: tuple[int, int, int] | None = None):
        super().__init__()
        from open_clip.model import _build_vision_tower

        cfg = TINY_CLIP_VISION[arch] if arch in TINY_CLIP_VISION else clip_config(arch)
        quick_gelu = cfg.get("quick_gelu", False)  # True for the "-quickgelu" names
        if weights is not None:
            check_clip_activation(weights, arch, quick_gelu)
        with skip_init(weights is not None):  # every tensor is loaded from the file below
            self.visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"],
                                              quick_gelu=quick_gelu)
        self.is_vit = hasattr(self.visual, "transformer")
        if not (hasattr(self.visual, "attnpool") or self.is_vit and self.visual.attn_pool is None
                and self.visual.pool_type == "tok"):
            raise ValueError(f"{arch!r} is neither a CLIP ResNet nor a CLIP ViT with a class token")
        D = cfg["embed_dim"]
        if self.is_vit:
            depth, width = len(self.visual.transformer.resblocks), self.visual.transformer.width
            self.vit_blocks = tuple(vit_blocks or (depth // 3, 2 * depth // 3, depth))
            if not 1 <= min(self.vit_blocks) <= max(self.vit_blocks) <= depth:
                raise ValueError(f"vit_blocks {self.vit_blocks} outside 1..{depth}")
            self.dims = dict(x2=width, x3=width, x4=width, z=D)
            self.x3_stride = self.visual.patch_size[0]  # pixels per x3 cell
        else:
            width = self.visual.layer1[0].conv1.in_channels  # the stem's width
            self.dims = dict(x2=8 * width, x3=16 * width, x4=32 * width, z=D)
            self.x3_stride = 16
        if weights is None:
            if self.is_vit:  # the patch grid's positions (after the class token's): 2-D sine
                sine_init_(self.visual.positional_embedding[1:])
            warn_random(f"CLIP {arch} image encoder", "pass an open_clip or OpenAI CLIP file")
        else:
            load_clip_file(self, weights, f"CLIP {arch} image encoder", CLIP_TEXT_NAMES)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self._forward_vit(image) if self.is_vit else self._forward_resnet(image)

    def _forward_resnet(self, image: Tensor) -> tuple[Tensor, ...]:
        v = self.visual
        x2 = v.layer2(v.layer1(v.stem(image)))  # (B, 8w, H/8, W/8)
        x3 = v.layer3(x2)  # (B, 16w, H/16, W/16)
        x4 = v.layer4(x3)  # (B, 32w, H/32, W/32)
        z_bar, z = self._attention_pool(x4)
        return x2, x3, x4, z, z_bar

    def _attention_pool(self, x4: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. (1): [z_bar, z] = MHSA([mean(x4), x4]), open_clip's AttentionPool2d keeping the
        spatial outputs (CLIP keeps only the first)."""
        pool = self.visual.attnpool
        h, w = x4.shape[-2:]
        tokens = x4.flatten(2).transpose(1, 2)  # (B, h*w, C)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1)  # [mean(x4), x4]
        tokens = tokens + resize_pos_embed(pool.positional_embedding, (h, w)).to(tokens.dtype)
        split = lambda t: t.unflatten(-1, (pool.num_heads, -1)).transpose(1, 2)  # (B, nh, T, hs)
        out = torch.nn.functional.scaled_dot_product_attention(
            split(pool.q_proj(tokens)), split(pool.k_proj(tokens)), split(pool.v_proj(tokens)))
        out = pool.c_proj(out.transpose(1, 2).flatten(2))  # (B, 1 + h*w, D)
        z = out[:, 1:].transpose(1, 2).unflatten(2, (h, w))  # (B, D, h, w)
        return out[:, 0], z

    def _forward_vit(self, image: Tensor) -> tuple[Tensor, ...]:
        v = self.visual
        x = v.conv1(image)  # (B, width, h, w), h = H // patch
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, width)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + resize_pos_embed(v.positional_embedding, (h, w)).to(x.dtype)
        x = v.ln_pre(x)  # (B, 1 + h*w, width)
        to_map = lambda t: t[:, 1:].transpose(1, 2).unflatten(2, (h, w))  # (B, width, h, w)
        stages = {}
        for i, block in enumerate(v.transformer.resblocks, start=1):
            x = block(x)
            if i in self.vit_blocks:
                stages[i] = to_map(x)
        x2, x3, x4 = (stages[i] for i in self.vit_blocks)
        x = v.ln_post(x) @ v.proj  # (B, 1 + h*w, D)
        return x2, x3, x4, to_map(x), x[:, 0]
