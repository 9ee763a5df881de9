"""Pretrained encoders, built offline.

Every builder takes `weights`: a local file (or folder) to load, or None for random weights.
Random weights are announced once per encoder kind (`warn_random`). No code path downloads.
A load prints one line (file, tensors loaded / expected, into what) and fails with a ValueError
naming every missing or unexpected tensor beyond a stated allowance (the parts of the file the
encoder does not build: `load_checked`, `load_hf_folder`, `load_darknet_binary`). Each image
encoder declares the input statistics its weights expect as `pixel_mean`, `pixel_std` (0-1 scale).

Shapes: B batch, C channels, h w feature map, L tokens.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.layers import sine_pos_2d
from common.model import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SAM_MEAN, SAM_STD

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


@torch.no_grad()
def sine_init_(table: Tensor) -> Tensor:
    """Fill a learned position table of a square patch grid, (g*g, C) in row-major order (any
    view of one), with the fixed 2-D sine encoding, in place. Used when an encoder is trained
    from scratch: its position embedding then starts out spatially ordered, as MAE's fixed one
    is, instead of as noise to be sorted out first. Measured after 750 steps, one run each
    (run-to-run spread is about as large): MARIS tiny val mIoU 0.524 vs 0.514 with
    trunc_normal(0.02), MaIL tiny 0.461 vs 0.444."""
    n, c = table.shape
    g = round(n**0.5)
    if g * g != n:
        raise ValueError(f"a position table of {n} rows is not a square grid")
    return table.copy_(sine_pos_2d(g, g, c))


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive (how OpenAI publishes CLIP) is a zip holding constants.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in z.namelist())


def load_state_dict_file(path: str) -> dict[str, Tensor]:
    """Read a weight file safely: a torch.save'd state dict (`weights_only=True`; also nested
    under "state_dict"/"model"/"module", names with DDP's "module."), a .safetensors file, or a
    TorchScript archive (OpenAI CLIP; only its state dict is used, its forward never runs).
    Returns the tensors by name."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path!r}")
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation
                obj = torch.jit.load(path, map_location="cpu").state_dict()
        elif path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read weights from {path!r}: {err}") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, Tensor)}


def _names(names: list[str], most: int = 12) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return f"{names[:most]}{more}"


