"""Data: from a raw sample to a batch on the device, for any of the four models.

The data sources live in common/: RefCOCO / RefCOCO+ / G-Ref in the REFER format
(common.refer), the built-in synthetic shapes (common.shapes), MaIL's candidate masks
(common.candidates, common.proposals). `build_dataset` picks one; this file prepares its samples
as a model expects them (`Preprocess`, driven by the model's `InputSpec` and tokenizer), batches
them (`collate`), moves a batch to the device (`to_device`) and maps predictions back to the
original resolution (`to_original`); `make_train_loader` and `make_eval_loader` put it together.

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
normalises its images there.

Shapes: B batch, K candidates, L tokens, H W input size, H0 W0 original size.
"""

from __future__ import annotations

import argparse
import functools
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from common.candidates import (
    CANDIDATE_SOURCES,
    OracleCandidates,
    WithCandidates,
    candidate_source,
    coverage,
    read_candidates,
)
from common.cli import at_least
from common.distributed import all_agree
from common.images import ImageError, image_hw
from common.model import InputSpec
from common.refer import REFER_LAYOUT, ReferDataset
from common.samplers import EpochKeyed, ShardSampler, TrainSampler
from common.shapes import ShapesDataset

# ---------------------------------------------------------------------------------------------
# Preprocessing and batching
# ---------------------------------------------------------------------------------------------

_FLIP_WORDS = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}


_FLIP_RE = re.compile(r"\b(" + "|".join(_FLIP_WORDS) + r")\b")


def flip_sentence(sentence: str) -> str:
    """Swap left and right words, so that a mirrored image keeps its sentence true."""
    return _FLIP_RE.sub(lambda m: _FLIP_WORDS[m.group(1)], sentence)


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

# ---------------------------------------------------------------------------------------------
# Datasets and loaders
# ---------------------------------------------------------------------------------------------
# train.py's data flags and their defaults; eval.py's default to the checkpoint's training run's
DATA_DEFAULTS = dict(dataset="shapes", split_by=None, data_root=None, image_dir=None,
                     shapes_train_size=4000, shapes_eval_size=500, shapes_image_size=128,
                     data_seed=0, candidates=None, oracle_candidates=False)


TRAINED_DATA_FLAGS = ("dataset", "split_by", "data_root", "image_dir", "shapes_eval_size",
              "shapes_image_size", "data_seed")  # what a checkpoint's training run decides


def eval_data_args(args, trained: dict) -> argparse.Namespace:
    """A copy of the command line's args whose data flags the user did not give (None) come from
    the training run (`trained`, the checkpoint's args), or else train.py's defaults."""
    run = argparse.Namespace(**vars(args))
    for key, default in DATA_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(run, key, trained.get(key, default) if key in TRAINED_DATA_FLAGS else default)
    run.seed = trained.get("seed", 0)
    return run


def add_data_args(p, defaults: bool = True) -> None:
    """The data flags of train.py (defaults: DATA_DEFAULTS) and eval.py (defaults=False: None,
    which eval.py reads as "the training run's")."""
    d = DATA_DEFAULTS if defaults else dict.fromkeys(DATA_DEFAULTS)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d["dataset"],
                   help="shapes (built in) | refcoco | refcoco+ | refcocog")
    g.add_argument("--split-by", default=None, help="unc | umd | google (default: unc, G-Ref umd)")
    g.add_argument("--data-root", default=None,
                   help="folder with refcoco/, refcoco+/, refcocog/, images/")
    g.add_argument("--image-dir", default=None,
                   help="COCO train2014 images (default DATA_ROOT/images/train2014)")
    g.add_argument("--shapes-train-size", type=at_least(1), default=d["shapes_train_size"],
                   help="synthetic training samples")
    g.add_argument("--shapes-eval-size", type=at_least(1), default=d["shapes_eval_size"],
                   help="synthetic val/test samples")
    g.add_argument("--shapes-image-size", type=at_least(8), default=d["shapes_image_size"],
                   help="synthetic image side")
    g.add_argument("--data-seed", type=int, default=d["data_seed"],
                   help="seed of the synthetic data")
    g.add_argument("--candidates", default=None, metavar="JSON",
                   help="MaIL: candidate masks from this proposals file "
                        "(common.candidates.CANDIDATES_FORMAT); default: the synthetic data's "
                        "simulated detector; eval.py: default the training run's")
    g.add_argument("--oracle-candidates", action="store_true", default=d["oracle_candidates"],
                   help="MaIL: the annotated instances as candidates. They contain the answer: "
                        "an upper bound, labelled oracle")



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
        from common.proposals import SimulatedCandidates

        return SimulatedCandidates(ds, seed=seed, max_candidates=max_candidates,
                                   min_score=min_score)
    by_image = read_candidates(candidates, min_score, max_candidates)
    # each sample's image id (REFER: its samples' records; the synthetic data: the index)
    ids = [s[0] for s in ds.samples] if hasattr(ds, "samples") else list(range(len(ds)))
    coverage(by_image, ids, candidates, split)
    return WithCandidates(ds, by_image, candidates)


