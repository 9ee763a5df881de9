"""Image-grouped batches (`--sentences-per-image K`): k sentences of one image share one frozen
image-encoder pass, exactly (fidelity to the per-sample computation, not to a paper: the papers
sample sentences independently, which stays the default)."""

import os

import pytest
import torch
from helpers import build, make_batch, ref, write_refer

import train
from common.cache import frozen_features
from common.checkpoint import load_checkpoint
from common.samplers import TrainSampler

KEYS = [f"im{(i * 7) % 9}" for i in range(40)]  # 40 sentences of 9 images, 4-5 each


def micro_batches(world, per, k=3, epoch=0):
    """Each rank's micro-batches of sample indices."""
    out = []
    for r in range(world):
        s = TrainSampler(40, r, world, seed=3, image_keys=KEYS, k=k, batch=per)
        s.set_epoch(epoch)
        idx = [i for _, i in s]
        out.append([idx[j : j + per] for j in range(0, len(idx), per)])
    return out


def test_grouped_batches_hold_k_sentences_of_each_image():
    def images_per_batch(k):
        counts = [len({KEYS[i] for i in b}) for rank in micro_batches(2, 6, k) for b in rank]
        return sum(counts) / len(counts), max(counts)

    # units of 3 (an image's last one shorter: 4-5 sentences make 3 + 1 or 3 + 2): two images a
    # batch when units are full, at most four; unrelated sentences span ~5 of the 9 images
    mean, most = images_per_batch(3)
    assert mean < 3 and most <= 4
    assert images_per_batch(1)[0] > 4
    every = [i for rank in micro_batches(1, 6) for b in rank for i in b]
    assert len(every) == len(set(every)) == 36  # 40 // 6 * 6, no sample twice
    assert micro_batches(1, 6, epoch=1) != micro_batches(1, 6, epoch=0)
    assert micro_batches(1, 6, epoch=1) == micro_batches(1, 6, epoch=1)


def test_grouped_steps_use_the_same_samples_whatever_the_split():
    """As for plain batches (see test_train_stack): a global step is one window of the order."""

    def steps(world, per, accum):
        ranks = micro_batches(world, per)
        n = min(len(r) for r in ranks) // accum
        return [sorted(i for r in ranks for b in r[s * accum:(s + 1) * accum] for i in b)
                for s in range(n)]

    assert steps(2, 4, 1) == steps(1, 8, 1) == steps(1, 4, 2)
    with pytest.raises(ValueError, match="image_key"):
        TrainSampler(40, 0, 1, seed=0, k=2)


def test_shared_image_features_give_the_per_sample_loss():
    model = build("maris", freeze_encoders=True).train()
    two = make_batch(model, n=2, split="train")
    rows = [0, 0, 1, 0]  # four sentences of two images
    batch = {k: (v[rows] if torch.is_tensor(v) else [v[i] for i in rows] if isinstance(v, list)
                 else v) for k, v in two.items()}
    encoded = []
    encode_image = model.encode_image
    model.encode_image = lambda image: encoded.append(len(image)) or encode_image(image)
    feats = frozen_features(model, batch)
    assert encoded == [2]  # one encoder pass, two images
    torch.manual_seed(0)
    shared = model(**model.inputs_from(batch), **feats, target=batch["mask"])
    torch.manual_seed(0)
    plain = model(**model.inputs_from(batch), target=batch["mask"])
    assert encoded == [2, 4]
    torch.testing.assert_close(shared["mask_logits"], plain["mask_logits"], rtol=1e-5, atol=1e-5)
    assert shared["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-5)
    # a flipped copy of an image is another image; distinct keys: the forward encodes as usual
    batch["image_key"] = [k + "|hflip" * (i == 1) for i, k in enumerate(batch["image_key"])]
    assert len(frozen_features(model, batch)["image_feats"]["f_v1"]) == 4
    assert frozen_features(model, two) == {}


def test_training_with_sentences_per_image_encodes_each_image_once(tmp_path, monkeypatch):
    """End to end on a REFER-format dataset: 3 images with 4 sentences each, k = 4, batch 4:
    every step holds one image, encoded once, and the run resumes to the same weights."""
    images = [{"id": i, "height": 24, "width": 32, "file_name": f"COCO_train2014_{i:012d}.jpg"}
              for i in (1, 2, 3)]
    anns = [{"id": 10 + i, "image_id": i, "category_id": 1,
             "segmentation": [[2, 2, 14, 2, 14, 14, 2, 14]]} for i in (1, 2, 3)]
    refs = [ref(i, 10 + i, i, split, *[f"thing {i} number {s}" for s in range(4)])
            for i in (1, 2, 3) for split in ("train",)]
    refs.append(ref(9, 11, 1, "val", "the thing"))
    write_refer(tmp_path / "refer", refs, images, anns)
    encoded = []
    from maris import MARIS

    encode_image = MARIS.encode_image
    monkeypatch.setattr(MARIS, "encode_image",
                        lambda self, image: encoded.append(len(image)) or encode_image(self, image))
    args = ["--model", "maris", "--freeze-encoders", "--dataset", "refcoco", "--data-root",
            str(tmp_path / "refer"), "--sentences-per-image", "4", "--batch-size", "4",
            "--epochs", "2", "--workers", "0", "--no-val", "--log-every", "1", "--no-augment"]
    train.main(args + ["--out", str(tmp_path / "a")])
    assert encoded == [1] * 6  # 2 epochs x 3 steps, one image each
    # a run killed in its 5th step (last.pt after epoch 0, step 3) resumes to the same weights
    features, calls = train.frozen_features, []

    def killed(*a, **k):  # the training step calls it once per micro-batch (no validation)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return features(*a, **k)

    monkeypatch.setattr(train, "frozen_features", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out", str(tmp_path / "b")])
    monkeypatch.setattr(train, "frozen_features", features)
    train.main(args + ["--out", str(tmp_path / "b"), "--resume", "auto"])
    a = load_checkpoint(os.path.join(tmp_path, "a", "last.pt"))["model"]
    b = load_checkpoint(os.path.join(tmp_path, "b", "last.pt"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
