"""Bad input gets a defined behaviour and a clear error; nothing is silently wrong."""

import dataclasses
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from helpers import build, ref, write_refer
from PIL import Image

import data
import eval as eval_cli
from common.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from common.images import load_image
from common.refer import load_instances, load_refs


@pytest.fixture(scope="module")
def model():
    return build("maris").eval()


def save(im: Image.Image, path, **kw):
    im.save(path, **kw)
    return str(path)


RGB = np.random.default_rng(0).integers(0, 255, (24, 36, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", ["L", "RGBA", "P", "P-transparent", "I;16", "CMYK", "LA", "1"])
def test_image_modes_become_rgb(tmp_path, kind, model):
    im = Image.fromarray(RGB)
    if kind == "I;16":
        arr = (np.arange(24 * 36).reshape(24, 36) * 70).astype(np.uint16)
        im = Image.fromarray(arr)  # uint16 -> mode I;16
        path = save(im, tmp_path / "x.png")
    elif kind == "CMYK":
        path = save(im.convert("CMYK"), tmp_path / "x.jpg")
    elif kind == "P-transparent":
        p = im.convert("P")
        p.info["transparency"] = 0
        path = save(p, tmp_path / "x.png", transparency=0)
    else:
        path = save(im.convert(kind), tmp_path / "x.png")
    arr = load_image(path)
    assert arr.shape == (24, 36, 3) and arr.dtype == np.uint8
    if kind == "I;16":  # 16 bits scaled to 8, not clipped: the brightest pixel stays bright
        assert arr.max() > 200 and arr.min() == 0
    if kind == "RGBA":  # fully opaque: the colours survive
        assert np.array_equal(arr, RGB)
    mask, _ = eval_cli.predict(model, arr, "the red circle")
    assert mask.shape == (24, 36) and mask.dtype == bool


def test_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    arr = load_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "t.png"))
    assert (arr == 255).all()


