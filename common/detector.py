"""MaIL's candidate masks for a REFER split from a real detector: torchvision's Mask R-CNN.

MaIL (Sec. 4.1) selects among the masks of "a ResNet-50 Mask R-CNN pre-trained on instances in
train splits of RefCOCO/RefCOCO+/G-Ref". `python -m common.detector` runs a torchvision Mask R-CNN
(`maskrcnn_resnet50_fpn` or `_v2`) loaded from a local weights file (nothing is downloaded) over
every image of a REFER split once and writes the COCO results file that
`common.candidates.load_candidates` reads (`--candidates`):

  python -m common.detector --dataset refcoco --data-root /data/refer --split train \
      --weights maskrcnn_resnet50_fpn.pth --out props_train.json

Caution: a COCO-trained detector has seen RefCOCO's val and test images (they are COCO train2014
images) with their instances; the paper's detector was trained on the RefCOCO train instances
only. Proposals from a COCO model are therefore optimistic on val/test and not the paper's
setting. The synthetic data's simulated detector, and `proposal_recall`, are in common.proposals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from common import cli
from common.candidates import encode_candidates, load_candidates
from common.encoders.loading import load_state_dict_file
from common.proposals import proposal_recall

MASK_THRESHOLD = 0.5  # Mask R-CNN's soft masks are binarised at 0.5 (torchvision, detectron2)
MASKRCNN_ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")


def load_maskrcnn(weights: str, arch: str = "maskrcnn_resnet50_fpn", num_classes: int = 91,
                  min_score: float = 0.05, max_per_image: int = 100, **kwargs) -> torch.nn.Module:
    """torchvision's Mask R-CNN built without any download (weights=None,
    weights_backbone=None) and loaded from a local state-dict file (a plain state dict, or one
    under "model" / "state_dict" as training checkpoints keep it). kwargs go to MaskRCNN
    (e.g. min_size, max_size)."""
    import torchvision.models.detection as det

    if arch not in MASKRCNN_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {MASKRCNN_ARCHS}")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"Mask R-CNN weights not found: {weights!r} (a local state-dict "
                                f"file of torchvision's {arch}; nothing is downloaded)")
    model = getattr(det, arch)(weights=None, weights_backbone=None, num_classes=num_classes,
                               box_score_thresh=min_score, box_detections_per_img=max_per_image,
                               **kwargs)
    state = load_state_dict_file(weights)  # also checks a torchvision file's published hash
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{weights!r} does not fit {arch} with num_classes={num_classes} "
                         f"(another architecture or class count? --arch, --num-classes):\n"
                         f"{err}") from err
    return model.eval()


def _image_ids(dataset) -> list[int]:
    """Each sample's image id, without decoding images where the dataset allows it."""
    if hasattr(dataset, "samples"):  # data.ReferDataset: (image_id, ann_id, sentence)
        return [int(s[0]) for s in dataset.samples]
    return [int(dataset[i]["image_id"]) for i in range(len(dataset))]


@torch.inference_mode()
def write_maskrcnn_proposals(dataset, model: torch.nn.Module, out: str,
                             device: str = "cpu", log_every: int = 100) -> dict:
    """Run `model` (load_maskrcnn) once on every distinct image of a raw dataset and write its
    masks and scores as a COCO results file (common.candidates.encode_candidates;
    read by common.candidates.load_candidates). Returns {"images": ..., "proposals": ...}."""

    first = {}  # image_id -> the first sample showing it
    for i, image_id in enumerate(_image_ids(dataset)):
        first.setdefault(image_id, i)
    model = model.to(device)
    entries = []
    for n, (image_id, i) in enumerate(first.items()):
        image = dataset[i]["image"]  # uint8 (H, W, 3) at the stored resolution
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        det = model([x.to(device)])[0]  # torchvision normalises and resizes internally
        masks = (det["masks"][:, 0] > MASK_THRESHOLD).cpu().numpy()  # (P, H, W)
        entries += encode_candidates(image_id, masks, det["scores"].cpu().numpy())
        if log_every and (n + 1) % log_every == 0:
            print(f"{n + 1}/{len(first)} images, {len(entries)} proposals", file=sys.stderr)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f)
    os.replace(tmp, out)  # never leave a half-written file under the final name
    return {"images": len(first), "proposals": len(entries)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m common.detector",
        description="Write MaIL's candidate masks for a REFER split with a torchvision Mask R-CNN "
                    "from a local weights file (COCO results format, for --candidates). Note: "
                    "a COCO-trained detector saw RefCOCO's val/test images (COCO train2014); the "
                    "paper's was trained on the RefCOCO train instances only.")
    p.add_argument("--dataset", required=True, choices=("refcoco", "refcoco+", "refcocog"))
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--split-by", default=None, help="unc | umd | google (default per dataset)")
    p.add_argument("--image-dir", default=None, help="default DATA_ROOT/images/train2014")
    p.add_argument("--weights", required=True, help="local state dict of the Mask R-CNN")
    p.add_argument("--arch", default=MASKRCNN_ARCHS[0], choices=MASKRCNN_ARCHS)
    p.add_argument("--num-classes", type=int, default=91, help="91 for COCO-trained weights")
    p.add_argument("--min-score", type=float, default=0.05, help="drop detections below this")
    p.add_argument("--max-per-image", type=int, default=100, help="keep the best this many")
    p.add_argument("--min-size", type=int, default=800, help="shorter side the detector sees")
    p.add_argument("--device", default="cpu")
    p.add_argument("--recall", action="store_true",
                   help="then print the proposals' recall against the referred objects")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import data

    ds = data.build_dataset(args.dataset, args.split, data_root=args.data_root,
                            split_by=args.split_by, image_dir=args.image_dir)
    model = load_maskrcnn(args.weights, args.arch, args.num_classes, args.min_score,
                          args.max_per_image, min_size=args.min_size)
    summary = write_maskrcnn_proposals(ds, model, args.out, args.device)
    print(f"wrote {summary['proposals']} proposals for {summary['images']} images of "
          f"{ds.name} to {args.out}")
    if args.recall:
        cands = data.WithCandidates(ds, load_candidates(args.out))
        summary["recall"] = proposal_recall(cands)
        print(json.dumps(summary["recall"]))
    return summary


if __name__ == "__main__":
    cli.run(main)  # a user's error: one line and exit status 2
