"""Data: RefCOCO / RefCOCO+ / G-Ref in the REFER format, the built-in synthetic `shapes` data,
preprocessing driven by a model's `InputSpec` and tokenizer, and batching.

A raw sample (what a dataset's __getitem__ returns) is a dict:
  image        uint8 (H, W, 3) RGB, the image as the user sees it
  sentence     str, the referring expression
  mask         bool (H, W), the referred object
  instances    bool (K, H, W), MaIL's candidate masks, only for a model that takes candidates
               (build_dataset's `candidates`): the annotated objects (the oracle), a simulated
               detector's or a proposals file's masks
  target_index int, index of the referred object in `instances` (-1 if absent or no instances)
  image_id     int
  image_key    str, names the image and how it was generated (the feature cache's key; a
               prepared sample flipped by augmentation adds "|hflip")
  image_hw     (H, W), only in a sample read without its image (build_dataset's images=False:
               a run whose frozen image encoder's features all come from common.cache)
A prepared sample (Preprocess) holds tensors at the model's input resolution, the image still
uint8; `collate` pads them into a batch; `to_device` moves a batch to the model's device and
normalises its images there. Predictions go back to the original resolution with `to_original`.

Shapes: B batch, K candidates, L tokens, H W input size, H0 W0 original size.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from common.model import InputSpec

# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


class ImageError(OSError):
    """An image file exists but cannot be decoded (truncated, corrupt, not an image)."""


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 (H, W, 3) RGB.

    16-bit and 32-bit grey images are scaled to 8 bits (not clipped); images with transparency
    are composited on white, the way most viewers show them; CMYK, palette and grey convert.
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def load_image(path: str, exif: bool = False) -> np.ndarray:
    """Read an image as uint8 RGB (H, W, 3), in the orientation its pixels are stored in.

    exif=True turns it the way its EXIF orientation tag says, as photo viewers show it: only for a
    user's own photo (eval.py's single-image prediction), whose mask must match what the user
    sees. Dataset images keep exif=False: COCO's polygons are drawn on the stored pixels, and an
    orientation tag that rotates by 180 degrees, mirrors, or turns a square image would otherwise
    move the image under its masks without changing its size.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path!r}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here with its name
            if exif:
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot decode image {path!r}: {err}") from err


# ---------------------------------------------------------------------------------------------
# REFER format: RefCOCO, RefCOCO+, G-Ref
# ---------------------------------------------------------------------------------------------

SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}

REFER_LAYOUT = """expected layout:
  DATA_ROOT/refcoco/refs(unc).p        DATA_ROOT/refcoco/instances.json
  DATA_ROOT/refcoco+/refs(unc).p       DATA_ROOT/refcoco+/instances.json
  DATA_ROOT/refcocog/refs(umd).p       DATA_ROOT/refcocog/refs(google).p
  DATA_ROOT/refcocog/instances.json
  DATA_ROOT/images/train2014/COCO_train2014_000000000009.jpg ...  (or --image-dir DIR)"""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a class or function: refused (REFER refs hold none)."""


class _PlainUnpickler(pickle.Unpickler):
    """Accepts only plain containers and scalars: REFER pickles hold nothing else, and a pickle
    that asks for any class or function (the way malicious pickles run code) is refused."""

    def find_class(self, module: str, name: str):
        raise UnsafePickleError(
            f"refusing to load {module}.{name}: a REFER refs file holds only lists, dicts, "
            "strings and numbers"
        )


def load_refs(path: str) -> list[dict]:
    """Read a REFER `refs(<split_by>).p` (written by Python 2: latin1 strings) safely."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"REFER refs file not found: {path!r}\n{REFER_LAYOUT}")
    try:
        with open(path, "rb") as f:
            refs = _PlainUnpickler(f, encoding="latin1").load()
    except UnsafePickleError:
        raise
    except Exception as err:  # truncated or not a pickle at all
        raise ValueError(f"corrupt REFER refs file {path!r}: {type(err).__name__}: {err}") from err
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{path!r} is not a REFER refs file (expected a list of dicts)")
    return refs


