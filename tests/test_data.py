import os
import pickle

import numpy as np
import pytest
import torch
from helpers import write_refer

import common.refer
import data
from common.model import InputSpec
from common.refer import decode_segmentation, load_refs
from common.shapes import COLOURS, EXTREMES, KINDS, RELATIONS, SENTENCE_TYPES
from common.tokenizers import ClipTokenizer


@pytest.fixture
def refer_root(tmp_path):
    images = [{"id": 9, "height": 20, "width": 30, "file_name": "COCO_train2014_000000000009.jpg"}]
    anns = [
        # two overlapping polygons: their overlap is counted twice by pycocotools, binarise > 0
        {"id": 1, "image_id": 9, "category_id": 1,
         "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12], [6, 6, 16, 6, 16, 16, 6, 16]]},
        {"id": 2, "image_id": 9, "category_id": 2,
         "segmentation": {"size": [20, 30], "counts": [20 * 20, 20 * 5, 20 * 5]}},  # raw RLE
    ]
    refs = [
        {"ref_id": 0, "ann_id": 1, "image_id": 9, "split": "train", "category_id": 1,
         "sent_ids": [0, 1], "file_name": "COCO_train2014_000000000009_1.jpg",
         "sentences": [{"sent_id": 0, "sent": "left thing", "raw": "Left thing", "tokens": []},
                       {"sent_id": 1, "sent": "the big one", "raw": "the big one", "tokens": []}]},
        {"ref_id": 1, "ann_id": 2, "image_id": 9, "split": "val", "category_id": 2,
         "sent_ids": [2], "file_name": "x.jpg",
         "sentences": [{"sent_id": 2, "sent": "right stripe", "raw": "", "tokens": []}]},
        {"ref_id": 2, "ann_id": 2, "image_id": 9, "split": "train", "category_id": 2,
         "sent_ids": [], "file_name": "x.jpg", "sentences": []},  # no sentence: skipped
    ]
    write_refer(tmp_path, refs, images, anns)
    return tmp_path


def test_refer_loads_protocol2_pickle(refer_root):
    train = data.ReferDataset(str(refer_root), "refcoco", "train", "unc")
    assert len(train) == 2  # one sample per sentence
    assert train.skipped_refs == 1
    s = train[0]
    assert s["sentence"] == "left thing"
    assert s["image"].shape == (20, 30, 3) and s["image"].dtype == np.uint8
    assert s["mask"].dtype == bool
    # union of the two squares, binarised (not 2 where they overlap)
    assert s["mask"].sum() == 10 * 10 * 2 - 6 * 6
    assert s["instances"].shape == (2, 20, 30) and s["target_index"] == 0
    val = data.ReferDataset(str(refer_root), "refcoco", "val")
    v = val[0]
    assert v["target_index"] == 1 and v["mask"].sum() == 20 * 5  # uncompressed RLE, column-major


def test_refer_split_validation(refer_root):
    with pytest.raises(ValueError, match="splits"):
        data.ReferDataset(str(refer_root), "refcoco", "test", "unc")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.ReferDataset(str(refer_root), "refcoco", "val", "google")


def test_missing_files_name_the_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected layout"):
        data.ReferDataset(str(tmp_path / "nowhere"), "refcoco", "val")
    os.makedirs(tmp_path / "images" / "train2014")
    with pytest.raises(FileNotFoundError, match=r"refs\(unc\)\.p"):
        data.ReferDataset(str(tmp_path), "refcoco", "val")


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "refs(unc).p"
    with open(path, "wb") as f:
        pickle.dump([{"ref": Evil()}], f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_refs(str(path))
    assert not (tmp_path / "pwned").exists()


def test_shapes_deterministic_and_consistent():
    a = data.ShapesDataset("train", 20, 64, seed=3)
    b = data.ShapesDataset("train", 20, 64, seed=3)
    for i in (0, 7, 19):
        x, y = a[i], b[i]
        assert x["sentence"] == y["sentence"]
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["mask"], y["mask"])
        assert 2 <= len(x["instances"]) <= 6
        assert np.array_equal(x["instances"][x["target_index"]], x["mask"]) and x["mask"].any()
    assert data.ShapesDataset("val", 5, 64, seed=3)[0]["sentence"] is not None
    assert not np.array_equal(a[0]["image"], data.ShapesDataset("val", 20, 64, seed=3)[0]["image"])


def test_shapes_memo_returns_the_rendered_sample_within_its_budget(monkeypatch):
    fresh = data.ShapesDataset("train", 6, 64, seed=1)
    first = [fresh[i] for i in range(6)]
    again = [fresh[i] for i in range(6)]  # from memory
    for x, y in zip(first, again):
        assert x is not y and x.keys() == y.keys()
        assert all(np.array_equal(x[k], y[k]) for k in ("image", "mask", "instances"))
    monkeypatch.setattr(data.ShapesDataset, "MEMO_BYTES", 3 * 64 * 64 * 3)  # about one sample
    small = data.ShapesDataset("train", 6, 64, seed=1)
    for i in range(6):
        assert np.array_equal(small[i]["image"], first[i]["image"])
    assert len(small._memo) == 1 and small._memo_bytes <= small.MEMO_BYTES


def test_shapes_sentences_refer_to_their_target():
    """Sentences that name a colour and a kind name the target's colour and kind."""
    ds = data.ShapesDataset("train", 60, 128, seed=0)
    checked = 0
    for i in range(len(ds)):
        s = ds[i]
        words = s["sentence"].split()
        head = words[: words.index(next(w for w in words if w in KINDS + ("shape",))) + 1]
        colours = [w for w in head if w in COLOURS]
        if colours:  # the target's own colour, measured from the image
            rgb = s["image"][s["mask"]].mean(0)
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - rgb).sum())
            assert nearest == colours[0], s["sentence"]
            checked += 1
    assert checked > 10


