"""MaIL's candidate masks: where they come from (a proposals file, the simulated detector of the
synthetic data, or the annotations as an oracle), the proposals file format, and the raw-dataset
wrappers that put them in a sample's `instances`."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
from torch.utils.data import Dataset

from common.images import image_hw
from common.refer import decode_segmentation, read_json

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
  - pass --candidates PROPOSALS.json, a file in the COCO results format
    (common.candidates.CANDIDATES_FORMAT; detectron2's coco_instances_results.json works, and
    common.candidates.encode_candidates writes entries from your own detector's masks), e.g.
    made by a torchvision Mask R-CNN loaded from a local weights file:
    python -m common.detector --help (a COCO-trained detector has seen RefCOCO's
    val/test images, which are COCO train2014 images; the paper's saw only the train split); or
  - pass --oracle-candidates to use the annotated instances. They contain the referred object's
    exact mask, so the result is an oracle (upper bound), not comparable with the paper's."""


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
        check_entry(e, f"{path!r}, entry {n}")
        score = float(e.get("score", 1.0))
        if score >= min_score:
            by_image.setdefault(int(e["image_id"]), []).append(
                {"segmentation": e["segmentation"], "score": score})
    for image_id, cands in by_image.items():
        cands.sort(key=lambda c: -c["score"])
        by_image[image_id] = cands[:max_per_image]
    return by_image


def check_entry(e, where: str) -> None:
    """One proposal's structure, before any is used: an integer image_id, a finite score,
    polygons or an RLE with its [h, w] size and counts."""
    if not isinstance(e, dict) or "image_id" not in e or "segmentation" not in e:
        raise ValueError(f"{where}: needs image_id and segmentation\n{CANDIDATES_FORMAT}")
    image_id, score, segm = e["image_id"], e.get("score", 1.0), e["segmentation"]
    if isinstance(image_id, bool) or not isinstance(image_id, int) and not (
            isinstance(image_id, str) and image_id.isdigit()):
        raise ValueError(f"{where}: image_id must be an integer, not {image_id!r}")
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
        raise ValueError(f"{where}: score must be a finite number, not {score!r}")
    if isinstance(segm, dict):
        size = segm.get("size")
        if ("counts" not in segm or not isinstance(size, list) or len(size) != 2
                or not all(isinstance(v, int) and v > 0 for v in size)):
            raise ValueError(f"{where}: an RLE segmentation needs \"size\": [h, w] and "
                             "\"counts\"")
    elif not isinstance(segm, list):
        raise ValueError(f"{where}: segmentation must be polygons or an RLE dict")


def coverage(by_image: dict[int, list[dict]], image_ids: list[int], path: str, split: str,
             refuse_below: float = 0.5) -> float:
    """The share of a split's images that have at least one proposal in the file: below
    `refuse_below` the file is not this split's (a ValueError naming the counts), below 1 a
    warning with the counts (a detector may find nothing in a few images)."""
    ids = set(image_ids)
    held = sum(1 for i in ids if by_image.get(i))
    share = held / max(len(ids), 1)
    message = (f"{path}: {held} of the {len(ids)} images of the {split} split have proposals "
               f"(score >= the config's min_score)")
    if share < refuse_below:
        raise ValueError(f"{message}: is this the {split} split's proposals file? (the detector "
                         "writes one file per split: python -m common.detector --split ...)")
    if share < 1:
        warnings.warn(f"{message}; the others have no candidate", stacklevel=2)
    return share


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

    def __init__(self, base: Dataset, candidates: dict[int, list[dict]], source: str = ""):
        self.base, self.candidates, self.source = base, candidates, source

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str):  # sentence(), image_path(), ... of the wrapped dataset
        if name in ("base", "candidates", "source"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.base[i])
        h, w = image_hw(sample)
        cands = self.candidates.get(int(sample["image_id"]), [])
        for c in cands:  # a mask of another size would be stretched onto the image
            size = c["segmentation"].get("size") if isinstance(c["segmentation"], dict) else None
            if size is not None and tuple(size) != (h, w):
                raise ValueError(f"{self.source}: a proposal of image_id {sample['image_id']} is "
                                 f"{size[0]}x{size[1]}, the image {h}x{w}: masks are at the "
                                 "image's stored resolution")
        sample["instances"] = candidate_masks(cands, h, w)
        sample["candidate_scores"] = np.array([c["score"] for c in cands], np.float32)
        sample["target_index"] = -1
        return sample


def read_candidates(path: str, min_score: float, max_per_image: int | None) -> dict:
    """load_candidates, read once per process for the splits of one run (a detector's results
    file for RefCOCO holds ~100 masks per image); read again when the file changes."""
    key = (os.path.abspath(path), os.path.getmtime(path) if os.path.isfile(path) else None,
           min_score, max_per_image)
    if CANDIDATE_FILES.get("key") != key:
        CANDIDATE_FILES.update(key=key, value=load_candidates(path, min_score, max_per_image))
    return CANDIDATE_FILES["value"]


CANDIDATE_FILES: dict = {}  # the last proposals file read: {"key": ..., "value": ...}


def candidate_label(source: str) -> str:
    """How a candidate source is named in printed tables and JSON: "oracle", "simulated", or the
    proposals file's base name."""
    return source if source in CANDIDATE_SOURCES else os.path.basename(source)