def test_exif_rotation_gives_the_mask_in_the_orientation_the_user_sees(tmp_path, model):
    """A user's own photo (single-image prediction) is turned as its EXIF tag says."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(Image.fromarray(RGB), tmp_path / "r.jpg", exif=exif)
    assert load_image(path).shape == (24, 36, 3)  # stored orientation by default
    arr = load_image(path, exif=True)
    assert arr.shape == (36, 24, 3)
    mask, _ = eval_cli.predict(model, arr, "the shape")
    assert mask.shape == (36, 24)
    out = str(tmp_path / "m.png")
    args = eval_cli.parse_args(["--checkpoint", "unused.pt", "--image", path, "--text",
                                "the shape", "--save-mask", out])
    eval_cli.run_predict(args, model, "cpu")
    assert np.asarray(Image.open(out)).shape == (36, 24)


@pytest.mark.parametrize("orientation,hw", [(3, (24, 36)), (2, (24, 36)), (6, (32, 32))])
def test_dataset_images_ignore_exif_so_masks_stay_aligned(tmp_path, orientation, hw):
    """COCO polygons are drawn on the stored pixels: a REFER image whose EXIF tag rotates it by
    180 degrees (3), mirrors it (2) or turns a square image (6), all without changing its size,
    is still read as stored, and its mask covers the object it outlines."""
    h, w = hw
    stored = np.zeros((h, w, 3), np.uint8)
    stored[: h // 2, : w // 2] = 255  # a bright object in the top-left quarter
    images = [{"id": 1, "height": h, "width": w, "file_name": "COCO_train2014_000000000001.jpg"}]
    anns = [{"id": 7, "image_id": 1, "category_id": 1,
             "segmentation": [[0, 0, w // 2, 0, w // 2, h // 2, 0, h // 2]]}]
    write_refer(tmp_path, [ref(0, 7, 1, "val", "the bright one")], images, anns)
    exif = Image.Exif()
    exif[0x0112] = orientation
    save(Image.fromarray(stored), tmp_path / "images" / "train2014" / images[0]["file_name"],
         exif=exif, quality=95)
    sample = data.ReferDataset(str(tmp_path), "refcoco", "val")[0]
    assert sample["image"].shape == (h, w, 3)
    inside, outside = sample["image"][sample["mask"]], sample["image"][~sample["mask"]]
    assert inside.mean() > 200 and outside.mean() < 60


def test_truncated_and_corrupt_images_name_the_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(RGB).save(buf, "JPEG")
    (tmp_path / "half.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for name in ("half.jpg", "junk.png"):
        with pytest.raises(data.ImageError, match=name):
            load_image(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(str(tmp_path / "missing.png"))


class Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 1:
            raise data.ImageError("cannot decode image 'bad.jpg'")
        return data.ShapesDataset("val", 4, 64)[i]


def test_training_skips_and_counts_undecodable_images_evaluation_stops(model):
    prep = data.Preprocess(model.input_spec, model.tokenizer)
    ds = data.PreparedDataset(Broken(), prep, skip_bad=True)
    with pytest.warns(UserWarning, match="bad.jpg"):
        batch = data.collate([ds[i] for i in range(4)])
    assert batch["skipped"] == 1 and len(batch["image"]) == 3
    strict = data.PreparedDataset(Broken(), prep)
    with pytest.raises(data.ImageError, match="bad.jpg"):
        strict[1]


@pytest.mark.parametrize("hw", [(1, 1), (1, 300), (2400, 1700)])
def test_tiny_and_large_images(model, hw):
    image = np.full((*hw, 3), 128, np.uint8)
    mask, _ = eval_cli.predict(model, image, "the big blue square")
    assert mask.shape == hw


def test_sentences_empty_long_and_non_ascii(model):
    image = RGB.copy()
    for bad in ("", "   \t"):
        with pytest.raises(ValueError, match="empty sentence"):
            eval_cli.predict(model, image, bad)
    long = " ".join(["the red circle left of the blue square"] * 10)
    prep = data.Preprocess(model.input_spec, model.tokenizer)
    item = prep(dict(image=image, sentence=long, mask=np.zeros(image.shape[:2], bool)))
    assert item["truncated"] and len(item["text"]) == model.tokenizer.max_len
    for text in ("der rote Kreis ganz links", "красный круг", "赤い丸", "the café’s red circle"):
        mask, _ = eval_cli.predict(model, image, text)
        assert mask.shape == image.shape[:2]


def test_corrupt_annotation_files(tmp_path):
    good = pickle.dumps([{"ref_id": 0}], protocol=2)
    (tmp_path / "trunc.p").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt REFER refs file"):
        load_refs(str(tmp_path / "trunc.p"))
    (tmp_path / "notlist.p").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ValueError, match="not a REFER refs file"):
        load_refs(str(tmp_path / "notlist.p"))
    (tmp_path / "bad.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="corrupt COCO instances file"):
        load_instances(str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text(json.dumps({"info": {}}))
    with pytest.raises(ValueError, match="not a COCO instances file"):
        load_instances(str(tmp_path / "other.json"))
    with pytest.raises(FileNotFoundError, match="expected layout"):
        load_instances(str(tmp_path / "none.json"))


def test_corrupt_and_mismatched_checkpoints(tmp_path, model):
    path = str(tmp_path / "c.pt")
    ckpt = dict(model_name="maris", config=dataclasses.asdict(model.cfg), model=model.state_dict())
    save_checkpoint(ckpt, path)
    raw = open(path, "rb").read()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(str(tmp_path / "trunc.pt"))
    # another config: the mismatching weights are listed
    other = dict(ckpt, config=dict(ckpt["config"], dim=32))
    with pytest.raises(ValueError, match="shape mismatch.*enhance"):
        build_model_from_checkpoint(other)
    with pytest.raises(ValueError, match="not fields of MARISConfig"):
        build_model_from_checkpoint(dict(ckpt, config=dict(ckpt["config"], n_queries=24)))
    # a checkpoint that would run code when unpickled is refused by weights_only loading
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"model_name": "maris", "model": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()