def test_shapes_sentence_types_match_their_words():
    """Each sample names its sentence type (eval.py reports metrics per type): a relation names
    another shape, a position an extreme, an attribute sentence neither."""
    ds = data.ShapesDataset("val", 80, 128, seed=0)
    relation = [r for r in RELATIONS]
    position = [w for *_, words in EXTREMES for w in words]
    seen = set()
    for i in range(len(ds)):
        s, kind = ds[i]["sentence"], ds[i]["sentence_type"]
        has_rel = any(f" {r} the " in s for r in relation)
        has_pos = any(w in s for w in position)
        expected = "relation" if has_rel else "position" if has_pos else "attribute"
        assert kind == expected, (s, kind)
        seen.add(kind)
    assert seen == set(SENTENCE_TYPES)


def test_flip_sentence():
    assert data.flip_sentence("the circle on the left of the leftmost square") == \
        "the circle on the right of the rightmost square"
    assert data.flip_sentence("cleft palate") == "cleft palate"


@pytest.mark.parametrize("spec,canvas", [
    (InputSpec(64, "square"), (64, 64)),
    (InputSpec(64, "longest"), (64, 64)),
    (InputSpec(32, "shorter", max_size=48, pad_multiple=16), (32, 48)),
])
def test_preprocess_and_collate(spec, canvas):
    tok = ClipTokenizer(12)
    raw = dict(image=np.zeros((40, 80, 3), np.uint8), sentence="the red circle",
               mask=np.zeros((40, 80), bool), instances=np.zeros((2, 40, 80), bool), target_index=1)
    raw["mask"][10:20, 30:50] = True
    raw["instances"][1] = raw["mask"]
    prep = data.Preprocess(spec, tok, candidates=True, keep_original=True)
    items = [prep(raw), prep(dict(raw, sentence="a much longer sentence about a red circle"))]
    for k, it in enumerate(items):
        it["index"] = k
    batch = data.collate(items, tok.pad_id)
    assert batch["image"].shape == (2, 3, *canvas)
    assert batch["mask"].shape == (2, 1, *canvas)
    assert batch["cand_masks"].shape == (2, 2, *canvas) and batch["cand_valid"].all()
    h, w = spec.resized_hw(40, 80)
    assert batch["image_mask"][0].sum() == h * w
    assert batch["text_mask"].sum(1).tolist() == [len(items[0]["text"]), len(items[1]["text"])]
    assert (batch["text"][0, len(items[0]["text"]):] == tok.pad_id).all()
    # back to the original resolution: the target mask, as logits, comes back where it was
    logits = batch["mask"][0] * 20 - 10
    back = data.to_original(logits, batch["valid_hw"][0], batch["orig_hw"][0]) > 0
    assert back.shape == (40, 80)
    assert (back == torch.from_numpy(raw["mask"])).float().mean() > 0.97