def load_checked(module: nn.Module, state: dict[str, Tensor], source: str, what: str,
                 prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Load `state[prefix + name]` into every tensor `name` of `module`, or fail naming why.

    The allowance: file tensors whose names start with one of `skip` (parts of the file the
    encoder does not build, e.g. SAM's mask decoder, CLIP's other tower) are not used, and
    BatchNorm's `num_batches_tracked` counters (which never change an output) are neither
    required nor counted. Any other missing or unused tensor is a ValueError that lists them;
    so is a shape mismatch. Prints one line: the file, tensors loaded / expected, into what.
    """
    counter = "num_batches_tracked"
    own = {k: v for k, v in module.state_dict().items() if not k.endswith(counter)}
    used = {k: v for k, v in state.items() if not k.startswith(skip) and not k.endswith(counter)}
    sub = {k[len(prefix):]: v for k, v in used.items() if k.startswith(prefix)}
    missing = [prefix + k for k in own if k not in sub]
    unexpected = [k for k in used if not k.startswith(prefix) or k[len(prefix):] not in own]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not hold the {what}: {len(missing)} tensors missing "
            f"{_names(missing)}, {len(unexpected)} unexpected {_names(unexpected)}"
            + (f" (besides those under {list(skip)}, which it does not use)" if skip else ""))
    bad = [(k, tuple(sub[k].shape), tuple(v.shape)) for k, v in own.items()
           if sub[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: shape mismatch (name, file, model): {bad[:4]}")
    counters = {k: v for k, v in state.items() if k.startswith(prefix) and k.endswith(counter)}
    module.load_state_dict(sub | {k[len(prefix):]: v for k, v in counters.items()}, strict=False)
    unused = sum(k.startswith(skip) for k in state)
    note = f" ({unused} tensors of parts it does not build left out)" if unused else ""
    print(f"loaded {source}: {len(own)}/{len(own)} tensors into {what}{note}")


def load_hf_folder(model_cls, folder: str, what: str, **kwargs) -> nn.Module:
    """`model_cls.from_pretrained` on a local Hugging Face folder, with the same allowance and
    one line as `load_checked`: task heads (names outside the base model, e.g. BERT's "cls.",
    ViLT's "mlm_score.") and the pooler are not used; anything else missing or unused fails."""
    from transformers.utils import logging as hf_logging

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} weights must be a local Hugging Face folder "
                                f"(config.json + weights), not {folder!r}")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report and progress bars: we print one line
    hf_logging.disable_progress_bar()
    try:
        model, info = model_cls.from_pretrained(folder, local_files_only=True,
                                                output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    base = {k.split(".")[0] for k in model.state_dict()} | {model.base_model_prefix}
    inside = lambda k: k.split(".")[0] in base and "pooler." not in k
    missing = sorted(info["missing_keys"])
    unexpected = sorted(k for k in info["unexpected_keys"] if inside(k))
    if missing or unexpected or info["mismatched_keys"]:
        raise ValueError(
            f"{folder} does not hold the {what}: {len(missing)} tensors missing "
            f"{_names(missing)}, {len(unexpected)} unexpected {_names(unexpected)}, "
            f"shape mismatches {_names(sorted(info['mismatched_keys']))}")
    n = len(model.state_dict())
    print(f"loaded {folder}: {n}/{n} tensors into {what}")
    return model


# ---------------------------------------------------------------------------------------------
# SAM image encoder (Kirillov et al. 2023), through segment-anything
# ---------------------------------------------------------------------------------------------

# segment-anything's build_sam.py settings; "tiny" is this library's CPU-sized variant with the
# same structure (windowed blocks and four global-attention blocks; two windowed blocks, not
# eight as in depth 8: a MARIS tiny step 0.28 s instead of 0.40 s at batch 8 on one CPU thread)
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


# ---------------------------------------------------------------------------------------------
# CLIP text encoder (Radford et al. 2021), through open_clip
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# ViLT single-stream transformer (Kim et al. 2021), through transformers (MaIL)
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# M3Dec: Darknet-53 (Redmon & Farhadi 2018) and a bi-directional GRU over word embeddings
# (GloVe, Pennington et al. 2014) for the CNN setting; Swin-B (Liu et al. 2021, torchvision) and
# BERT-base (Devlin et al. 2019, transformers) for the transformer setting
# ---------------------------------------------------------------------------------------------

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


def load_glove(weight: Tensor, vocab, path: str) -> int:
    """Copy the GloVe vector of every vocabulary word found in a GloVe text file ("word v1 ...
    vD" per line) into its row of `weight` (V, D); returns how many were found."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GloVe file not found: {path!r}")
    index = {w: i for i, w in enumerate(vocab) if i > 0}  # row 0 is padding
    dim, found = weight.shape[1], 0
    with open(path, encoding="utf-8", errors="replace") as f, torch.no_grad():
        for line in f:
            word, *values = line.rstrip().rsplit(" ", dim)  # some GloVe words contain spaces
            if word in index:
                if len(values) != dim:
                    raise ValueError(f"{path!r}: {word!r} has {len(values)} values, but the "
                                     f"embeddings are {dim}-d")
                weight[index[word]] = torch.tensor([float(v) for v in values])
                found += 1
    if not found:
        raise ValueError(f"{path!r}: no word of the vocabulary found; not a GloVe text file?")
    print(f"loaded {path}: {found}/{len(index)} vocabulary words (the others start random)")
    return found


class GRUTextEncoder(nn.Module):
    """Word embeddings and a bi-directional GRU (the language encoder of MCN, VLT and M3Dec's
    CNN setting): per-word features and a sentence feature.

    Both directions are summed, as VLT does. Padding never reaches a real word: the backward GRU
    reads each sentence reversed within its own length, so padding only ever follows real words.

    Arguments:
      vocab: the word list of common.tokenizers.WordTokenizer ("<pad>" first).
      dim: hidden size of each direction (the model width C).
      word_dim: embedding size (300 for GloVe).
      weights: a GloVe text file (glove.840B.300d.txt); words it lacks, or all words when None,
        start random.
    Returns (forward): words (B, L, dim), zero on padding; sentence (B, dim), the final states of
      both directions summed; text_mask (B, L).
    """

    def __init__(self, vocab, dim: int, word_dim: int = 300, weights: str | None = None):
        super().__init__()
        self.embed = nn.Embedding(len(vocab), word_dim, padding_idx=0)
        self.fwd = nn.GRU(word_dim, dim, batch_first=True)
        self.bwd = nn.GRU(word_dim, dim, batch_first=True)
        self.dim = dim
        if weights is None:
            warn_random("word embeddings", "pass a GloVe text file such as glove.840B.300d.txt")
        else:
            load_glove(self.embed.weight, vocab, weights)

    def forward(self, ids: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, L = ids.shape
        lengths = text_mask.long().sum(1, keepdim=True)  # (B, 1)
        pos = torch.arange(L, device=ids.device)[None]  # (1, L)
        rev = torch.where(pos < lengths, lengths - 1 - pos, pos)  # reverses the real words only
        x = self.embed(ids)  # (B, L, word_dim)
        fwd, _ = self.fwd(x)  # (B, L, dim)
        bwd, _ = self.bwd(x.gather(1, rev[..., None].expand_as(x)))
        bwd = bwd.gather(1, rev[..., None].expand_as(fwd))  # back to word order
        words = (fwd + bwd) * text_mask[..., None]
        last = (lengths - 1).clamp(min=0)[..., None].expand(B, 1, self.dim)
        # the forward GRU ends at the last real word, the backward one at the first word
        sentence = fwd.gather(1, last)[:, 0] + bwd[:, 0]
        return words, sentence, text_mask


# torchvision's swin_b, and this library's CPU-sized variant with the same structure
SWIN_ARCHS = {"swin_b": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
              "tiny": dict(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])}


class SwinImageEncoder(nn.Module):
    """Swin Transformer from torchvision, returning the output of each of its four stages.

    Arguments:
      arch: "swin_b" (torchvision.models.swin_b, window 7) | "tiny" (window 4).
      weights: a state dict file of torchvision's swin_b (swin_b-68c6b09e.pth); None = random.
    Returns (forward): four maps (B, C_i, H / 2^(i+2), W / 2^(i+2)), C_i = `channels[i]`,
      channels first (torchvision's stages are channels last).
    """

    pixel_mean, pixel_std = IMAGENET_MEAN, IMAGENET_STD  # torchvision's swin_b was trained so

    def __init__(self, arch: str = "swin_b", weights: str | None = None):
        super().__init__()
        from torchvision.models import swin_b
        from torchvision.models.swin_transformer import SwinTransformer

        if arch not in SWIN_ARCHS:
            raise ValueError(f"unknown Swin arch {arch!r}; choose from {sorted(SWIN_ARCHS)}")
        if arch == "swin_b":
            net = swin_b(weights=None)
        else:
            net = SwinTransformer(patch_size=[4, 4], window_size=[4, 4], stochastic_depth_prob=0.0,
                                  **SWIN_ARCHS[arch])
        self.features = net.features  # patch embedding, then (stage, patch merging) x 3, stage
        self.channels = [SWIN_ARCHS[arch]["embed_dim"] * 2**i for i in range(4)]
        if weights is None:
            warn_random(f"Swin {arch}", "pass torchvision's swin_b state dict file")
        else:  # the file's final norm and classifier are not used
            load_checked(self, load_state_dict_file(weights), weights, f"Swin {arch}",
                         skip=("norm.", "head."))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)  # (B, h, w, C)
            if i % 2 == 1:  # the output of a stage
                feats.append(x.permute(0, 3, 1, 2))
        return feats


# bert-base(-uncased)'s architecture, and this library's CPU-sized variant
BERT_ARCHS = {"bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072),
              "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128)}


class BertTextEncoder(nn.Module):
    """BERT from transformers: per-token features and the [CLS] feature.

    Arguments:
      arch: "bert-base" | "tiny"; a weights folder must hold that architecture.
      weights: a local Hugging Face BERT folder (config.json, weights, vocab.txt; e.g. a download
        of bert-base-uncased), read with local_files_only; None = random.
      vocab_size: rows of the word-embedding table (the tokenizer's vocabulary).
    Returns (forward): words (B, L, dim), sentence (B, dim) the [CLS] token's, text_mask (B, L).
    """

    def __init__(self, arch: str = "bert-base", weights: str | None = None,
                 vocab_size: int = 30522):
        super().__init__()
        from transformers import BertConfig, BertModel

        if arch not in BERT_ARCHS:
            raise ValueError(f"unknown BERT arch {arch!r}; choose from {sorted(BERT_ARCHS)}")
        spec = BERT_ARCHS[arch]
        if weights is None:
            config = BertConfig(vocab_size=vocab_size, **spec)
            self.bert = BertModel(config, add_pooling_layer=False)
            warn_random(f"BERT {arch}", "pass a local Hugging Face BERT folder")
        else:
            if not os.path.isdir(weights):
                raise FileNotFoundError(f"BERT weights must be a local Hugging Face folder "
                                        f"(config.json + weights + vocab.txt), not {weights!r}")
            self.bert = load_hf_folder(BertModel, weights, f"BERT {arch}",
                                       add_pooling_layer=False)
            got = {k: getattr(self.bert.config, k) for k in spec} | dict(
                vocab_size=self.bert.config.vocab_size)
            if got != spec | dict(vocab_size=vocab_size):
                raise ValueError(f"{weights!r} holds a BERT with {got}, not the {arch!r} "
                                 f"architecture {spec} with the tokenizer's {vocab_size} words")
        self.dim = self.bert.config.hidden_size

    def forward(self, ids: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # a 4-D boolean mask (True: attend) is used as given; from a 2-D one transformers would
        # inspect the mask's values, which fails on the meta device
        mask = text_mask[:, None, None, :]  # (B, 1, 1, L)
        words = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        return words, words[:, 0], text_mask


# ---------------------------------------------------------------------------------------------
# MMNet: CLIP image encoder (Radford et al. 2021), ResNet or ViT, through open_clip
# ---------------------------------------------------------------------------------------------

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

