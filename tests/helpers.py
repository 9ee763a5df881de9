"""Shared test helpers: small real batches from the synthetic data, prepared for any model."""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings

import torch

import data
import train

MODEL_NAMES = [m for m in train.MODELS if importlib.util.find_spec(m) is not None]


def build(name: str, config: str = "tiny", **changes):
    module = train.load_model_module(name)
    cfg = dataclasses.replace(module.CONFIGS[config], **changes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return module.MODEL(cfg)


def make_batch(model, n: int = 2, split: str = "val", image_size: int = 96, seed: int = 0) -> dict:
    base = data.ShapesDataset(split, max(n, 4), image_size, seed)
    prep = data.Preprocess(model.input_spec, model.tokenizer,
                           candidates="cand_masks" in model.input_names, keep_original=True)
    items = []
    for i in range(n):
        item = prep(base[i])
        item["index"] = i
        items.append(item)
    return data.collate(items, model.tokenizer.pad_id)
