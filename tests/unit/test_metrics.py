import pytest
import torch

from unet_export.metrics import decision_margin, dice_score, logits_to_mask


def test_dice_of_identical_masks_is_one_and_empty_vs_empty_is_one():
    mask = torch.tensor([[[0, 1], [2, 2]]])
    assert dice_score(mask, mask, n_classes=3) == pytest.approx(1.0)
    empty = torch.zeros(1, 4, 4, dtype=torch.long)
    assert dice_score(empty, empty, n_classes=2) == pytest.approx(1.0)
    assert dice_score(empty, empty, n_classes=1) == pytest.approx(1.0)


def test_dice_matches_hand_computed_value_with_background_dropped():
    pred = torch.tensor([[[1, 1, 0, 0]]])
    true = torch.tensor([[[1, 0, 0, 0]]])
    # class 1 only: 2*1 / (2 + 1); class 0 (background) is not counted
    assert dice_score(pred, true, n_classes=2) == pytest.approx(2 / 3, abs=1e-5)
    # three classes: class 1 as above, class 2 empty in both -> 1; mean over classes
    assert dice_score(pred, true, n_classes=3) == pytest.approx((2 / 3 + 1) / 2, abs=1e-5)


def test_dice_is_mean_over_images():
    pred = torch.tensor([[[1, 1]], [[0, 0]]])
    true = torch.tensor([[[1, 1]], [[1, 1]]])
    assert dice_score(pred, true, n_classes=2) == pytest.approx(0.5, abs=1e-5)


def test_masks_and_margins_for_one_and_many_classes():
    one = torch.tensor([[[[-1.0, 0.5]]]])
    assert logits_to_mask(one).tolist() == [[[0, 1]]]
    assert decision_margin(one).tolist() == [[[1.0, 0.5]]]
    many = torch.tensor([[[[1.0]], [[3.0]], [[2.5]]]])
    assert logits_to_mask(many).tolist() == [[[1]]]
    assert decision_margin(many).tolist() == [[[0.5]]]
