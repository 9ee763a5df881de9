"""The frozen-encoder feature cache gives the same training loss as recomputing the encoders."""

import os

import pytest
import torch
from helpers import build, make_batch

import data
import train
from common.cache import FeatureCache
from common.checkpoint import load_checkpoint
from common.model import CacheableEncoders, RISModel, freeze


@pytest.fixture
def frozen():
    return build("maris", freeze_encoders=True)


def test_cached_and_uncached_training_give_the_same_loss(frozen, tmp_path):
    batch = make_batch(frozen, n=3, split="train")
    cache = FeatureCache(str(tmp_path), frozen)
    assert cache.parts == ["image", "text"]
    frozen.train()
    torch.manual_seed(0)
    plain = frozen(**frozen.inputs_from(batch), target=batch["mask"])["loss"]
    first = frozen(**frozen.inputs_from(batch), **cache.features(frozen, batch),
                   target=batch["mask"])
    assert cache.misses == 6 and cache.hits == 0  # 3 images + 3 sentences computed and stored
    again = frozen(**frozen.inputs_from(batch), **cache.features(frozen, batch),
                   target=batch["mask"])
    assert cache.hits == 6  # read back from disk
    # fp16 storage: equal within fp16 rounding of the features
    assert first["loss"].item() == pytest.approx(plain.item(), rel=2e-3)
    assert again["loss"].item() == pytest.approx(first["loss"].item(), rel=1e-6)
    again["loss"].backward()
    assert all(p.grad is None for p in frozen.image_encoder.parameters())


def test_half_written_entries_are_recomputed_never_read(frozen, tmp_path):
    batch = make_batch(frozen, n=2)
    cache = FeatureCache(str(tmp_path), frozen)
    cache.features(frozen, batch)
    image_dir = cache.dirs["image"]
    entry = sorted(os.listdir(image_dir))[0]
    with open(os.path.join(image_dir, entry), "r+b") as f:  # damage a complete entry
        f.truncate(100)
    open(os.path.join(image_dir, "abc.pt.tmp.123"), "wb").write(b"partial")  # an interrupted write
    fresh = FeatureCache(str(tmp_path), frozen)
    feats = fresh.features(frozen, batch)
    assert fresh.misses == 1 and fresh.hits == 3
    direct = frozen.encode_image(batch["image"])
    assert torch.allclose(feats["image_feats"]["f_v1"], direct["f_v1"], atol=1e-2)


def test_cache_keys_change_with_weights_and_preprocessing(frozen, tmp_path):
    a = FeatureCache(str(tmp_path), frozen)
    other = build("maris", freeze_encoders=True)
    with torch.no_grad():
        other.image_encoder.pos_embed.add_(1.0)
    b = FeatureCache(str(tmp_path), other)
    assert a.dirs["image"] != b.dirs["image"] and a.dirs["text"] == b.dirs["text"]
    bigger = build("maris", freeze_encoders=True, image_size=frozen.cfg.image_size + 32)
    assert FeatureCache(str(tmp_path), bigger).dirs["image"] != a.dirs["image"]


def test_cache_is_refused_when_it_would_be_stale(tmp_path):
    with pytest.raises(ValueError, match="no encoder is frozen"):
        FeatureCache(str(tmp_path), build("maris"))
    args = ["--model", "maris", "--freeze-encoders", "--cache-features", str(tmp_path / "c"),
            "--shapes-train-size", "8", "--batch-size", "4", "--out", str(tmp_path / "r")]
    with pytest.raises(ValueError, match="--no-augment"):
        train.main(args)
    train.main(args + ["--no-augment", "--epochs", "1", "--shapes-eval-size", "4"])
    assert os.listdir(tmp_path / "c" / "image")


class _TwoEncoders(RISModel, CacheableEncoders):
    """The smallest model that follows the cache's contract."""

    def __init__(self):
        super().__init__()
        self.image_encoder, self.text_encoder = torch.nn.Linear(3, 2), torch.nn.Embedding(5, 2)

    def encode_image(self, image):
        return {"pooled": self.image_encoder(image.mean((2, 3)))}

    def encode_text(self, text, text_mask):
        return {"words": self.text_encoder(text)}