def read_json(path: str, what: str, help_text: str):
    """A JSON file, or an error naming the path and what was expected (`help_text`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}\n{help_text}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt {what} {path!r}: {err}\n{help_text}") from err


def load_instances(path: str) -> dict:
    data = read_json(path, "COCO instances file", REFER_LAYOUT)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise ValueError(f"{path!r} is not a COCO instances file (needs 'images', 'annotations')")
    return data


MIN_POLYGON_COORDS = 6  # three (x, y) points: anything less encloses no area


def decode_segmentation(segm, h: int, w: int) -> np.ndarray:
    """COCO polygons or RLE -> bool (h, w). Overlapping polygons sum, so binarise with > 0.

    A polygon with fewer than 6 coordinates (a point or a line, found in some COCO annotations)
    covers no pixel: it is skipped, and an annotation made only of such polygons decodes to an
    empty mask. (pycocotools cannot decode them: it reads 4 numbers as a box, fewer as an error.)
    """
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):  # polygons
        polygons = [p for p in segm if len(p) >= MIN_POLYGON_COORDS]
        if not polygons:
            return np.zeros((h, w), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, h, w)
    else:  # compressed RLE
        rle = dict(segm, counts=segm["counts"].encode() if isinstance(segm["counts"], str)
                   else segm["counts"])
    m = mask_utils.decode(rle)
    if m.ndim == 3:
        m = m.max(axis=2)
    return m > 0


class ReferDataset(Dataset):
    """One sample per (referred object, sentence) of a REFER split.

    Arguments:
      root: DATA_ROOT (see REFER_LAYOUT); dataset: refcoco | refcoco+ | refcocog;
      split_by: unc | umd | google; split: e.g. val, testA; image_dir: overrides
      DATA_ROOT/images/train2014; instances: decode the image's annotated objects into
      `instances` (MaIL's oracle candidates). Without it only the referred object's mask is
      decoded, and samples carry no `instances` (target_index -1); images: read each image (else
      samples carry its size, `image_hw`, from instances.json, and the file is not opened).
    Refs without sentences are skipped and counted in `skipped_refs`. COCO crowd annotations
    (iscrowd=1: a region of many objects, e.g. "people") are never instances, except the referred
    object itself, which always is one (the referred object decides the sample, crowd or not).
    Images are read in their stored orientation (load_image: the polygons are drawn on it).
    """

    def __init__(self, root: str, dataset: str = "refcoco", split: str = "val",
                 split_by: str | None = None, image_dir: str | None = None,
                 instances: bool = True, images: bool = True):
        split_by = split_by or DEFAULT_SPLIT_BY.get(dataset)
        if (dataset, split_by) not in SPLITS:
            raise ValueError(f"unknown dataset/split_by {dataset}/{split_by}; "
                             f"known: {list(SPLITS)}")
        if split not in SPLITS[dataset, split_by]:
            raise ValueError(f"{dataset} ({split_by}) has splits {SPLITS[dataset, split_by]}, "
                             f"not {split!r}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data root not found: {root!r}\n{REFER_LAYOUT}")
        self.image_dir = image_dir or os.path.join(root, "images", "train2014")
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"image folder not found: {self.image_dir!r}\n{REFER_LAYOUT}")
        refs = load_refs(os.path.join(root, dataset, f"refs({split_by}).p"))
        inst = load_instances(os.path.join(root, dataset, "instances.json"))
        self.anns = {a["id"]: a for a in inst["annotations"]}
        self.images = {im["id"]: im for im in inst["images"]}
        self.anns_of_image: dict[int, list[int]] = defaultdict(list)
        for a in inst["annotations"]:
            self.anns_of_image[a["image_id"]].append(a["id"])
        self.samples: list[tuple[int, int, str]] = []  # (image_id, ann_id, sentence)
        self.skipped_refs = 0
        for ref in refs:
            if ref.get("split") != split:
                continue
            sents = [s.get("sent") or s.get("raw") or "" for s in ref.get("sentences") or []]
            sents = [s for s in sents if s.strip()]
            if not sents or ref["ann_id"] not in self.anns:
                self.skipped_refs += 1
                continue
            self.samples += [(ref["image_id"], ref["ann_id"], s) for s in sents]
        self.name = f"{dataset}({split_by})/{split}"
        self.with_instances, self.with_images = instances, images

    def __len__(self) -> int:
        return len(self.samples)

    def sentence(self, i: int) -> str:
        """Sample i's sentence, without reading its image."""
        return self.samples[i][2]

    def image_key(self, i: int) -> str:
        """Sample i's `image_key`, without reading anything."""
        return f"coco/{self.samples[i][0]}"

    def image_path(self, image_id: int) -> str:
        name = (self.images.get(image_id, {}).get("file_name")
                or f"COCO_train2014_{image_id:012d}.jpg")
        return os.path.join(self.image_dir, name)

    def __getitem__(self, i: int) -> dict:
        image_id, ann_id, sentence = self.samples[i]
        info = self.images[image_id]
        h, w = info["height"], info["width"]
        sample = dict(sentence=sentence, target_index=-1, image_id=image_id,
                      image_key=self.image_key(i))
        if self.with_images:
            path = self.image_path(image_id)
            image = load_image(path, exif=False)  # the stored orientation, which polygons use
            if image.shape[:2] != (h, w):
                raise ImageError(f"{path!r} is {image.shape[1]}x{image.shape[0]}, but "
                                 f"instances.json says {w}x{h}")
            sample["image"] = image
        else:
            sample["image_hw"] = (h, w)
        if not self.with_instances:
            sample["mask"] = decode_segmentation(self.anns[ann_id]["segmentation"], h, w)
            return sample
        ids = [a for a in self.anns_of_image[image_id]
               if a == ann_id or not self.anns[a].get("iscrowd", 0)]
        instances = np.stack([decode_segmentation(self.anns[a]["segmentation"], h, w) for a in ids])
        target = ids.index(ann_id)
        return dict(sample, mask=instances[target], instances=instances, target_index=target)


# ---------------------------------------------------------------------------------------------
# Built-in synthetic data: coloured shapes and sentences that refer to exactly one of them
# ---------------------------------------------------------------------------------------------

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220),
           "yellow": (235, 205, 35), "purple": (145, 60, 190)}
