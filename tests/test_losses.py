import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as tv_focal

from common import losses


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.25, 1.0), (0.0, 2.0), (-1.0, 0.5)])
@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
def test_focal_matches_torchvision(rng, alpha, gamma, soft):
    """Fidelity to torchvision.ops.sigmoid_focal_loss (Lin et al. 2017, Eq. 5) for the paper's
    alpha and gamma and for others: an odd gamma and soft targets tell p_t's two terms apart
    (at gamma = 2 on 0/1 targets a sign slip in p_t is invisible), alpha = 0 weights only the
    background and alpha < 0 turns the weighting off."""
    logits = torch.randn(2, 1, 8, 8, generator=rng) * 3
    target = torch.rand(2, 1, 8, 8, generator=rng)
    target = target if soft else (target > 0.5).float()
    ours = losses.sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma)
    ref = tv_focal(logits, target, alpha=alpha, gamma=gamma, reduction="mean")
    assert torch.allclose(ours, ref, atol=1e-6)


def test_focal_hand_computed():
    # one pixel, logit 0 -> p = 0.5; target 1: alpha * (1-p)^2 * -log(p)
    value = losses.sigmoid_focal_loss(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    assert value.item() == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-6)


def test_dice_hand_computed():
    # p = sigmoid(0) = 0.5 everywhere on 4 pixels, target has 2 ones:
    # dice = (2 * 1.0 + 1) / (2.0 + 2 + 1) = 0.6
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert losses.dice_loss(logits, target).item() == pytest.approx(1 - 0.6)


def test_dice_perfect_prediction_is_zero():
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    logits = (target * 2 - 1) * 50
    assert losses.dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_bce_hand_computed():
    value = losses.bce_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_select_loss_ignores_padded_candidates():
    scores = torch.tensor([[2.0, 0.0, 100.0]])
    valid = torch.tensor([[True, True, False]])
    value = losses.select_loss(scores, valid, torch.tensor([0]))
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_reconstruction_is_mse():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    assert losses.reconstruction_loss(a, b).item() == pytest.approx((1 + 4) / 2)