def test_augmentation_depends_only_on_seed_epoch_index():
    base = data.ShapesDataset("train", 8, 64)
    prep = data.Preprocess(InputSpec(64), ClipTokenizer(20), augment=True)
    a, b = data.PreparedDataset(base, prep, seed=1), data.PreparedDataset(base, prep, seed=1)
    a.set_epoch(2), b.set_epoch(2)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(8))
    flipped = [not torch.equal(a[i]["image"], data.PreparedDataset(base, data.Preprocess(
        InputSpec(64), ClipTokenizer(20)), seed=1)[i]["image"]) for i in range(8)]
    assert 0 < sum(flipped) < 8  # some, not all, samples are mirrored


def test_shard_sampler_covers_every_sample_once():
    for n, world in ((10, 3), (7, 2), (1, 4)):
        got = sorted(i for r in range(world) for i in data.ShardSampler(n, r, world))
        assert got == list(range(n))


def test_images_leave_workers_as_uint8_and_are_normalised_on_the_device():
    """Preprocess keeps the image uint8 (a quarter of float32's bytes between processes);
    collate pads it with 0; to_device normalises it with the spec's statistics, zero on the
    padding, and moves every tensor, the per-sample `gt` list included."""
    spec = InputSpec(32, "shorter", max_size=48, pad_multiple=16, mean=(0.4, 0.5, 0.6),
                     std=(0.2, 0.25, 0.3))
    rng = np.random.default_rng(0)
    raws = [dict(image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8), sentence="a thing",
                 mask=np.ones((h, w), bool)) for h, w in ((32, 40), (40, 32))]
    prep = data.Preprocess(spec, ClipTokenizer(8), keep_original=True)
    items = [dict(prep(r), index=k) for k, r in enumerate(raws)]
    assert items[0]["image"].dtype == torch.uint8 and items[0]["canvas_hw"] == (32, 48)
    # no resize needed for the first image: its pixels pass through unchanged
    stored = torch.from_numpy(raws[0]["image"]).permute(2, 0, 1)
    assert torch.equal(items[0]["image"], stored)
    batch = data.collate(items)
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (2, 3, 48, 48)
    assert torch.equal(batch["image"][0, :, :32, :40], stored)
    assert (batch["image"][0, :, 32:] == 0).all() and not batch["image_mask"][0, 32:].any()
    assert batch["image_mask"][1, :40, :32].all() and not batch["image_mask"][1, :, 32:].any()
    x = data.to_device(batch, "cpu", spec)["image"]
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    real = torch.from_numpy(raws[0]["image"]).permute(2, 0, 1).float() / 255
    assert x.dtype == torch.float32
    assert torch.allclose(x[0, :, :32, :40], (real - mean) / std, atol=1e-6)
    assert (x[0, :, 32:] == 0).all() and (x[1, :, :, 40:] == 0).all()  # padding is 0
    on_meta = data.to_device(batch, "meta", spec)  # no tensor stays behind on the CPU
    assert on_meta["image"].is_meta and all(g.is_meta for g in on_meta["gt"])
    with pytest.raises(ValueError, match="InputSpec"):
        data.to_device(batch, "cpu")


def test_uint8_resize_matches_the_float_resize():
    """Resizing in uint8 agrees with a float resize rounded to uint8 within one grey level."""
    image = np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    x, hw = data.resize_image(image, InputSpec(64, "longest"))
    assert x.dtype == torch.uint8 and hw == (43, 64)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=hw, mode="bilinear",
        align_corners=False, antialias=True)[0].round().clamp(0, 255)
    assert (x.float() - ref).abs().max() <= 1


