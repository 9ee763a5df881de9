"""Candidate masks for MaIL that come from a detector, not from the annotations.

MaIL (Sec. 4.1) selects among the masks of "a ResNet-50 Mask R-CNN pre-trained on instances in
train splits of RefCOCO/RefCOCO+/G-Ref". The annotated instances contain the referred object's
exact mask, so feeding them is an oracle (an upper bound). This module gives the two honest
sources:

- `SimulatedCandidates`: for the built-in synthetic data, which has no detector, proposals drawn
  from the annotations by a seeded noise model that errs like an instance-segmentation detector
  (`ProposalNoise`). Every proposal is perturbed: none equals an annotation exactly.
- a real detector's proposals file: `python -m common.detector` (torchvision's Mask R-CNN over a
  REFER split, written in the COCO results format that `common.candidates.load_candidates` reads).

`proposal_recall` measures what bounds MaIL on any of these: the share of samples whose best
proposal reaches IoU >= t with the referred object.

The simulated detector's noise model (`ProposalNoise`, one draw per image from (seed, image_id))
follows how a Mask R-CNN makes a mask: a regressed box, and inside it a mask predicted from
features RoIAlign samples on the finest FPN level (stride 4; an object of this size is assigned
to it), pasted back and thresholded at 0.5:
1. each annotated object is missed with probability `miss_prob`;
2. a detected object's mask is what that head can see: the object's occupancy averaged over
   `stride` x `stride` cells (the feature map's resolution: corners round off, thin parts fade)
   and resized back bilinearly, plus a smooth random field (std `shape_sigma`, one value per
   cell: the head's shape errors), thresholded at 0.5 + N(0, `threshold_sigma`) (over- or
   under-segmentation), and kept only inside the object's box with each side moved by
   N(0, `box_sigma`) x the box's side (box regression error: a short box clips the mask);
   the three stds are scaled per object by exp(N(0, `spread`)): some objects are easy, some
   hard, as a detector's mask IoUs spread (its AP falls gradually from IoU 0.5 to 0.95);
3. with probability `fragment_prob` an object also yields a fragment: the part of its detected
   mask on one side of a random line through it (a part detected as an object);
4. two neighbouring objects (masks within `merge_gap` equivalent radii) are merged into one
   proposal, their union detected as in step 2, with probability `merge_prob`; with probability
   `merge_replaces` the merge replaces the two objects' own proposals (one object seen);
5. a Poisson(`spurious_rate`) number of random elliptic blobs on the image (false positives);
6. a proposal identical to an annotation (a freak draw) gets one boundary pixel toggled, so
   that no proposal ever is the annotation;
7. every proposal's score is clip(score_base + score_gain * q + N(0, score_sigma)), q = its best
   IoU with any annotated object: false positives and fragments score low, yet among found
   objects the score says little about mask quality (a class confidence, not a mask IoU: the
   point of Mask Scoring R-CNN).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from common import masks

SCORE_RANGE = (0.01, 0.99)  # simulated scores stay strictly inside (0, 1), like a softmax's
FRAGMENT_KEEP = (0.3, 0.7)  # a fragment's cutting line leaves 30-70% of the object on one side
BLOB_RADIUS = (0.04, 0.15)  # spurious blob semi-axes, as a fraction of the image's shorter side


@dataclass(frozen=True)
class ProposalNoise:
    """The simulated detector's errors (module docstring, steps 1-7). The defaults give, on the
    shapes data (128 px images), a best-proposal IoU distribution shaped like a Mask R-CNN's:
    most referred objects found (IoU >= 0.5), about two thirds of those at IoU >= 0.75 (mask
    AP75 / AP50 on COCO test-dev: 37.8 / 58.0 for R-101-FPN, He et al. 2017, Table 1), few at
    0.9 and none pixel-exact (a 28 x 28 head over stride-4 features draws no exact boundary)."""

    miss_prob: float = 0.07  # an object gets no proposal of its own
    stride: int = 4  # pixels per cell the mask head sees (FPN's finest level, P2)
    shape_sigma: float = 0.33  # std of the smooth field added to the occupancy (step 2)
    threshold_sigma: float = 0.1  # std of the 0.5 threshold: over- / under-segmentation
    box_sigma: float = 0.07  # std of each box side's error, as a fraction of the box's side
    spread: float = 0.5  # the three stds above x exp(N(0, spread)) per object: easy and hard
    fragment_prob: float = 0.1  # an object also yields a part of itself
    merge_prob: float = 0.15  # a neighbouring pair also yields its union
    merge_replaces: float = 0.5  # ... which then replaces the pair's own proposals
    merge_gap: float = 0.3  # neighbours: masks closer than this x the larger one's radius
    spurious_rate: float = 0.5  # mean number of random blobs per image
    score_base: float = 0.2  # score = base + gain * quality + N(0, sigma), clipped
    score_gain: float = 0.7
    score_sigma: float = 0.12


DEFAULT_NOISE = ProposalNoise()


def _resize(grid: torch.Tensor, stride: int, H: int, W: int) -> np.ndarray:
    """A per-cell map (gh, gw) resized bilinearly to the pixels (H, W) it covers."""
    up = F.interpolate(grid[None, None], scale_factor=stride, mode="bilinear",
                       align_corners=False)
    return up[0, 0, :H, :W].numpy()


def _noisy(mask: np.ndarray, noise: ProposalNoise, rng: np.random.Generator) -> np.ndarray:
    """Step 2: what a Mask R-CNN returns for one object (module docstring)."""
    H, W = mask.shape
    s = noise.stride
    hard = math.exp(rng.normal(0, noise.spread))  # this object's difficulty
    gh, gw = -(-H // s), -(-W // s)  # cells, the last one partly outside the image
    m = F.pad(torch.from_numpy(mask).float(), (0, gw * s - W, 0, gh * s - H))
    occupancy = F.avg_pool2d(m[None, None], s)[0, 0]  # (gh, gw): what the features hold
    field = torch.from_numpy(rng.normal(0, hard * noise.shape_sigma, (gh, gw))).float()
    soft = _resize(occupancy + field, s, H, W)  # (H, W) the head's mask probability
    detected = soft > 0.5 + rng.normal(0, hard * noise.threshold_sigma)
    # the regressed box: each side of the object's box off by N(0, box_sigma) x its side
    y0, y1, x0, x1 = masks.box(mask)
    dy0, dy1 = rng.normal(0, hard * noise.box_sigma, 2) * (y1 - y0 + 1)
    dx0, dx1 = rng.normal(0, hard * noise.box_sigma, 2) * (x1 - x0 + 1)
    inside = np.zeros_like(mask)
    inside[max(0, round(y0 + dy0)) : max(0, round(y1 + dy1) + 1),
           max(0, round(x0 + dx0)) : max(0, round(x1 + dx1) + 1)] = True
    return detected & inside


def _fragment(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Step 3: the part of a mask on one side of a random line through it."""
    ys, xs = np.nonzero(mask)
    angle = rng.uniform(0, math.pi)
    proj = ys * math.sin(angle) + xs * math.cos(angle)  # position along the line's normal
    cut = np.quantile(proj, rng.uniform(*FRAGMENT_KEEP))
    part = np.zeros_like(mask)
    keep = proj <= cut
    part[ys[keep], xs[keep]] = True
    return part