KINDS = ("circle", "square", "triangle", "diamond")
SIZES = {"small": (0.09, 0.12), "big": (0.15, 0.2)}  # radius as a fraction of the image side
ATTRIBUTE_SETS = (("kind",), ("colour", "kind"), ("colour",), ("size", "kind"),
                  ("size", "colour", "kind"))
# (axis, sign, words): the target is the extreme of its group along the axis
EXTREMES = (("x", -1, ("on the left", "leftmost")), ("x", 1, ("on the right", "rightmost")),
            ("y", -1, ("at the top", "topmost")), ("y", 1, ("at the bottom", "bottom")))
RELATIONS = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}
# what a sentence needs: attributes only, the extreme of a group, or a relation to another shape
SENTENCE_TYPES = ("attribute", "position", "relation")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _phrase(attrs: dict) -> str:
    words = [attrs[k] for k in ("size", "colour") if k in attrs]
    return " ".join(words + [attrs.get("kind", "shape" if words else "shape")])


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if kind == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None  # circle


class ShapesDataset(Dataset):
    """Deterministic synthetic referring segmentation: 2-6 shapes on a textured background.

    Each sample is generated from (seed, split, index) alone, so every process and every run sees
    the same data. The sentence picks out exactly one shape by its attributes ("the big red
    circle"), its position within a group ("the triangle on the left", "the leftmost blue
    shape") or its relation to another shape ("the square below the green circle"). Masks are
    exact; with `instances`, every shape's mask is in `instances` (MaIL's oracle candidates),
    without it samples carry none (target_index -1). Without `images` samples carry the image's
    size (`image_hw`) instead of the image (it is still rendered: it shares the masks' draws).
    """

    MEMO_BYTES = 1 << 30

    def __init__(self, split: str = "train", num_samples: int = 2000, image_size: int = 128,
                 seed: int = 0, instances: bool = True, images: bool = True):
        if split not in SPLIT_CODES:
            raise ValueError(f"shapes has splits {tuple(SPLIT_CODES)}, not {split!r}")
        self.split, self.num_samples, self.size, self.seed = split, num_samples, image_size, seed
        self.with_instances, self.with_images = instances, images
        self.name = f"shapes/{split}"
        # rendered samples are kept in memory (rendering is ~10% of a tiny training step on CPU)
        # up to MEMO_BYTES per process; a fresh dict each time, whose arrays are shared: do not
        # modify them in place (Preprocess never does)
        self._memo: dict[int, dict] = {}
        self._memo_bytes = 0

    def __len__(self) -> int:
        return self.num_samples

    def _scene(self, i: int):
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], i])
        while True:  # a scene without any unambiguous sentence is redrawn (rare)
            objects = self._place(rng)
            target = int(rng.integers(len(objects)))
            described = self._describe(objects, target, rng)
            if described is not None:
                return rng, objects, target, *described

    def sentence(self, i: int) -> str:
        """Sample i's sentence, without rendering its image."""
        return self._scene(i)[3]

    def image_key(self, i: int) -> str:
        """Sample i's `image_key`, without rendering it."""
        return f"shapes/{self.split}/{self.seed}/{self.size}/{i}"

    def __getitem__(self, i: int) -> dict:
        if i in self._memo:
            return dict(self._memo[i])
        rng, objects, target, sentence, sentence_type = self._scene(i)
        image, instances = self._render(objects, rng)
        sample = dict(image=image, sentence=sentence, mask=instances[target], instances=instances,
                      sentence_type=sentence_type, target_index=target, image_id=i,
                      image_key=self.image_key(i))
        if not self.with_instances:  # the target's own copy: the memo keeps no other mask
            sample.update(mask=instances[target].copy(), target_index=-1)
            del sample["instances"]
        if not self.with_images:
            sample["image_hw"] = image.shape[:2]
            del sample["image"]
        size = sum(v.nbytes for v in sample.values() if isinstance(v, np.ndarray))
        if self._memo_bytes + size <= self.MEMO_BYTES:
            self._memo[i], self._memo_bytes = sample, self._memo_bytes + size
        return dict(sample)

    def _place(self, rng) -> list[dict]:
        n = int(rng.integers(2, 7))
        objects: list[dict] = []
        for _ in range(200):
            if len(objects) == n:
                break
            size = str(rng.choice(list(SIZES)))
            r = rng.uniform(*SIZES[size]) * self.size
            cx, cy = rng.uniform(r + 2, self.size - r - 2, size=2)
            if all(math.hypot(cx - o["cx"], cy - o["cy"]) > r + o["r"] + 3 for o in objects):
                objects.append(dict(kind=str(rng.choice(KINDS)),
                                    colour=str(rng.choice(list(COLOURS))),
                                    size=size, cx=cx, cy=cy, r=r))
        return objects

    def _describe(self, objects: list[dict], t: int, rng) -> tuple[str, str] | None:
        """(sentence, its type in SENTENCE_TYPES) naming objects[t] alone, or None."""
        target, margin = objects[t], 0.05 * self.size
        found: dict[str, list[str]] = {k: [] for k in SENTENCE_TYPES}

        def group(attrs):
            return [o for o in objects if all(o[k] == v for k, v in attrs.items())]

        def extreme(members, axis, sign):  # target beats every other member by a margin
            return all(sign * (target["c" + axis] - o["c" + axis]) > margin
                       for o in members if o is not target)

        unique_refs = []  # other objects that attributes alone identify
        for keys in ATTRIBUTE_SETS + ((),):
            attrs = {k: target[k] for k in keys}
            members = group(attrs)
            if len(members) == 1:
                found["attribute"].append(f"the {_phrase(attrs)}")
            elif len(members) >= 2:
                for axis, sign, (after, before) in EXTREMES:
                    if extreme(members, axis, sign):
                        found["position"].append(f"the {_phrase(attrs)} {after}")
                        if keys:
                            found["position"].append(f"the {before} {_phrase(attrs)}")
        for o in objects:
            if o is target:
                continue
            for keys in ATTRIBUTE_SETS[:2]:
                attrs = {k: o[k] for k in keys}
                if len(group(attrs)) == 1:
                    unique_refs.append((o, attrs))
                    break
        for ref, ref_attrs in unique_refs:
            for keys in ATTRIBUTE_SETS[:2] + ((),):
                attrs = {k: target[k] for k in keys}
                members = [o for o in group(attrs) if o is not ref]
                if len(members) < 2:
                    continue  # attributes alone would do
                for rel, (axis, sign) in RELATIONS.items():
                    hits = [o for o in members
                            if sign * (o["c" + axis] - ref["c" + axis]) > o["r"] + ref["r"]]
                    if hits == [target]:
                        found["relation"].append(
                            f"the {_phrase(attrs)} {rel} the {_phrase(ref_attrs)}")
        stypes = [k for k in SENTENCE_TYPES if found[k]]
        if not stypes:
            return None
        weights = np.array([{"attribute": 0.6, "position": 0.25, "relation": 0.15}[k]
                            for k in stypes])
        stype = stypes[int(rng.choice(len(stypes), p=weights / weights.sum()))]
        return str(rng.choice(found[stype])), stype

    def _render(self, objects: list[dict], rng) -> tuple[np.ndarray, np.ndarray]:
        s = self.size
        # textured background: a smooth random field, faint stripes and pixel noise, all greyish
        coarse = rng.normal(0, 1, size=(5, 5, 1))
        field = np.asarray(Image.fromarray(((coarse - coarse.min()) / (np.ptp(coarse) + 1e-6)
                                            * 255).astype(np.uint8)[:, :, 0])
                           .resize((s, s), Image.BICUBIC),
                           dtype=np.float32)[:, :, None] / 255.0
        yy, xx = np.mgrid[0:s, 0:s]
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 16)
        stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        tint = rng.uniform(90, 170) + rng.uniform(-12, 12, size=3)
        bg = tint + 40 * (field - 0.5) + 6 * stripes[:, :, None] + rng.normal(0, 5, size=(s, s, 3))
        image = bg
        instances = np.zeros((len(objects), s, s), dtype=bool)
        for k, o in enumerate(objects):
            canvas = Image.new("L", (s, s), 0)
            draw = ImageDraw.Draw(canvas)
            poly = _shape_polygon(o["kind"], o["cx"], o["cy"], o["r"])
            if poly is None:
                draw.ellipse([o["cx"] - o["r"], o["cy"] - o["r"],
                              o["cx"] + o["r"], o["cy"] + o["r"]],
                             fill=255)
            else:
                draw.polygon(poly, fill=255)
            instances[k] = np.asarray(canvas) > 0
            colour = np.array(COLOURS[o["colour"]]) + rng.uniform(-15, 15, size=3)
            shade = 1 + 0.08 * (field[:, :, 0] - 0.5)[:, :, None]  # a little lighting
            image = np.where(instances[k][:, :, None], colour * shade, image)
        return np.clip(image, 0, 255).astype(np.uint8), instances