def test_instances_are_decoded_only_for_a_model_that_takes_candidates(refer_root, monkeypatch):
    shapes = data.build_dataset("shapes", "val", shapes_size=4, shapes_image_size=64)
    assert "instances" not in shapes[0] and shapes[0]["mask"].any()
    assert shapes[0]["target_index"] == -1
    oracle = data.build_dataset("shapes", "val", shapes_size=4, shapes_image_size=64,
                                candidates="oracle")
    assert np.array_equal(oracle[0]["mask"], shapes[0]["mask"])
    assert np.array_equal(oracle[0]["instances"][oracle[0]["target_index"]], shapes[0]["mask"])

    decoded = []
    real = decode_segmentation
    monkeypatch.setattr(common.refer, "decode_segmentation",
                        lambda *a: decoded.append(1) or real(*a))
    plain = data.build_dataset("refcoco", "train", data_root=str(refer_root))[0]
    assert "instances" not in plain and len(decoded) == 1  # the referred object alone
    assert plain["mask"].sum() == 10 * 10 * 2 - 6 * 6
    full = data.build_dataset("refcoco", "train", data_root=str(refer_root),
                              candidates="oracle")[0]
    assert len(decoded) == 1 + 2 and np.array_equal(full["mask"], plain["mask"])


def test_degenerate_polygons_are_skipped():
    """Polygons of fewer than 6 coordinates (a point, a line) cover no pixel: skipped; an
    annotation made only of them is an empty mask. (pycocotools reads 4 numbers as a box.)"""
    square = [2, 2, 12, 2, 12, 12, 2, 12]
    alone = decode_segmentation([square], 20, 30)
    assert alone.sum() == 100
    for degenerate in ([5, 5], [1, 2, 3, 4], []):
        assert np.array_equal(decode_segmentation([degenerate, square], 20, 30), alone)
        empty = decode_segmentation([degenerate], 20, 30)
        assert empty.shape == (20, 30) and empty.dtype == bool and not empty.any()
    assert not decode_segmentation([], 20, 30).any()


def test_mask_resize_is_nearest_exact():
    masks = np.random.default_rng(2).random((3, 37, 53)) > 0.5
    for hw in ((64, 91), (20, 30), (37, 53), (1, 1)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(masks).to(torch.uint8)[None],
                                              size=hw, mode="nearest-exact")[0].bool()
        assert torch.equal(data.resize_masks(masks, hw), ref)


def test_samples_without_images_for_the_feature_cache(refer_root):
    """build_dataset(images=False), for a run whose frozen image features all come from
    common.cache: no image file is opened, samples carry the image's size, and batches are the
    same as with images, less the image itself."""
    spec, tok = InputSpec(32, "shorter", max_size=48, pad_multiple=16), ClipTokenizer(8)
    prep = data.Preprocess(spec, tok, candidates=True, keep_original=True)

    def batch(**kw):
        ds = data.build_dataset("refcoco", "train", data_root=str(refer_root),
                                candidates="oracle", **kw)
        return data.collate([dict(prep(ds[i]), index=i) for i in range(len(ds))])

    full = batch()
    (refer_root / "images" / "train2014" / "COCO_train2014_000000000009.jpg").unlink()
    with pytest.raises(FileNotFoundError):
        batch()
    lean = batch(images=False)
    assert "image" not in lean and set(full) - set(lean) == {"image"}
    for key, value in lean.items():
        if torch.is_tensor(value):
            assert torch.equal(value, full[key]), key
        elif key == "gt":
            assert all(torch.equal(a, b) for a, b in zip(value, full[key]))
        else:
            assert value == full[key], key
    shapes = data.build_dataset("shapes", "val", shapes_size=2, shapes_image_size=64,
                                images=False)[0]
    assert "image" not in shapes and shapes["image_hw"] == (64, 64)
