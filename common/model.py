"""The contract every model in this library follows, so that `train.py`, `eval.py` and a user's
own code treat MaIL, MMNet, M3Dec and MARIS alike.

A model module (`maris.py`, ...) defines a config dataclass, `CONFIGS` (at least "paper" and
"tiny") and `MODEL`, the model class, a subclass of `RISModel`. The model

- declares its preprocessing in `input_spec` (an `InputSpec`) and its `tokenizer`;
- names the batch entries its `forward` takes in `input_names` (always image, text, text_mask;
  MaIL adds cand_masks, cand_valid; every model accepts image_mask, True on real pixels), and
  in `input_names_for(cfg)` those of one config before it is built (MaIL's Tab. 2 variant 1
  reads no candidates: train.py then asks for no proposals);
- `forward(..., target=None)` returns a dict with "mask_logits" (B, 1, H, W) at the input
  resolution, the auxiliary outputs its losses need and, when `target` (B, 1, H, W) is given,
  "loss" plus one "loss_<term>" entry per term of the paper's loss;
- `configure_optimizers(lr, total_steps)` returns the paper's optimiser and a per-step scheduler;
- may override `vis_panels(out, i)` to add paper-specific panels to eval.py's visualisations.

Two helpers for models whose encoders may be frozen: `freeze_encoders` (the `freeze_encoders`
config field's policy) and `CacheableEncoders` (what `common.cache` needs to store features).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# segment-anything's pixel statistics, given on the 0-255 scale (build_sam.py), here on 0-1
SAM_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)


@dataclass(frozen=True)
class InputSpec:
    """How images must be prepared for a model. data.py, eval.py and user code all read this.

    resize:
      "square":  stretch to size x size (aspect not kept).
      "longest": longest side to `size`, aspect kept, pad bottom-right to size x size (SAM).
      "shorter": shorter side to `size`, longer side at most `max_size`, aspect kept, pad
                 bottom-right to a multiple of `pad_multiple` (ViLT); sizes vary per image and
                 the collate function pads a batch to its largest image.
    Padding is zeros after normalisation; `image_mask` in the batch marks the real pixels.
    """

    size: int
    resize: str = "square"
    max_size: int | None = None
    pad_multiple: int = 1
    mean: tuple[float, float, float] = IMAGENET_MEAN  # on the 0-1 scale
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.resize not in ("square", "longest", "shorter"):
            raise ValueError(f"unknown resize mode {self.resize!r}")
        if self.resize == "shorter" and self.max_size is None:
            raise ValueError('resize="shorter" needs max_size')

    def resized_hw(self, h: int, w: int) -> tuple[int, int]:
        """Size (h, w) an image of size (h, w) takes inside the padded canvas."""
        if self.resize == "square":
            return self.size, self.size
        if self.resize == "longest":
            scale = self.size / max(h, w)
        else:
            scale = min(self.size / min(h, w), self.max_size / max(h, w))
        return max(1, round(h * scale)), max(1, round(w * scale))

    def canvas_hw(self, h: int, w: int) -> tuple[int, int]:
        """Padded size of one image (before batch padding)."""
        if self.resize in ("square", "longest"):
            return self.size, self.size
        rh, rw = self.resized_hw(h, w)
        m = self.pad_multiple
        return -(-rh // m) * m, -(-rw // m) * m


class RISModel(nn.Module):
    """Base class of the four models: holds the parts of the contract that are not
    paper-specific.
    """

    input_names: tuple[str, ...] = ("image", "text", "text_mask")
    input_spec: InputSpec
    tokenizer: object  # common.tokenizers.*: sentence -> (ids, truncated)

    @classmethod
    def input_names_for(cls, cfg) -> tuple[str, ...]:
        """The batch entries `forward` takes with config `cfg`: `input_names`, unless an
        ablation reads fewer (MaIL without the mask modality reads no candidates)."""
        return cls.input_names

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def train(self, mode: bool = True):
        """Like nn.Module.train, but frozen encoders (see `freeze`) stay in eval mode."""
        super().train(mode)
        for m in self.modules():
            if getattr(m, "frozen", False):
                m.eval()
        return self

    def vis_panels(self, out: dict[str, Tensor], i: int) -> list[tuple[str, Tensor]]:
        """Extra (title, map (h, w) in [0, 1]) panels for sample i of a batch; none by default."""
        return []

    def inputs_from(self, batch: dict) -> dict:
        """The batch entries `forward` takes (see `input_names`)."""
        # a batch read without its images (every image feature cached) passes image=None
        inputs = {k: batch.get(k) if k == "image" else batch[k] for k in self.input_names}
        if "image_mask" in batch:
            inputs["image_mask"] = batch["image_mask"]
        return inputs


def config_from_dict(default, values: dict):
    """Rebuild a config dataclass from a dict (a checkpoint's), naming any unknown field."""
    fields = {f.name for f in dataclasses.fields(default)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(
            f"config fields {unknown} are not fields of {type(default).__name__} "
            "(was the checkpoint written by another model or version?)"
        )
    values = {k: tuple(v) if isinstance(getattr(default, k), tuple) else v
              for k, v in values.items()}
    return dataclasses.replace(default, **values)


def check_choices(cfg, choices: dict[str, tuple]) -> None:
    """Refuse a config whose field takes a value outside its choices {field: allowed values}."""
    for field, allowed in choices.items():
        if getattr(cfg, field) not in allowed:
            raise ValueError(f"{field} must be one of {allowed}, not {getattr(cfg, field)!r}")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def freeze(module: nn.Module) -> nn.Module:
    """Freeze parameters; RISModel.train() keeps a frozen module in eval mode (BN, dropout)."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.frozen = True
    return module.eval()


def freeze_encoders(owner: str, encoders: dict[str, tuple[nn.Module, str | None]],
                    policy: bool | None) -> None:
    """Apply a `freeze_encoders` config field to {name: (encoder, weights path or None)}.

    policy True freezes every encoder, False trains every one, None freezes an encoder iff its
    weights are given (a frozen random encoder carries no information). Training an encoder with
    random weights warns, since every paper here starts from pretrained ones.
    """
    for name, (encoder, weights) in encoders.items():
        if policy if policy is not None else weights is not None:
            freeze(encoder)
        elif weights is None:
            warnings.warn(f"{owner}: the {name} encoder has random weights, so it is trained "
                          "(the papers start from pretrained encoders)", stacklevel=3)


class CacheableEncoders:
    """Mixin for a RISModel whose frozen encoders' features `common.cache` may store: the cache's
    contract. The model has `image_encoder` and `text_encoder`, implements

      encode_image(image (B, 3, H, W)) -> dict of (B, ...) tensors,
      encode_text(text (B, L), text_mask (B, L)) -> dict of (B, L, ...) tensors (token axis 2nd),

    and its forward takes `image_feats=None, text_feats=None` (those dicts, cached) and gets its
    features through `encoded`. Only the parts named by `frozen_parts` are ever cached or shared
    between the samples of a batch that show one image (`encode_distinct_images`).
    """

    def frozen_parts(self) -> set[str]:
        """"image" / "text" for each encoder that `freeze` froze: its features never change."""
        return {part for part in ("image", "text")
                if getattr(getattr(self, f"{part}_encoder"), "frozen", False)}

    def encode_image(self, image: Tensor) -> dict[str, Tensor]:
        """Abstract: the frozen image encoder's features, by name (a model using the cache
        defines it; MARIS: F_v1..F_v3)."""
        raise NotImplementedError

    def encode_text(self, text: Tensor, text_mask: Tensor) -> dict[str, Tensor]:
        """Abstract: the frozen text encoder's features, by name (MARIS: F_l)."""
        raise NotImplementedError

    def encode_distinct_images(self, image: Tensor, keys: list[str]) -> dict[str, Tensor]:
        """encode_image for a batch whose samples may show the same image (equal keys, e.g.
        several sentences of one image): each distinct image is encoded once and its features
        are indexed for every sample that shows it. Exact: a frozen encoder's features do not
        depend on the rest of the batch."""
        distinct = list(dict.fromkeys(keys))  # in order of first appearance
        slot = {k: j for j, k in enumerate(distinct)}
        with torch.no_grad():
            feats = self.encode_image(image[[keys.index(k) for k in distinct]])
        index = torch.tensor([slot[k] for k in keys], device=image.device)
        return {name: f[index] for name, f in feats.items()}

    def encoded(self, image: Tensor, text: Tensor, text_mask: Tensor,
                image_feats: dict[str, Tensor] | None,
                text_feats: dict[str, Tensor] | None) -> tuple[dict, dict]:
        """The encoders' features: the cached ones where given, computed now otherwise."""
        if image_feats is None:
            if image is None:
                raise ValueError(f"{type(self).__name__}: no image and no image_feats")
            image_feats = self.encode_image(image)
        if text_feats is None:
            text_feats = self.encode_text(text, text_mask)
        return image_feats, text_feats
