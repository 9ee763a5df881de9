"""Pretrained encoders, built offline.

Every builder takes `weights`: a local file (or folder) to load, or None for random weights.
Random weights are announced once per encoder kind (`warn_random`). No code path downloads.

Shapes: B batch, C channels, h w feature map, L tokens.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
from functools import partial

import torch
from torch import Tensor, nn

_warned: set[str] = set()
_quiet = False


def warn_random(kind: str, hint: str) -> None:
    """Say once per process that an encoder has random weights."""
    if _quiet or kind in _warned:
        return
    _warned.add(kind)
    warnings.warn(f"{kind}: no weights given, using random initialisation ({hint})", stacklevel=3)


@contextlib.contextmanager
def quiet_random_init():
    """Silence `warn_random`, e.g. when a checkpoint's state dict will replace the weights."""
    global _quiet
    old, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = old


def load_state_dict_file(path: str) -> dict[str, Tensor]:
    """Read a weight file safely (`weights_only=True`); TorchScript archives (OpenAI CLIP) too."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a TorchScript archive is not a pickle of tensors
        if zipfile.is_zipfile(path):
            try:
                obj = torch.jit.load(path, map_location="cpu").state_dict()
            except Exception:
                raise ValueError(f"cannot read weights from {path!r}: {err}") from err
        else:
            raise ValueError(f"cannot read weights from {path!r}: {err}") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, Tensor)}


def load_matching(module: nn.Module, state: dict[str, Tensor], prefix: str, source: str) -> None:
    """Load `state[prefix + name]` into `module`; every parameter of `module` must be found."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = [k for k in own if k not in sub]
    if missing:
        raise KeyError(f"{source}: {len(missing)} weights missing under {prefix!r}, e.g. {missing[:4]}")
    bad = [(k, tuple(sub[k].shape), tuple(v.shape)) for k, v in own.items() if sub[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: shape mismatch (name, file, model): {bad[:4]}")
    module.load_state_dict({k: sub[k] for k in own})


# ---------------------------------------------------------------------------------------------
# SAM image encoder (Kirillov et al. 2023), through segment-anything
# ---------------------------------------------------------------------------------------------

# segment-anything's build_sam.py settings; "tiny" is this library's CPU-sized variant with the
# same structure (windowed blocks with four global-attention blocks between them).
SAM_ARCHS = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "tiny": dict(embed_dim=64, depth=8, num_heads=2, global_attn_indexes=(1, 3, 5, 7),
                 patch_size=8, window_size=4),
}


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

    def __init__(self, arch: str = "vit_h", img_size: int = 1024,
                 global_blocks: tuple[int, ...] = (1, 2, 3), weights: str | None = None):
        super().__init__()
        from segment_anything.modeling.image_encoder import ImageEncoderViT

        if arch not in SAM_ARCHS:
            raise ValueError(f"unknown SAM arch {arch!r}; choose from {sorted(SAM_ARCHS)}")
        spec = dict(patch_size=16, window_size=14) | SAM_ARCHS[arch]
        self.out_indexes = [spec["global_attn_indexes"][i] for i in global_blocks]
        vit = ImageEncoderViT(
            img_size=img_size, patch_size=spec["patch_size"], embed_dim=spec["embed_dim"],
            depth=spec["depth"], num_heads=spec["num_heads"], mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=spec["global_attn_indexes"], window_size=spec["window_size"],
        )
        self.patch_embed, self.pos_embed = vit.patch_embed, vit.pos_embed
        self.blocks = vit.blocks[: max(self.out_indexes) + 1]
        self.dim, self.patch_size, self.img_size = spec["embed_dim"], spec["patch_size"], img_size
        if weights is None:
            # SAM initialises its absolute position embedding to zeros and loads it from the
            # checkpoint; trained from scratch it needs a random start to break symmetry.
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            warn_random(f"SAM {arch} image encoder", "pass a segment-anything checkpoint")
        else:
            if spec["patch_size"] != 16 or img_size != 1024:
                raise ValueError("segment-anything weights need patch 16 at img_size=1024")
            load_matching(self, load_state_dict_file(weights), "image_encoder.", weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.patch_embed(x) + self.pos_embed  # (B, h, w, C)
        feats = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.out_indexes:
                feats.append(x)
        return feats


# ---------------------------------------------------------------------------------------------
# CLIP text encoder (Radford et al. 2021), through open_clip
# ---------------------------------------------------------------------------------------------

TINY_CLIP_TEXT = dict(embed_dim=64, text_cfg=dict(context_length=77, vocab_size=49408, width=64,
                                                  heads=2, layers=2))


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
      arch: an open_clip config name ("ViT-B-16", "RN101", "ViT-L-14", ...) or "tiny".
      weights: an open_clip checkpoint or an OpenAI CLIP file (TorchScript); None = random.
      project: keep CLIP's text projection (needed for the EOS sentence feature in CLIP space).
    Returns (forward): words (B, L, width), sentence (B, embed_dim or width), text_mask (B, L).
    """

    def __init__(self, arch: str = "ViT-B-16", weights: str | None = None, project: bool = True):
        super().__init__()
        from open_clip.model import _build_text_tower

        cfg = clip_config(arch)
        quick_gelu = cfg.get("quick_gelu", False) or arch.endswith("quickgelu")
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
            state = load_state_dict_file(weights)
            if not project:
                state.pop("text_projection", None)
            load_matching(self, state, "", weights)

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