def test_cacheable_encoders_contract():
    """frozen_parts names what `freeze` froze; `encoded` takes given features, computes the rest."""
    model = _TwoEncoders()
    assert model.frozen_parts() == set()
    freeze(model.text_encoder)
    assert model.frozen_parts() == {"text"}
    image, text, text_mask = torch.randn(2, 3, 4, 4), torch.tensor([[1, 2], [3, 0]]), None
    cached = {"words": torch.zeros(2, 2, 2)}
    image_feats, text_feats = model.encoded(image, text, text_mask, None, cached)
    assert text_feats is cached
    assert torch.equal(image_feats["pooled"], model.encode_image(image)["pooled"])
    _, text_feats = model.encoded(image, text, text_mask, None, None)
    assert torch.equal(text_feats["words"], model.text_encoder(text))


def _losses(run_dir) -> list:
    import json

    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [(r["step"], r.get("loss"), r.get("val", {}).get("mIoU"))
                for r in map(json.loads, f)]


def test_a_fully_cached_split_is_read_without_its_images(tmp_path, monkeypatch):
    """Once every image of a split is cached, the loader stops shipping images, and the run is
    the same run: identical losses and val metrics to one that keeps reading them."""
    seen = []  # (epoch, "image" in batch) for every training batch
    features, evaluate = train.frozen_features, train.evaluate

    def spy_features(raw, batch, cache=None):
        if raw.training:  # the training step's; evaluation's are counted by spy_evaluate
            seen.append(("train", batch.get("image") is not None))
        return features(raw, batch, cache)

    def spy_evaluate(model, loader, *a, **k):
        seen.append(("val", loader.dataset.base.with_images))
        return evaluate(model, loader, *a, **k)

    monkeypatch.setattr(train, "frozen_features", spy_features)
    monkeypatch.setattr(train, "evaluate", spy_evaluate)
    args = ["--model", "maris", "--freeze-encoders", "--no-augment", "--shapes-train-size", "8",
            "--batch-size", "4", "--shapes-eval-size", "4", "--epochs", "3", "--workers", "0",
            "--log-every", "1"]
    train.main(args + ["--cache-features", str(tmp_path / "c1"), "--out", str(tmp_path / "a")])
    # epoch 0 fills the cache (2 steps, then val); epochs 1 and 2 read no image
    assert seen == [("train", True)] * 2 + [("val", True)] + [("train", False)] * 2 + \
        [("val", False)] + [("train", False)] * 2 + [("val", False)]
    seen.clear()
    monkeypatch.setattr(data, "cached_splits", lambda *a: [])
    train.main(args + ["--cache-features", str(tmp_path / "c2"), "--out", str(tmp_path / "b")])
    assert all(with_images for _, with_images in seen)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_a_missing_entry_without_the_image_is_a_clear_error(frozen, tmp_path):
    batch = make_batch(frozen, n=2)
    cache = FeatureCache(str(tmp_path), frozen)
    assert not cache.holds("image", batch["image_key"])
    cache.features(frozen, batch)
    assert cache.holds("image", batch["image_key"])
    os.remove(cache._path("image", batch["image_key"][1]))
    del batch["image"]
    with pytest.raises(RuntimeError, match="read without its images"):
        cache.features(frozen, batch)


@pytest.mark.slow
def test_two_processes_switch_to_cached_features_together(tmp_path):
    """Under DDP each rank caches its share; both stop reading images in the same epoch."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(root, "train.py"), "--model", "maris", "--freeze-encoders",
           "--no-augment", "--cache-features", str(tmp_path / "c"), "--shapes-train-size", "16",
           "--batch-size", "4", "--shapes-eval-size", "8", "--epochs", "2", "--workers", "0",
           "--out", str(tmp_path / "r")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "holds every train image" in res.stdout and "holds every val image" in res.stdout
    assert load_checkpoint(str(tmp_path / "r" / "last.pt"))["epoch"] == 2


@pytest.mark.parametrize("storage, bound", [("fp16", 2**-11), ("bf16", 2**-8), ("int8", None)])
def test_stored_features_round_trip_within_their_format(storage, bound):
    """pack/unpack: fp16/bf16 round to their mantissa; int8 errs by at most half a step of its
    channel's scale (largest |value| of the channel / 127)."""
    from common.cache import pack, unpack

    x = torch.randn(6, 5, 8) * torch.logspace(-2, 2, 8)  # channels of very different ranges
    back = unpack(pack(x, storage))
    assert back.dtype == torch.float32 and back.shape == x.shape
    if bound is not None:
        assert ((back - x).abs() <= bound * x.abs() + 2**-25).all()  # + fp16's subnormal step
    else:
        step = x.abs().amax(dim=(0, 1)) / 127
        assert ((back - x).abs() <= step * 0.5 * 1.002).all()  # the fp16-rounded scale
        assert pack(x, storage)["q"].dtype == torch.int8


