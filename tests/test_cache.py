"""The frozen-encoder feature cache gives the same training loss as recomputing the encoders."""

import os

import pytest
import torch
from helpers import build, make_batch

import train
from common.cache import FeatureCache
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