def _blob(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Step 5: a random ellipse, anywhere on the image."""
    a, b = rng.uniform(*BLOB_RADIUS, size=2) * min(h, w)
    cy, cx, angle = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def _neighbours(a: np.ndarray, b: np.ndarray, gap: float) -> bool:
    """Step 4: do two masks come within `gap` times the larger one's radius of each other?"""
    reach = max(1, round(gap * max(masks.equivalent_radius(a), masks.equivalent_radius(b))))
    (ay0, ay1, ax0, ax1), (by0, by1, bx0, bx1) = masks.box(a), masks.box(b)
    if by0 - ay1 > reach or ay0 - by1 > reach or bx0 - ax1 > reach or ax0 - bx1 > reach:
        return False  # their boxes are already too far apart
    near = F.max_pool2d(torch.from_numpy(a).float()[None, None], 2 * reach + 1, stride=1,
                        padding=reach)[0, 0] > 0  # a grown by `reach` (a square)
    return bool((near.numpy() & b).any())


def _not_an_annotation(mask: np.ndarray, instances: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
    """Step 6: toggle boundary pixels until the mask equals no annotated instance."""
    mask = mask.copy()
    while any(np.array_equal(mask, inst) for inst in instances):
        edge = mask & ~masks.dilate(mask, -1) if mask.any() else ~mask
        ys, xs = np.nonzero(edge)
        k = int(rng.integers(len(ys)))
        mask[ys[k], xs[k]] = ~mask[ys[k], xs[k]]
    return mask


def simulate_proposals(instances: np.ndarray, seed, noise: ProposalNoise = DEFAULT_NOISE
                       ) -> tuple[np.ndarray, np.ndarray]:
    """A simulated detector's proposals for one image (module docstring, steps 1-7).

    instances (K, H, W) bool: the image's annotated objects. seed: an int or a sequence of
    non-negative ints, e.g. (seed, image_id): the same seed gives the same proposals.
    Returns masks (P, H, W) bool, none equal to an annotation, and scores (P,) float32, sorted
    best first.
    """
    instances = np.asarray(instances, dtype=bool)
    if instances.ndim != 3:
        raise ValueError(f"instances must be (K, H, W), got shape {instances.shape}")
    rng = np.random.default_rng(seed)
    H, W = instances.shape[1:]
    objects = [m for m in instances if m.any()]
    found = [rng.random() >= noise.miss_prob for _ in objects]  # 1. misses
    own = [_noisy(m, noise, rng) for m in objects]  # 2. boundary and shift errors
    proposals = [m for m, f in zip(own, found) if f]
    for m, f in zip(own, found):  # 3. fragments
        if f and m.any() and rng.random() < noise.fragment_prob:
            proposals.append(_fragment(m, rng))
    replaced = set()
    for i in range(len(objects)):  # 4. merges of neighbouring pairs
        for j in range(i + 1, len(objects)):
            if (_neighbours(objects[i], objects[j], noise.merge_gap)
                    and rng.random() < noise.merge_prob):
                proposals.append(_noisy(objects[i] | objects[j], noise, rng))
                if rng.random() < noise.merge_replaces:
                    replaced |= {i, j}
    if replaced:  # the merged objects' own proposals go (a fragment may stay)
        gone = [own[i] for i in replaced if found[i]]
        proposals = [p for p in proposals if not any(p is g for g in gone)]
    proposals += [_blob(H, W, rng) for _ in range(rng.poisson(noise.spurious_rate))]  # 5.
    proposals = [_not_an_annotation(p, instances, rng) for p in proposals]  # 6.
    proposals = [p for p in proposals if p.any()]  # a detector returns no empty mask
    # 7. scores that follow each proposal's quality
    quality = np.array([max((masks.iou(p, m) for m in objects), default=0.0) for p in proposals])
    scores = noise.score_base + noise.score_gain * quality
    scores = np.clip(scores + rng.normal(0, noise.score_sigma, len(proposals)), *SCORE_RANGE)
    order = np.argsort(-scores, kind="stable")
    out = np.stack(proposals)[order] if proposals else np.zeros((0, H, W), bool)
    return out, scores[order].astype(np.float32)


class SimulatedCandidates(Dataset):
    """A raw dataset (e.g. data.ShapesDataset) whose `instances` (MaIL's candidate masks) are a
    simulated detector's proposals of the sample's image instead of its annotations.

    Proposals are drawn from (seed, image_id) alone, so every process, worker and run sees the
    same ones for an image, whatever the sentence. Kept: score >= min_score, then the
    max_candidates best. `target_index` becomes -1 (no proposal is the referred object) and
    `candidate_scores` (P,) holds the kept scores, best first.
    """

    # kept proposals are remembered per process up to this many bytes (a simulation costs a few
    # ms per image, every epoch otherwise); the arrays are shared: never modify them in place
    MEMO_BYTES = 1 << 28

    def __init__(self, base: Dataset, seed: int = 0, max_candidates: int | None = None,
                 min_score: float = 0.0, noise: ProposalNoise = DEFAULT_NOISE):
        if max_candidates is not None and max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1 or None, got {max_candidates}")
        self.base, self.seed, self.noise = base, seed, noise
        self.max_candidates, self.min_score = max_candidates, min_score
        self._memo: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._memo_bytes = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str):  # sentence(), image_path(), ... of the wrapped dataset
        if name in ("base", "seed", "noise", "max_candidates", "min_score", "_memo"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.base[i])
        image_id = int(sample["image_id"])
        if image_id < 0:
            raise ValueError(f"sample {i} has no image_id: its proposals cannot be seeded")
        if image_id not in self._memo:
            cands, scores = simulate_proposals(sample["instances"], (self.seed, image_id),
                                               self.noise)
            keep = scores >= self.min_score  # scores are sorted, so this keeps a prefix
            cands, scores = cands[keep][: self.max_candidates], scores[keep][: self.max_candidates]
            if self._memo_bytes + cands.nbytes > self.MEMO_BYTES:
                return dict(sample, instances=cands, candidate_scores=scores, target_index=-1)
            self._memo[image_id] = cands, scores
            self._memo_bytes += cands.nbytes
        cands, scores = self._memo[image_id]
        return dict(sample, instances=cands, candidate_scores=scores, target_index=-1)


def proposal_recall(dataset, thresholds: tuple[float, ...] = (0.5, 0.9),
                    n: int | None = None) -> dict:
    """Over the first n samples (all by default) of a raw dataset whose `instances` are the
    candidates: the share of samples whose best candidate reaches IoU >= t with the target mask
    ("recall@t": the best MaIL can do by selection alone), the mean best IoU and the mean
    number of candidates."""
    n = len(dataset) if n is None else min(n, len(dataset))
    if n == 0:
        raise ValueError("proposal_recall needs at least one sample")
    best, counts = [], []
    for i in range(n):
        s = dataset[i]
        target = np.asarray(s["mask"], dtype=bool)
        best.append(max((masks.iou(np.asarray(c, bool), target) for c in s["instances"]),
                        default=0.0))
        counts.append(len(s["instances"]))
    best = np.array(best)
    out = {f"recall@{t:g}": float((best >= t).mean()) for t in thresholds}
    return out | {"mean_best_iou": float(best.mean()), "mean_proposals": float(np.mean(counts)),
                  "n": n}


MOVED = ("the Mask R-CNN proposals writer is now its own module: python -m common.detector "
         "--help (python -m common.proposals runs nothing)")

if __name__ == "__main__":
    sys.exit(MOVED)
