"""Candidate masks that come from a detector: the simulated detector of the synthetic data, its
dataset wrapper and recall (common.proposals), and the Mask R-CNN proposals writer
(common.detector)."""

import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
from common import detector, masks
from common.candidates import candidate_masks, load_candidates
from common.proposals import (
    DEFAULT_NOISE,
    ProposalNoise,
    SimulatedCandidates,
    proposal_recall,
    simulate_proposals,
)

EXACT = ProposalNoise(miss_prob=0.0, stride=1, shape_sigma=0.0, threshold_sigma=0.0,
                      box_sigma=0.0, fragment_prob=0.0, merge_prob=0.0, spurious_rate=0.0,
                      score_sigma=0.0)  # no errors at all: pixel resolution, exact box


def iou(a, b):
    return np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum())


@pytest.fixture(scope="module")
def shapes():
    return data.ShapesDataset("val", 60, 96, 0)


def test_same_seed_same_proposals_sorted_scores(shapes):
    inst = shapes[0]["instances"]
    masks, scores = simulate_proposals(inst, (0, 5))
    again, scores2 = simulate_proposals(inst, (0, 5))
    assert masks.dtype == bool and masks.shape[1:] == inst.shape[1:] and len(masks) == len(scores)
    assert scores.dtype == np.float32 and np.all(np.diff(scores) <= 0)
    assert np.array_equal(masks, again) and np.array_equal(scores, scores2)
    other, _ = simulate_proposals(inst, (1, 5))
    assert other.shape != masks.shape or not np.array_equal(other, masks)


def test_proposals_never_equal_an_annotation(shapes):
    for i in range(len(shapes)):
        inst = shapes[i]["instances"]
        for noise in (DEFAULT_NOISE, EXACT):  # EXACT would copy every annotation
            masks, _ = simulate_proposals(inst, (0, i), noise)
            assert not any(np.array_equal(m, a) for m in masks for a in inst)
    masks, _ = simulate_proposals(shapes[0]["instances"], (0, 0), EXACT)
    # ... and without noise they are one toggled pixel away from the annotations
    assert len(masks) == len(shapes[0]["instances"])
    assert all(min(np.sum(m != a) for a in shapes[0]["instances"]) == 1 for m in masks)


def test_noise_model_steps():
    inst = np.zeros((2, 64, 64), bool)
    inst[0, 10:30, 10:30] = True
    inst[1, 10:30, 31:50] = True  # one pixel apart: neighbours
    masks, _ = simulate_proposals(inst, 0, dataclasses.replace(EXACT, miss_prob=1.0))
    assert masks.shape == (0, 64, 64)  # every object missed, no blobs
    merged, _ = simulate_proposals(inst, 0, dataclasses.replace(EXACT, merge_prob=1.0,
                                                                merge_replaces=1.0))
    assert len(merged) == 1 and iou(merged[0], inst[0] | inst[1]) > 0.99
    blobs, _ = simulate_proposals(inst[:0], 0, dataclasses.replace(EXACT, spurious_rate=5.0))
    assert len(blobs) > 0  # no object, only false positives
    part, _ = simulate_proposals(inst[:1], 3, dataclasses.replace(EXACT, fragment_prob=1.0))
    assert len(part) == 2 and 0.25 < part.sum((1, 2)).min() / inst[0].sum() < 0.75


def test_step2_the_mask_head_sees_stride_cells_and_clips_to_its_box():
    """A 4-px feature grid rounds corners and loses a 1-px line; a jittered box only clips."""
    inst = np.zeros((2, 64, 64), bool)
    inst[0, 10:30, 10:30] = True  # a square, not on the 4-px grid's lines
    inst[1, 40:41, 5:60] = True  # a one-pixel line
    coarse = dataclasses.replace(EXACT, stride=4)
    got, _ = simulate_proposals(inst, 0, coarse)
    square = max(got, key=lambda m: iou(m, inst[0]))
    assert 0.8 < iou(square, inst[0]) < 1.0 and not square[10, 10]  # a corner rounded off
    assert all(iou(m, inst[1]) < 0.5 for m in got)  # the line fades below 0.5 occupancy
    for seed in range(5):  # box errors alone (pixel grid): a subset of the object, never more
        boxed, _ = simulate_proposals(inst[:1], seed, dataclasses.replace(EXACT, box_sigma=0.2))
        assert not (boxed[0] & ~inst[0]).any()
    sizes = {int(simulate_proposals(inst[:1], seed, dataclasses.replace(
        coarse, threshold_sigma=0.2))[0][0].sum()) for seed in range(6)}
    assert len(sizes) >= 2  # the threshold moves the boundary


