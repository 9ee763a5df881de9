"""Shared test helpers: small real batches from the synthetic data, prepared for any model."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pickle
import warnings

import numpy as np
import torch
from PIL import Image

import data
from common.runconfig import MODELS, load_model_module

MODEL_NAMES = [m for m in MODELS if importlib.util.find_spec(m) is not None]


def build(name: str, config: str = "tiny", **changes):
    module = load_model_module(name)
    cfg = dataclasses.replace(module.CONFIGS[config], **changes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return module.MODEL(cfg)


def make_batch(model, n: int = 2, split: str = "val", image_size: int = 96, seed: int = 0) -> dict:
    """A batch ready for `model`: collated, on the CPU, images normalised (data.to_device), with
    the annotated instances as candidates for a model that takes them."""
    takes_candidates = "cand_masks" in model.input_names
    base = data.ShapesDataset(split, max(n, 4), image_size, seed, instances=takes_candidates)
    prep = data.Preprocess(model.input_spec, model.tokenizer, candidates=takes_candidates,
                           keep_original=True)
    items = []
    for i in range(n):
        item = prep(base[i])
        item["index"] = i
        items.append(item)
    return data.to_device(data.collate(items, model.tokenizer.pad_id), "cpu", model.input_spec)


def write_refer(root, refs, images, anns):
    """A small REFER-format dataset under `root` (a pathlib.Path): refs pickled with protocol 2
    (as Python 2 wrote them), COCO instances, and a flat grey JPEG per image."""
    os.makedirs(root / "refcoco", exist_ok=True)
    os.makedirs(root / "images" / "train2014", exist_ok=True)
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    with open(root / "refcoco" / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": []}, f)
    for im in images:
        arr = np.full((im["height"], im["width"], 3), 120, np.uint8)
        Image.fromarray(arr).save(root / "images" / "train2014" / im["file_name"])


def ref(ref_id: int, ann_id: int, image_id: int, split: str, *sentences: str) -> dict:
    """One REFER ref with its sentences."""
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
            "category_id": 1, "sent_ids": list(range(len(sentences))), "file_name": "x.jpg",
            "sentences": [{"sent_id": k, "sent": s, "raw": s, "tokens": []}
                          for k, s in enumerate(sentences)]}


def vilt_padded_outputs(ours, theirs, vocab: int, words: int, real_words: int,
                        hw: tuple[int, int], real_hw: tuple[int, int], low_id: int = 1):
    """Our ViLTEncoder and transformers' ViltModel on one padded batch of two samples (the
    second with `real_words` words and a `real_hw` image in an `hw` canvas): returns (ours,
    theirs) last hidden states (2, 1 + words + N, d) and our kept-patch mask (2, 1 + N). ViltModel
    reorders its patch tokens: compare the first 1 + words tokens in place, patches as sets."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(low_id, vocab, (2, words), generator=gen)
    text_mask = torch.ones(2, words, dtype=torch.bool)
    text_mask[1, real_words:] = False
    image = torch.randn(2, 3, *hw, generator=gen)
    image_mask = torch.ones(2, *hw, dtype=torch.bool)
    image_mask[1, real_hw[0]:], image_mask[1, :, real_hw[1]:] = False, False
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=text_mask.long(), pixel_values=image,
                      pixel_mask=image_mask.long()).last_hidden_state
        img, keep, _ = ours.embed_image(image, image_mask)
        got = ours(torch.cat([ours.embed_text(ids), img], 1), torch.cat([text_mask, keep], 1))
    return got, want, keep


def nearest_patch_tokens(got, want, keep, b: int, words: int):
    """Sample b's real patch tokens of ours (n, d) and, for each, the nearest of ViltModel's."""
    real = got[b, 1 + words:][keep[b, 1:]]
    dist = torch.cdist(real, want[b, 1 + words:], compute_mode="donot_use_mm_for_euclid_dist")
    return real, want[b, 1 + words:][dist.argmin(1)]