# ---------------------------------------------------------------------------------------------
# Preprocessing and batching
# ---------------------------------------------------------------------------------------------

_FLIP_WORDS = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_FLIP_RE = re.compile(r"\b(" + "|".join(_FLIP_WORDS) + r")\b")


def flip_sentence(sentence: str) -> str:
    """Swap left and right words, so that a mirrored image keeps its sentence true."""
    return _FLIP_RE.sub(lambda m: _FLIP_WORDS[m.group(1)], sentence)


def image_hw(sample: dict) -> tuple[int, int]:
    """A raw sample's original image size (H0, W0), whether it holds its image or not."""
    if "image" in sample:
        return tuple(sample["image"].shape[:2])
    return tuple(sample["image_hw"])


def resize_image(image: np.ndarray, spec: InputSpec) -> tuple[Tensor, tuple[int, int]]:
    """uint8 (H0, W0, 3) -> uint8 (3, h, w) resized as the spec says, and (h, w).

    The image stays uint8 until `normalise` (on the model's device, see `to_device`): a quarter
    of float32's bytes between processes (3 MiB instead of 12 MiB at 1024x1024). The antialiased
    bilinear resize runs on uint8 directly and agrees with a float resize rounded to uint8 within
    one grey level.
    """
    h0, w0 = image.shape[:2]
    h, w = spec.resized_hw(h0, w0)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # (1, 3, H0, W0)
    if (h, w) != (h0, w0):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x[0].contiguous(), (h, w)


