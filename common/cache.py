"""Frozen-encoder feature cache: compute a frozen encoder's features once per image (and once per
sentence), keep them on disk (fp16 by default; bf16, or int8 with one scale per channel, half the
size, see `STORAGE`), and train or evaluate the rest of the model from them.

A model supports the cache when it follows the contract of `common.model.CacheableEncoders`:
  frozen_parts() -> set of "image" / "text" whose encoders are frozen,
  encode_image(image) -> dict of (B, ...) tensors, encode_text(text, text_mask) -> dict of
  (B, L, ...) tensors (token axis second), and
  forward(..., image_feats=None, text_feats=None) that uses them instead of the encoders.

Layout: ROOT/<part>/<fingerprint>[-bf16|-int8]/<key>.pt, one torch file per image or sentence,
written to a temporary name and renamed, so a run killed mid-write leaves no half entry (it is
recomputed); an unreadable entry is recomputed too. The fingerprint hashes everything the features
depend on: the encoder's weights, the model config fields that shape the encoder, the
preprocessing (InputSpec: size, resize, mean/std) and, for text, the tokenizer. Entries are
loaded memory-mapped.
Once every image of a split is cached (`holds`), train.py reads that split without its images
(data.cached_splits). `frozen_features` is what the training step and evaluation call.
`python -m common.cache_error` measures what each storage costs in accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings

import torch
from torch import Tensor

from common.checkpoint import payload_sha256


def state_hash(module: torch.nn.Module) -> str:
    """SHA-1 of a module's weights (names, shapes and bytes)."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(model, part: str) -> str:
    encoder = model.image_encoder if part == "image" else model.text_encoder
    tok = model.tokenizer
    described = {
        "model": type(model).__name__,
        "config": {k: v for k, v in dataclasses.asdict(model.cfg).items()
                   if k not in ("image_weights", "text_weights", "lr", "epochs", "batch_size")},
        "weights": state_hash(encoder),
        "input": dataclasses.asdict(model.input_spec) if part == "image" else
        {"tokenizer": type(tok).__name__, "max_len": tok.max_len,
         "vocab": getattr(tok, "vocab_path", None)},
    }
    return hashlib.sha1(
        json.dumps(described, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


STORAGE = ("fp16", "bf16", "int8")  # how an entry's tensors are kept on disk


def pack(t: Tensor, storage: str) -> Tensor | dict[str, Tensor]:
    """A feature tensor (..., C) as stored: fp16 / bf16, or int8 with one symmetric scale per
    channel (the last axis; the scale is rounded to fp16 before quantising, so that `unpack`
    inverts exactly what was rounded)."""
    t = t.detach().to("cpu", torch.float32)
    if storage == "int8":
        dims = tuple(range(t.dim() - 1))
        scale = (t.abs().amax(dim=dims, keepdim=True) / 127).clamp_min(1e-8).half()
        return {"q": torch.round(t / scale.float()).clamp(-127, 127).to(torch.int8),
                "scale": scale}
    return t.to(torch.float16 if storage == "fp16" else torch.bfloat16).contiguous()


def unpack(stored: Tensor | dict[str, Tensor]) -> Tensor:
    """A stored tensor back in fp32."""
    if isinstance(stored, dict):
        return stored["q"].float() * stored["scale"].float()
    return stored.float()


def _safe_key(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()


class FeatureCache:
    """Caches the features of a model's frozen encoders (see module docstring)."""

    def __init__(self, root: str, model, storage: str = "fp16"):
        missing = [f for f in ("frozen_parts", "encode_image", "encode_text")
                   if not hasattr(model, f)]
        if missing:
            raise ValueError(f"{type(model).__name__} does not support the feature cache "
                             f"(needs {missing})")
        self.parts = sorted(model.frozen_parts())
        if not self.parts:
            raise ValueError(
                f"{type(model).__name__}: no encoder is frozen, so its features change during "
                "training and cannot be cached; give pretrained weights or --freeze-encoders")
        if storage not in STORAGE:
            raise ValueError(f"cache storage {storage!r}: one of {STORAGE}")
        self.storage = storage
        suffix = "" if storage == "fp16" else f"-{storage}"  # fp16: the folders of older caches
        self.dirs = {p: os.path.join(root, p, fingerprint(model, p) + suffix)
                     for p in self.parts}
        for d in self.dirs.values():
            os.makedirs(d, exist_ok=True)
        self.hits = self.misses = 0

    def _load(self, path: str) -> dict[str, Tensor] | None:
        """An entry, or None when it is missing or damaged (unreadable, or its tensors do not
        hash to the sha256 stored with them): a damaged entry is removed, said, and recomputed
        from the image (a run reading without images then reads them again)."""
        if not os.path.isfile(path):
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if entry.pop("sha256") != payload_sha256(entry):
                raise ValueError("checksum mismatch")
            return entry
        except Exception as err:  # a disk error, a flipped bit, a foreign file
            warnings.warn(f"feature cache entry {path} is damaged ({type(err).__name__}: "
                          f"{err}): removed, it is recomputed", stacklevel=2)
            os.remove(path)
            return None

    def _store(self, path: str, feats: dict[str, Tensor]) -> None:
        tmp = f"{path}.tmp.{os.getpid()}"
        torch.save(dict(feats, sha256=payload_sha256(feats)), tmp)
        os.replace(tmp, path)

    def _path(self, part: str, key: str) -> str:
        return os.path.join(self.dirs[part], _safe_key(key) + ".pt")

    def holds(self, part: str, keys) -> bool:
        """Whether the cache has an entry for every key (e.g. every image of a dataset): a
        loader may then stop reading those images."""
        return all(os.path.isfile(self._path(part, k)) for k in keys)

    def _lookup(self, part: str, keys: list[str], compute) -> list[dict[str, Tensor]]:
        paths = [self._path(part, k) for k in keys]
        entries = [self._load(p) for p in paths]
        todo = [i for i, e in enumerate(entries) if e is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            with torch.no_grad():
                fresh = compute(todo)
            for j, i in enumerate(todo):
                entries[i] = {k: pack(v[j], self.storage) for k, v in fresh.items()}
                self._store(paths[i], entries[i])  # used as stored, as if read back
        return entries

    def features(self, model, batch: dict) -> dict[str, dict[str, Tensor]]:
        """{"image_feats": ..., "text_feats": ...} for the frozen parts, on the batch's device."""
        device = batch["text"].device
        out = {}
        if "image" in self.parts:
            def encode(idx):
                if batch.get("image") is None:  # read without images: the cache must hold all
                    missing = [batch["image_key"][i] for i in idx]
                    raise RuntimeError(
                        f"the feature cache has no entry for {missing} (removed or damaged) "
                        "and the batch was read without its images. Run again with --resume "
                        "auto: the split is then read with its images and the entries are "
                        "recomputed")
                return model.encode_image(batch["image"][idx])

            entries = self._lookup("image", batch["image_key"], encode)
            out["image_feats"] = {k: torch.stack([unpack(e[k]) for e in entries]).to(device)
                                  for k in entries[0]}
        if "text" in self.parts:
            lengths = batch["text_mask"].sum(1).tolist()

            def encode(idx):
                L = max(lengths[i] for i in idx)
                feats = model.encode_text(batch["text"][idx, :L], batch["text_mask"][idx, :L])
                return feats

            entries = self._lookup("text", [f"{len(s)}:{s}" for s in batch["sentence"]], encode)
            L = batch["text"].shape[1]
            text_feats = {}
            for k in entries[0]:
                rows = []
                for e, n in zip(entries, lengths):
                    v = unpack(e[k])[:n]  # the sentence's own tokens; padding is zeros
                    rows.append(torch.cat([v, v.new_zeros(L - n, *v.shape[1:])]))
                text_feats[k] = torch.stack(rows).to(device)
            out["text_feats"] = text_feats
        return out


@torch.no_grad()
def storage_error(model, batch: dict, storages=STORAGE) -> dict[str, dict[str, float]]:
    """What storing the frozen encoders' features changes, for each storage: the features'
    relative L2 error, the loss's relative change and the share of pixels whose predicted mask
    flips, against fp32 features, on `batch` (the model in eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    feats = {"image_feats": model.encode_image(batch["image"]),
             "text_feats": model.encode_text(batch["text"], batch["text_mask"])}
    ref = model(**model.inputs_from(batch), **feats, target=batch["mask"])
    report = {}
    for storage in storages:
        stored = {part: {k: torch.stack([unpack(pack(x, storage)) for x in v]).to(v.device)
                         for k, v in f.items()} for part, f in feats.items()}
        out = model(**model.inputs_from(batch), **stored, target=batch["mask"])
        report[storage] = {
            "feature_rel_error": max(((stored["image_feats"][k] - v).norm() / v.norm()).item()
                                     for k, v in feats["image_feats"].items()),
            "loss_rel_change": abs(out["loss"].item() / ref["loss"].item() - 1),
            "pixels_flipped": ((out["mask_logits"] > 0) != (ref["mask_logits"] > 0))
            .float().mean().item()}
    model.train(was_training)
    return report


def frozen_features(raw, batch: dict, cache=None) -> dict:
    """Features of frozen encoders that the forward should not compute itself: from the feature
    cache; else, when samples of the batch share an image (equal `image_key`, see
    TrainSampler's k), a frozen image encoder's, computed once per distinct image."""
    if cache is not None:
        return cache.features(raw, batch)
    keys = batch.get("image_key")
    if (batch.get("image") is None or not keys or len(set(keys)) == len(keys)
            or "image" not in getattr(raw, "frozen_parts", set)()):
        return {}
    return {"image_feats": raw.encode_distinct_images(batch["image"], keys)}
