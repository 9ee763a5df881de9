import pytest
import torch

from common.metrics import IoUAccumulator, iou


def masks(*rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_iou_hand_made():
    pred = masks([1, 1, 0, 0])
    gt = masks([0, 1, 1, 0])
    assert iou(pred[None], gt[None]).item() == pytest.approx(1 / 3)


def test_empty_prediction_and_empty_target():
    empty, full = masks([0, 0]), masks([1, 1])
    assert iou(empty[None], full[None]).item() == 0.0  # missed everything
    assert iou(full[None], empty[None]).item() == 0.0  # found something that is not there
    assert iou(empty[None], empty[None]).item() == 1.0  # nothing to find, nothing found


def test_accumulator_hand_made():
    acc = IoUAccumulator()
    acc.update(masks([1, 1, 0, 0]), masks([0, 1, 1, 0]))  # 1/3
    acc.update(masks([1, 1, 1, 1]), masks([1, 1, 1, 0]))  # 3/4
    acc.update(masks([0, 0, 0, 0]), masks([1, 1, 0, 0]))  # 0
    m = acc.compute()
    assert m["n"] == 3
    assert m["mIoU"] == pytest.approx((1 / 3 + 3 / 4 + 0) / 3)
    assert m["oIoU"] == pytest.approx((1 + 3 + 0) / (3 + 4 + 2))
    assert m["Pr@0.5"] == pytest.approx(1 / 3)
    assert m["Pr@0.7"] == pytest.approx(1 / 3)
    assert m["Pr@0.8"] == 0.0


def test_precision_threshold_is_inclusive():
    acc = IoUAccumulator()
    acc.update(masks([1, 1, 0, 0]), masks([1, 1, 1, 1]))  # IoU exactly 0.5
    assert acc.compute()["Pr@0.5"] == 1.0


def test_sums_add_up_like_one_accumulator():
    """Summing two accumulators (what all_reduce does) equals accumulating all samples at once."""
    g = torch.Generator().manual_seed(0)
    samples = [(torch.rand(5, 5, generator=g) > 0.5, torch.rand(5, 5, generator=g) > 0.5)
               for _ in range(7)]
    whole, a, b = IoUAccumulator(), IoUAccumulator(), IoUAccumulator()
    for k, (p, t) in enumerate(samples):
        whole.update(p, t)
        (a if k % 2 else b).update(p, t)
    a.sums += b.sums
    assert a.compute() == pytest.approx(whole.compute())


def test_one_pixel_unions():
    """IoU's empty-union rule applies to an empty union only: a one-pixel union is an ordinary
    ratio (1 when the pixel is in both masks, 0 when in one)."""
    one, none = masks([1, 0]), masks([0, 0])
    assert iou(one[None], one[None]).item() == 1.0
    assert iou(one[None], none[None]).item() == 0.0
    acc = IoUAccumulator()
    assert acc.add(0, 1) == 0.0 and acc.add(1, 1) == 1.0 and acc.add(0, 0) == 1.0
    m = acc.compute()
    assert m["mIoU"] == pytest.approx(2 / 3) and m["Pr@0.9"] == pytest.approx(2 / 3)
    assert m["oIoU"] == 0.5
    missed = IoUAccumulator()
    missed.add(0, 1)
    assert missed.compute()["oIoU"] == 0.0


def test_overall_iou_of_low_scoring_and_empty_splits():
    """oIoU is the intersections over the unions whatever the per-sample IoUs (a split where no
    sample reaches 0.5 still has one); a split whose every mask is empty scores 1 as each of its
    samples does; an accumulator with no sample reports zeros and n = 0."""
    acc = IoUAccumulator()
    acc.add(1, 4)
    assert acc.compute()["oIoU"] == 0.25 and acc.compute()["Pr@0.5"] == 0.0
    empty = IoUAccumulator()
    empty.update(masks([0, 0]), masks([0, 0]))
    assert empty.compute() == {"mIoU": 1.0, "oIoU": 1.0, "Pr@0.5": 1.0, "Pr@0.6": 1.0,
                               "Pr@0.7": 1.0, "Pr@0.8": 1.0, "Pr@0.9": 1.0, "n": 1}
    assert IoUAccumulator().compute() == {"mIoU": 0.0, "oIoU": 0.0, "Pr@0.5": 0.0, "Pr@0.6": 0.0,
                                          "Pr@0.7": 0.0, "Pr@0.8": 0.0, "Pr@0.9": 0.0, "n": 0}


def test_sums_are_exact_at_dataset_scale():
    """Pixel counts over a split pass 2^24 (RefCOCO val: ~10k samples of ~10^5 pixels), where a
    float32 sum stops counting single pixels: the sums are float64."""
    acc = IoUAccumulator()
    acc.add(0, 2**24)
    acc.add(1, 1)
    assert acc.compute()["oIoU"] == 1 / (2**24 + 1)


def test_all_reduce_in_a_process_group_of_one(tmp_path):
    """Consistency: under an initialised (gloo) process group all_reduce sums the counts on the
    CPU and keeps them; with one process the metrics are unchanged. Two processes: test_recovery's
    distributed evaluation."""
    import torch.distributed as dist

    acc = IoUAccumulator()
    acc.update(masks([1, 1, 0, 0]), masks([0, 1, 1, 0]))
    before = acc.compute()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        assert acc.all_reduce() is acc
    finally:
        dist.destroy_process_group()
    assert acc.sums.device.type == "cpu" and acc.sums.dtype == torch.float64
    assert acc.compute() == before