def normalise(image: Tensor, spec: InputSpec, image_mask: Tensor | None = None) -> Tensor:
    """uint8 images (B, 3, H, W) -> float (B, 3, H, W) with the spec's mean and std, on their
    own device; pixels outside `image_mask` (B, H, W), the padding, become 0 as InputSpec says."""
    mean = torch.tensor(spec.mean, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=image.device).view(1, 3, 1, 1)
    x = (image.float() / 255 - mean) / std
    if image_mask is not None:
        x = x * image_mask[:, None]
    return x


def resize_masks(masks: np.ndarray, hw: tuple[int, int]) -> Tensor:
    """bool (K, H0, W0) -> bool (K, h, w) by nearest neighbour: output pixel i takes input pixel
    floor((i + 0.5) * H0 / h), as F.interpolate's "nearest-exact", by indexing (5x faster than
    interpolating a uint8 copy at SAM's 1024x1024)."""
    h0, w0 = masks.shape[-2:]
    h, w = hw
    if (h, w) == (h0, w0):
        return torch.from_numpy(np.ascontiguousarray(masks, dtype=bool))
    rows = np.minimum(((np.arange(h) + 0.5) * (h0 / h)).astype(np.int64), h0 - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * (w0 / w)).astype(np.int64), w0 - 1)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(masks, bool)[:, rows][:, :, cols]))


def stack_padded(xs: list[Tensor], hw: tuple[int, int], dtype: torch.dtype | None = None) -> Tensor:
    """Tensors (..., h_i, w_i) of one shape otherwise -> (B, ..., H, W), each at the top left and
    zero elsewhere: one copy per sample (padding then stacking would make two)."""
    out = xs[0].new_zeros(len(xs), *xs[0].shape[:-2], *hw, dtype=dtype)
    for b, x in enumerate(xs):
        out[b, ..., : x.shape[-2], : x.shape[-1]] = x
    return out


class Preprocess:
    """Raw sample -> model inputs, as the model's InputSpec and tokenizer say: image uint8
    (3, h, w) resized (not yet normalised: `to_device` does it on the model's device), mask
    (1, h, w) and cand_masks (K, h, w) bool, text ids; (h, w) = valid_hw, unpadded: `collate`
    pads every sample to the batch's largest canvas_hw. keep_original adds `gt`, the mask at
    the original resolution (metrics).

    Augmentation (training) is a horizontal flip (probability 1/2) with "left"/"right" swapped in
    the sentence; nothing that changes colour, size or relative position, which sentences name.
    """

    def __init__(self, spec: InputSpec, tokenizer, *, augment: bool = False,
                 candidates: bool = False, keep_original: bool = False):
        self.spec, self.tokenizer = spec, tokenizer
        self.augment, self.candidates, self.keep_original = augment, candidates, keep_original

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        image, sentence, mask = sample.get("image"), sample["sentence"], sample["mask"]
        instances = sample.get("instances")
        orig_hw = image_hw(sample)
        key = sample.get("image_key", "")
        if self.augment and rng is not None and rng.random() < 0.5:
            key = f"{key}|hflip" if key else key  # another image now (frozen features differ)
            mask, sentence = mask[:, ::-1], flip_sentence(sentence)
            image = image[:, ::-1] if image is not None else None
            instances = instances[:, :, ::-1] if instances is not None else None
        ids, truncated = self.tokenizer(sentence)
        hw = self.spec.resized_hw(*orig_hw)
        # tensors at the resized size (h, w); collate pads them to the batch's canvas
        out = dict(text=torch.tensor(ids), truncated=truncated,
                   mask=resize_masks(mask[None], hw), valid_hw=hw,
                   canvas_hw=self.spec.canvas_hw(*orig_hw), orig_hw=orig_hw, sentence=sentence,
                   image_id=sample.get("image_id", -1), target_index=sample.get("target_index", -1),
                   sentence_type=sample.get("sentence_type", ""),
                   image_key=key)
        if image is not None:  # read without its image: sizes only (image_hw)
            out["image"], _ = resize_image(image, self.spec)
        if self.candidates:  # no instances: one empty candidate (MaIL then has no mask tokens)
            if instances is None or not len(instances):
                instances = np.zeros((1, *orig_hw), bool)
            out["cand_masks"] = resize_masks(instances, hw)
        if self.keep_original:
            out["gt"] = torch.from_numpy(np.ascontiguousarray(mask))
        return out