def test_int8_storage_halves_the_cache_and_keeps_the_loss(frozen, tmp_path):
    batch = make_batch(frozen, n=2, split="train")
    losses, sizes = {}, {}
    for storage in ("fp16", "int8"):
        cache = FeatureCache(str(tmp_path), frozen, storage)
        for _ in range(2):  # computed, then read back: the same numbers
            out = frozen(**frozen.inputs_from(batch), **cache.features(frozen, batch),
                         target=batch["mask"])
            losses.setdefault(storage, []).append(out["loss"].item())
        sizes[storage] = sum(os.path.getsize(os.path.join(cache.dirs["image"], f))
                             for f in os.listdir(cache.dirs["image"]))
    assert losses["int8"][0] == losses["int8"][1] and losses["fp16"][0] == losses["fp16"][1]
    assert losses["int8"][0] == pytest.approx(losses["fp16"][0], rel=2e-2)
    assert sizes["int8"] < 0.6 * sizes["fp16"]
    with pytest.raises(ValueError, match="storage"):
        FeatureCache(str(tmp_path), frozen, "fp8")


def test_storage_error_orders_the_formats_by_precision(frozen):
    """common.cache.storage_error (python -m common.cache): fp16 keeps more than bf16 and int8."""
    from common.cache import storage_error

    frozen.train()
    report = storage_error(frozen, make_batch(frozen, n=2))
    errors = [report[s]["feature_rel_error"] for s in ("fp16", "bf16", "int8")]
    assert 0 < errors[0] < errors[1] and errors[0] < errors[2] < 0.05
    assert all(0 <= r["pixels_flipped"] < 0.5 for r in report.values())
    assert frozen.training  # measured in eval mode, then put back


def test_a_bit_flipped_entry_is_removed_and_recomputed(frozen, tmp_path):
    """A flipped bit in a stored feature unpickles fine: the entry's sha256 catches it."""
    batch = make_batch(frozen, n=1)
    cache = FeatureCache(str(tmp_path), frozen, storage="fp16")
    good = cache.features(frozen, batch)["image_feats"]["f_v1"]
    path = os.path.join(cache.dirs["image"], os.listdir(cache.dirs["image"])[0])
    entry = torch.load(path, weights_only=True)
    entry["f_v1"].view(-1).view(torch.int16)[5] ^= 1 << 14
    torch.save(entry, path)  # its old checksum, new bytes
    fresh = FeatureCache(str(tmp_path), frozen, storage="fp16")
    with pytest.warns(UserWarning, match="damaged"):
        again = fresh.features(frozen, batch)["image_feats"]["f_v1"]
    assert fresh.misses == 1 and torch.equal(again, good)


def test_refer_images_are_keyed_by_their_file_not_their_id(tmp_path):
    """Two REFER-format datasets whose images share ids but not files must not share cached
    features: the key names the image file, not only its id."""
    from helpers import ref, write_refer

    keys = []
    for root in (tmp_path / "a", tmp_path / "b"):
        write_refer(root, [ref(1, 1, 9, "train", "thing")],
                    [{"id": 9, "file_name": "x.jpg", "height": 20, "width": 30}],
                    [{"id": 1, "image_id": 9, "category_id": 1, "area": 4, "iscrowd": 0,
                      "bbox": [0, 0, 2, 2], "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}])
        keys.append(data.build_dataset("refcoco", "train", data_root=str(root)).image_key(0))
    assert keys[0] != keys[1] and keys[0].startswith("file:")