def model_candidates(args, input_names: tuple[str, ...]) -> str | None:
    """Where a model whose forward takes `input_names` gets candidate masks: MaIL's from
    common.candidates.candidate_source; None for a model (or an ablation row: MaIL without the mask
    modality) that takes none: then no instance mask is decoded, no proposals file asked for."""
    if "cand_masks" not in input_names:
        if getattr(args, "candidates", None) or getattr(args, "oracle_candidates", False):
            warnings.warn(f"{args.model} with this config takes no candidate masks: "
                          "--candidates / --oracle-candidates are ignored", stacklevel=2)
        return None
    return candidate_source(args.dataset, getattr(args, "candidates", None),
                                 getattr(args, "oracle_candidates", False))


def dataset_kwargs(args, split: str, candidates: str | None, cfg) -> dict:
    """data.build_dataset's arguments for a split; K is bounded by the model's config."""
    size = args.shapes_train_size if split == "train" else args.shapes_eval_size
    return dict(data_root=args.data_root, split_by=args.split_by, image_dir=args.image_dir,
                shapes_size=size, shapes_image_size=args.shapes_image_size, seed=args.data_seed,
                candidates=candidates, max_candidates=getattr(cfg, "max_candidates", None),
                min_score=getattr(cfg, "min_score", 0.0))


def loader_options(workers: int, cuda: bool) -> dict:
    """Worker settings: on CUDA with workers, pinned host memory (asynchronous copies) and
    workers kept across epochs (no re-fork and re-import each epoch)."""
    return dict(num_workers=workers, pin_memory=cuda and workers > 0,
                persistent_workers=cuda and workers > 0)


def make_train_loader(train_set: PreparedDataset, sampler: TrainSampler, batch_size: int,
                      pad_id: int, workers: int, cuda: bool, seed: int) -> DataLoader:
    return DataLoader(EpochKeyed(train_set), batch_size=batch_size, sampler=sampler,
                      drop_last=True, collate_fn=functools.partial(collate, pad_id=pad_id),
                      generator=torch.Generator().manual_seed(seed),
                      **loader_options(workers, cuda))


def make_eval_loader(args, split: str, model, rank: int, world: int, batch_size: int,
                     images: bool = True):
    """A loader over one evaluation split, sharded across ranks without repeats (images=False:
    samples without their images, for a model whose image features all come from the cache).
    Its collate function is a functools.partial, which pickles: workers can start under
    spawn/forkserver."""
    source = model_candidates(args, model.input_names)
    base = build_dataset(args.dataset, split, images=images,
                              **dataset_kwargs(args, split, source, getattr(model, "cfg", None)))
    prep = Preprocess(model.input_spec, model.tokenizer,
                           candidates="cand_masks" in model.input_names, keep_original=True)
    ds = PreparedDataset(base, prep, seed=args.seed)
    if len(ds) == 0:
        raise ValueError(f"the {split} split of {args.dataset} holds no samples: nothing to "
                         "evaluate")
    cuda = next(model.parameters()).device.type == "cuda"
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank, world),
                      collate_fn=functools.partial(collate, pad_id=model.tokenizer.pad_id),
                      **loader_options(args.workers, cuda))


def cached_splits(cache, bases: dict, device: torch.device, world: int) -> list[str]:
    """The splits ({split: raw dataset}, read with images) whose every image the feature cache
    (common.cache) holds, so that their loaders can read them without images from now on:
    decoding and resizing a photo costs more than reading its cached features, which are what
    the model used anyway. Every rank decides together (a rank without images cannot compute a
    missing entry)."""
    if cache is None or "image" not in cache.parts:
        return []
    return [split for split, base in bases.items() if getattr(base, "with_images", True)
            and all_agree(cache.holds("image", {base.image_key(i) for i in range(len(base))}),
                          device, world)]