class PreparedDataset(Dataset):
    """A raw dataset plus Preprocess. Augmentation randomness comes from (seed, epoch, index), so
    a run is reproducible whatever the number of workers and after a resume.

    skip_bad: an image that cannot be decoded (ImageError) yields None, which `collate` drops
    and counts (training: one corrupt file among 100k should not end a run). Otherwise, as in
    evaluation, the error stops the run, naming the file: metrics must cover every sample.
    """

    def __init__(self, base: Dataset, preprocess: Preprocess, seed: int = 0,
                 skip_bad: bool = False):
        self.base, self.preprocess, self.seed, self.epoch = base, preprocess, seed, 0
        self.skip_bad = skip_bad

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict | None:
        try:
            raw = self.base[i]
        except ImageError as err:
            if not self.skip_bad:
                raise
            warnings.warn(f"skipping sample {i}: {err}", stacklevel=2)
            return None
        item = self.preprocess(raw, np.random.default_rng([self.seed, self.epoch, i]))
        item["index"] = i
        return item


def collate(items: list[dict | None], pad_id: int = 0) -> dict:
    """Pad a list of prepared samples into a batch (None items, skipped samples, are dropped and
    counted in "skipped").

    (H, W) is the largest canvas (InputSpec.canvas_hw) of the batch; every sample sits at the top
    left, padded at the bottom and right. image (B, 3, H, W) uint8 padded with 0 (`to_device`
    normalises it on the model's device; absent for samples read without images), image_mask
    (B, H, W) True on real pixels, text (B, L) padded with `pad_id`, text_mask (B, L) True on
    real tokens, mask (B, 1, H, W) float target; with candidates: cand_masks (B, K, H, W) bool,
    cand_valid (B, K) bool, target_index (B,).
    """
    skipped = sum(it is None for it in items)
    items = [it for it in items if it is not None]
    if not items:
        raise ImageError(f"all {skipped} images of a batch failed to decode (see the warnings)")
    B = len(items)
    H = max(it["canvas_hw"][0] for it in items)
    W = max(it["canvas_hw"][1] for it in items)
    L = max(len(it["text"]) for it in items)
    with_image = ["image" in it for it in items]
    if any(with_image) and not all(with_image):
        raise ValueError("a batch mixes samples with and without their image")
    batch = dict(
        image_mask=torch.zeros(B, H, W, dtype=torch.bool),
        text=torch.full((B, L), pad_id, dtype=torch.long),
        text_mask=torch.zeros(B, L, dtype=torch.bool),
        mask=stack_padded([it["mask"] for it in items], (H, W), torch.float32),
        target_index=torch.tensor([it["target_index"] for it in items]),
        index=torch.tensor([it["index"] for it in items]),
        truncated=sum(bool(it["truncated"]) for it in items),
        skipped=skipped,
    )
    if all(with_image):
        batch["image"] = stack_padded([it["image"] for it in items], (H, W))
    for b, it in enumerate(items):
        h, w = it["valid_hw"]
        batch["image_mask"][b, :h, :w] = True
        batch["text"][b, : len(it["text"])] = it["text"]
        batch["text_mask"][b, : len(it["text"])] = True
    for key in ("valid_hw", "orig_hw", "sentence", "sentence_type", "image_id", "image_key"):
        batch[key] = [it[key] for it in items]
    if "gt" in items[0]:
        batch["gt"] = [it["gt"] for it in items]
    if "cand_masks" in items[0]:
        K = max(len(it["cand_masks"]) for it in items)
        batch["cand_masks"] = torch.zeros(B, K, H, W, dtype=torch.bool)
        batch["cand_valid"] = torch.zeros(B, K, dtype=torch.bool)
        for b, it in enumerate(items):
            k, h, w = it["cand_masks"].shape
            batch["cand_masks"][b, :k, :h, :w] = it["cand_masks"]
            batch["cand_valid"][b, :k] = True
    return batch


def to_original(logits: Tensor, valid_hw: tuple[int, int], orig_hw: tuple[int, int]) -> Tensor:
    """Logits (1, H, W) on the padded input canvas -> logits (H0, W0) at the original size."""
    h, w = valid_hw
    x = logits[..., :h, :w].float()[None]  # (1, 1, h, w)
    return F.interpolate(x, size=tuple(orig_hw), mode="bilinear", align_corners=False)[0, 0]