def test_scores_follow_mask_quality(shapes):
    scores, quality = [], []
    for i in range(len(shapes)):
        inst = shapes[i]["instances"]
        masks, s = simulate_proposals(inst, (0, i))
        scores += list(s)
        quality += [max(iou(m, a) for a in inst) for m in masks]
    assert np.corrcoef(scores, quality)[0, 1] > 0.6


class _TwoSentences(torch.utils.data.Dataset):
    """Samples 0 and 1 show the same image (id 7) with different sentences."""

    def __init__(self, sample):
        self.sample = sample

    def __len__(self):
        return 2

    def sentence(self, i):
        return f"sentence {i}"

    def __getitem__(self, i):
        return dict(self.sample, sentence=self.sentence(i), image_id=7)


def test_simulated_candidates_depend_on_the_image_only(shapes):
    ds = SimulatedCandidates(_TwoSentences(shapes[0]), seed=3)
    a, b = ds[0], ds[1]
    assert ds.sentence(1) == "sentence 1"  # attribute access reaches the base
    assert np.array_equal(a["instances"], b["instances"]) and a["target_index"] == -1
    assert np.array_equal(a["candidate_scores"], b["candidate_scores"])
    again = SimulatedCandidates(_TwoSentences(shapes[0]), seed=3)[0]  # another process / run
    assert np.array_equal(again["instances"], a["instances"])
    masks, scores = simulate_proposals(shapes[0]["instances"], (3, 7))
    assert np.array_equal(a["instances"], masks) and np.array_equal(a["candidate_scores"], scores)


def test_simulated_candidates_min_score_and_max_candidates(shapes):
    full = SimulatedCandidates(shapes, seed=0)
    i = max(range(len(shapes)), key=lambda j: len(full[j]["instances"]))
    everything = full[i]
    assert len(everything["instances"]) >= 3
    top2 = SimulatedCandidates(shapes, seed=0, max_candidates=2)[i]
    assert np.array_equal(top2["instances"], everything["instances"][:2])
    cut = float(everything["candidate_scores"][1])
    above = SimulatedCandidates(shapes, seed=0, min_score=cut)[i]
    assert np.all(above["candidate_scores"] >= cut) and len(above["instances"]) >= 2
    assert len(above["instances"]) < len(everything["instances"])
    with pytest.raises(ValueError, match="max_candidates"):
        SimulatedCandidates(shapes, max_candidates=0)


def test_proposal_recall_counts_the_best_candidate():
    target = np.zeros((10, 10), bool)
    target[:4, :4] = True  # 16 pixels
    half = target.copy()
    half[:, 2:] = False  # IoU 0.5 with the target
    near = target.copy()
    near[0, 0] = False  # IoU 15/16
    samples = [dict(mask=target, instances=np.stack([half, near])),
               dict(mask=target, instances=half[None]),
               dict(mask=target, instances=np.zeros((0, 10, 10), bool))]
    got = proposal_recall(samples)
    assert got["recall@0.5"] == pytest.approx(2 / 3) and got["recall@0.9"] == pytest.approx(1 / 3)
    assert got["mean_best_iou"] == pytest.approx((15 / 16 + 0.5 + 0) / 3)
    assert got["mean_proposals"] == 1.0 and got["n"] == 3
    assert proposal_recall(samples, n=1)["recall@0.9"] == 1.0


def test_default_noise_recall_is_a_plausible_detectors(shapes):
    """Most referred objects found (IoU >= 0.5), about two thirds of those at 0.75 (Mask R-CNN's
    AP75 / AP50), few at 0.9, none pixel-exact; the annotations themselves (the oracle) reach 1."""
    got = proposal_recall(SimulatedCandidates(shapes, seed=0), (0.5, 0.75, 0.9, 0.99))
    assert 0.75 <= got["recall@0.5"] <= 0.97 and 0.4 <= got["recall@0.75"] <= 0.75
    assert got["recall@0.9"] <= 0.35 and got["recall@0.99"] == 0.0
    assert 0.6 <= got["mean_best_iou"] <= 0.85
    assert proposal_recall(shapes, n=20)["recall@0.9"] == 1.0


