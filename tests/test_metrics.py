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