def to_device(batch: dict, device: torch.device | str, spec: InputSpec | None = None) -> dict:
    """Move a collated batch to `device`: every tensor, and every tensor inside a list (the
    per-sample `gt` masks), so that nothing a metric compares is left behind on the CPU. An
    image batch still in uint8 (0-255) is normalised here, on the device, with `spec`'s
    statistics; its padding (outside `image_mask`) is zero after normalisation, as InputSpec says.
    """
    def move(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        if isinstance(v, list) and v and all(torch.is_tensor(t) for t in v):
            return [t.to(device, non_blocking=True) for t in v]
        return v

    out = {k: move(v) for k, v in batch.items()}
    image = out.get("image")
    if image is not None and image.dtype == torch.uint8:
        if spec is None:
            raise ValueError("a uint8 image batch needs the model's InputSpec to be normalised")
        out["image"] = normalise(image, spec, out.get("image_mask"))
    return out


CANDIDATE_SOURCES = ("simulated", "oracle")  # besides a proposals file's path


def candidate_source(dataset: str, path: str | None = None, oracle: bool = False) -> str:
    """Where a model that takes candidate masks (MaIL) gets them: a proposals file's path,
    "oracle" (the annotated instances: they contain the answer, an upper bound) or "simulated"
    (the synthetic data's built-in detector, common.proposals). A REFER dataset has no proposals
    of its own: without a file (or an explicit oracle) this stops and says how to make one."""
    if path and oracle:
        raise ValueError("--candidates FILE and --oracle-candidates exclude each other")
    if path:
        return path
    if oracle:
        return "oracle"
    if dataset == "shapes":
        return "simulated"
    raise ValueError(MISSING_PROPOSALS.format(dataset=dataset))


MISSING_PROPOSALS = """MaIL selects among candidate masks that come from an instance-segmentation
model (the paper: a ResNet-50 Mask R-CNN trained on the {dataset} train instances, Sec. 4.1), and
no proposals were given. Either
  - pass --candidates PROPOSALS.json, a file in the COCO results format (data.CANDIDATES_FORMAT;
    detectron2's coco_instances_results.json works, and data.encode_candidates writes entries
    from your own detector's masks), e.g. made by a torchvision Mask R-CNN loaded from a local
    weights file: python -m common.detector --help (a COCO-trained detector has seen RefCOCO's
    val/test images, which are COCO train2014 images; the paper's saw only the train split); or
  - pass --oracle-candidates to use the annotated instances. They contain the referred object's
    exact mask, so the result is an oracle (upper bound), not comparable with the paper's."""


class ShardSampler(Sampler):
    """Rank r of w takes samples r, r+w, r+2w, ...: every sample exactly once over all ranks,
    whatever the split size (unlike DistributedSampler, which pads by repeating samples)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ---------------------------------------------------------------------------------------------
# Candidate masks from a file of proposals (MaIL; --candidates)
# ---------------------------------------------------------------------------------------------

CANDIDATES_FORMAT = """candidate file: JSON in the COCO results format (detectron2's
coco_instances_results.json, mmdetection's format_results, pycocotools' loadRes), a list of
  {"image_id": int, "segmentation": RLE {"size": [h, w], "counts": str} or polygons,
   "score": float (optional, default 1), "category_id": int (optional, ignored)}
or a dict holding that list under "annotations". Masks are at the image's stored resolution;
image_id is the COCO id for RefCOCO/+/G-Ref (the index in the split for the synthetic data)."""


def load_candidates(path: str, min_score: float = 0.0,
                    max_per_image: int | None = None) -> dict[int, list[dict]]:
    """Read proposals (see CANDIDATES_FORMAT) into {image_id: [{"segmentation", "score"}, ...]},
    best score first, keeping those with score >= min_score, at most max_per_image per image.
    An image absent from the file has no candidates."""
    entries = read_json(path, "candidate file", CANDIDATES_FORMAT)
    if isinstance(entries, dict):
        entries = entries.get("annotations")
    if not isinstance(entries, list):
        raise ValueError(f"{path!r} holds no list of candidates\n{CANDIDATES_FORMAT}")
    by_image: dict[int, list[dict]] = {}
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or "image_id" not in e or "segmentation" not in e:
            raise ValueError(f"{path!r}, entry {n}: needs image_id and segmentation\n"
                             f"{CANDIDATES_FORMAT}")
        score = float(e.get("score", 1.0))
        if score >= min_score:
            by_image.setdefault(int(e["image_id"]), []).append(
                {"segmentation": e["segmentation"], "score": score})
    for image_id, cands in by_image.items():
        cands.sort(key=lambda c: -c["score"])
        by_image[image_id] = cands[:max_per_image]
    return by_image


def encode_candidates(image_id: int, masks, scores=None) -> list[dict]:
    """Entries of a candidate file for one image: masks (K, h, w) bool (numpy or torch), e.g. a
    torchvision Mask R-CNN's `masks[:, 0] > 0.5`, and their scores."""
    from pycocotools import mask as mask_utils

    masks = np.asarray(masks, dtype=bool)
    entries = []
    for k, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle = {"size": list(rle["size"]), "counts": rle["counts"].decode()}
        score = 1.0 if scores is None else float(scores[k])
        entries.append({"image_id": int(image_id), "score": score, "segmentation": rle})
    return entries


def candidate_masks(cands: list[dict], h: int, w: int) -> np.ndarray:
    """One image's entries of load_candidates -> bool (K, h, w) at the image's resolution."""
    masks = [decode_segmentation(c["segmentation"], h, w) for c in cands]
    return np.stack(masks) if masks else np.zeros((0, h, w), bool)


class OracleCandidates(Dataset):
    """A raw dataset whose annotated `instances` are cut to at most `max_candidates`: the
    referred object (which an oracle always holds) and the first max_candidates - 1 others, in
    annotation order; `target_index` follows the referred object."""

    def __init__(self, base: Dataset, max_candidates: int):
        self.base, self.max_candidates = base, max_candidates

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str):  # sentence(), image_path(), ... of the wrapped dataset
        if name in ("base", "max_candidates"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.base[i])
        instances, target = sample["instances"], sample["target_index"]
        others = [k for k in range(len(instances)) if k != target][: self.max_candidates - 1]
        keep = sorted(others + [target])
        sample.update(instances=instances[keep], target_index=keep.index(target))
        return sample