# --- Mask R-CNN proposals for REFER data (common.detector) ------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_old_command_names_the_new_one():
    res = subprocess.run([sys.executable, "-m", "common.proposals", "--dataset", "refcoco"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "python -m common.detector" in res.stderr


def test_maskrcnn_weights_are_local_and_the_arch_known(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        detector.load_maskrcnn(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown arch"):
        detector.load_maskrcnn(str(tmp_path / "missing.pth"), arch="maskrcnn_resnet101")


def _write_refer(root):
    """A small REFER-format refcoco (as tests/test_data.py builds one): three images, one of
    them referred to twice, one only in another split."""
    os.makedirs(root / "refcoco", exist_ok=True)
    os.makedirs(root / "images" / "train2014", exist_ok=True)
    rng = np.random.default_rng(0)
    images = [{"id": i, "height": 40, "width": 56, "file_name": f"COCO_train2014_{i:012d}.jpg"}
              for i in (3, 5, 8)]
    anns = [{"id": 10 + im["id"], "image_id": im["id"], "category_id": 1,
             "segmentation": [[4, 4, 30, 4, 30, 30, 4, 30]]} for im in images]
    sent = lambda k: [{"sent_id": k, "sent": f"thing {k}", "raw": "", "tokens": []}]
    refs = [{"ref_id": k, "ann_id": 10 + image_id, "image_id": image_id, "split": split,
             "category_id": 1, "sent_ids": [k], "sentences": sent(k), "file_name": "x.jpg"}
            for k, (image_id, split) in enumerate([(3, "val"), (3, "val"), (5, "val"),
                                                   (8, "train")])]
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    with open(root / "refcoco" / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": []}, f)
    for im in images:
        arr = rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "images" / "train2014" / im["file_name"])


@pytest.mark.slow
def test_maskrcnn_writer_covers_every_image_of_the_split(tmp_path, capsys):
    import torchvision

    _write_refer(tmp_path)
    torch.manual_seed(0)
    maskrcnn = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=2)  # random weights
    weights = tmp_path / "maskrcnn.pth"
    torch.save(maskrcnn.state_dict(), weights)
    out = tmp_path / "proposals.json"
    # two classes: a random detector's scores are ~1/2, not ~1/91, so some pass min_score
    summary = detector.main(["--dataset", "refcoco", "--data-root", str(tmp_path), "--split",
                             "val", "--weights", str(weights), "--num-classes", "2",
                             "--min-score", "0.0", "--max-per-image", "3", "--min-size", "64",
                             "--recall", "--out", str(out)])
    assert summary["images"] == 2 and "wrote" in capsys.readouterr().out
    cands = load_candidates(str(out))
    assert sorted(cands) == [3, 5]  # every image of val once, none of train
    assert all(1 <= len(c) <= 3 for c in cands.values())
    masks = candidate_masks(cands[3], 40, 56)
    assert masks.shape[1:] == (40, 56)
    assert summary["recall"]["n"] == 3  # three val sentences, two images
    with pytest.raises(ValueError, match="num_classes=91"):
        detector.load_maskrcnn(str(weights))  # COCO's class count does not fit
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        detector.load_maskrcnn(str(tmp_path / "missing.pth"))


def test_mask_morphology():
    """common.masks, which the simulated detector draws its errors with: dilation by radius 1 is
    the 3x3 square, erosion its inverse on a square, a shift loses what leaves the image."""
    m = np.zeros((7, 7), bool)
    m[2:5, 2:5] = True  # a 3x3 square
    grown = masks.dilate(m, 1)
    assert grown.sum() == 25 and grown[1:6, 1:6].all()
    assert np.array_equal(masks.dilate(grown, -1), m) and masks.dilate(m, -2).sum() == 0
    moved = masks.shift(m, 3, -1)
    assert moved.sum() == 6 and moved[5:7, 1:4].all()
    assert masks.iou(m, grown) == pytest.approx(9 / 25) and masks.box(m) == (2, 4, 2, 4)
    assert masks.equivalent_radius(m) == pytest.approx(math.sqrt(9 / math.pi))
