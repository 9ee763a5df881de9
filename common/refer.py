"""RefCOCO, RefCOCO+ and G-Ref in the REFER format (refs(SPLIT_BY).p + instances.json, COCO
train2014 images): the splits, the files, and `ReferDataset`, one raw sample per sentence."""

from __future__ import annotations

import json
import os
import pickle
from collections import defaultdict

import numpy as np
from torch.utils.data import Dataset

from common.images import ImageError, load_image

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
        missing = sorted({i for i, _, _ in self.samples if i not in self.images})
        if missing:  # else a bare KeyError when the sample is read
            raise ValueError(f"{dataset}/refs({split_by}).p names image ids that "
                             f"{dataset}/instances.json does not hold: {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''} (mismatched files?)")
        self.name = f"{dataset}({split_by})/{split}"
        self.with_instances, self.with_images = instances, images

    def __len__(self) -> int:
        return len(self.samples)

    def sentence(self, i: int) -> str:
        """Sample i's sentence, without reading its image."""
        return self.samples[i][2]

    def image_key(self, i: int) -> str:
        """Sample i's `image_key`, without reading anything: its image file's absolute path,
        what its features depend on. An image id alone would give another REFER-format dataset
        with the same ids the first one's cached features."""
        return f"file:{os.path.abspath(self.image_path(self.samples[i][0]))}"

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