class WithCandidates(Dataset):
    """A raw dataset whose `instances` (MaIL's candidate masks) come from a proposals file
    (load_candidates) instead of the annotations; an image the file does not hold has none.
    `target_index` becomes -1: a proposal is never exactly the referred object."""

    def __init__(self, base: Dataset, candidates: dict[int, list[dict]]):
        self.base, self.candidates = base, candidates

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str):  # sentence(), image_path(), ... of the wrapped dataset
        if name in ("base", "candidates"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.base[i])
        h, w = image_hw(sample)
        cands = self.candidates.get(int(sample["image_id"]), [])
        sample["instances"] = candidate_masks(cands, h, w)
        sample["candidate_scores"] = np.array([c["score"] for c in cands], np.float32)
        sample["target_index"] = -1
        return sample


def sentences(dataset) -> list[str]:
    """Every sentence of a raw dataset, without decoding images (to build vocabularies)."""
    get = getattr(dataset, "sentence", None) or (lambda i: dataset[i]["sentence"])
    return [get(i) for i in range(len(dataset))]


def build_dataset(name: str, split: str, *, data_root: str | None = None,
                  split_by: str | None = None, image_dir: str | None = None,
                  shapes_size: int = 2000, shapes_image_size: int = 128, seed: int = 0,
                  candidates: str | None = None, max_candidates: int | None = None,
                  min_score: float = 0.0, images: bool = True) -> Dataset:
    """`shapes` (built in) or a REFER dataset (refcoco, refcoco+, refcocog) split.

    images=False: samples carry the image's size (`image_hw`), not the image, and a REFER image
    file is not read: for a run whose every frozen image feature comes from common.cache.

    candidates (see candidate_source), for a model that takes candidate masks:
      None         the model takes none: samples carry no `instances`, none is decoded;
      "oracle"     the annotated instances (COCO crowd annotations excluded, see ReferDataset):
                   they contain the answer, an upper bound; max_candidates keeps the referred
                   object and the first max_candidates - 1 others in annotation order
                   (annotations have no score, so min_score does not apply);
      "simulated"  common.proposals.SimulatedCandidates: a simulated detector's proposals,
                   score >= min_score, the max_candidates best;
      a path       a proposals file (CANDIDATES_FORMAT), score >= min_score, the max_candidates
                   best per image (load_candidates, WithCandidates).
    """
    if candidates is not None and not isinstance(candidates, str):
        raise TypeError(f"candidates is None, 'oracle', 'simulated' or a proposals file's path, "
                        f"not a {type(candidates).__name__}")
    if max_candidates is not None and max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1 or None, got {max_candidates}")
    # the annotated instances are decoded only where candidates are made from them
    instances = candidates in CANDIDATE_SOURCES
    if name == "shapes":
        ds = ShapesDataset(split, shapes_size, shapes_image_size, seed, instances=instances,
                           images=images)
    elif data_root is None:
        raise ValueError(f"--data-root is needed for {name}\n{REFER_LAYOUT}")
    else:
        ds = ReferDataset(data_root, name, split, split_by, image_dir, instances=instances,
                          images=images)
    if candidates is None:
        return ds
    if candidates == "oracle":
        return ds if max_candidates is None else OracleCandidates(ds, max_candidates)
    if candidates == "simulated":
        from common.proposals import SimulatedCandidates  # imports data: import here, not above

        return SimulatedCandidates(ds, seed=seed, max_candidates=max_candidates,
                                   min_score=min_score)
    return WithCandidates(ds, _read_candidates(candidates, min_score, max_candidates))


def _read_candidates(path: str, min_score: float, max_per_image: int | None) -> dict:
    """load_candidates, read once per process for the splits of one run (a detector's results
    file for RefCOCO holds ~100 masks per image); read again when the file changes."""
    key = (os.path.abspath(path), os.path.getmtime(path) if os.path.isfile(path) else None,
           min_score, max_per_image)
    if _CANDIDATE_FILES.get("key") != key:
        _CANDIDATE_FILES.update(key=key, value=load_candidates(path, min_score, max_per_image))
    return _CANDIDATE_FILES["value"]


_CANDIDATE_FILES: dict = {}  # the last proposals file read: {"key": ..., "value": ...}


def candidate_label(source: str) -> str:
    """How a candidate source is named in printed tables and JSON: "oracle", "simulated", or the
    proposals file's base name."""
    return source if source in CANDIDATE_SOURCES else os.path.basename(source)
