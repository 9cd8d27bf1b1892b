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


def test_one_class_is_decided_at_the_threshold_and_its_margin_measured_from_it():
    probs = torch.tensor([[[[0.2, 0.5, 0.7]]]])
    assert logits_to_mask(probs, 0.5).tolist() == [[[0, 0, 1]]]  # at the threshold is no foreground
    assert logits_to_mask(probs).tolist() == [[[1, 1, 1]]]  # read as logits: every pixel above 0
    assert decision_margin(probs, 0.5)[0, 0].tolist() == pytest.approx([0.3, 0.0, 0.2])
    many = torch.tensor([[[[0.1]], [[0.7]], [[0.2]]]])  # more classes: argmax, whatever the threshold
    assert logits_to_mask(many, 0.5).tolist() == logits_to_mask(many).tolist() == [[[1]]]
    assert decision_margin(many, 0.5).item() == pytest.approx(0.5)


@pytest.mark.parametrize("config, threshold", [
    ({"n_classes": 1}, 0.0),  # logits
    ({"n_classes": 1, "sigmoid": False}, 0.0),
    ({"n_classes": 1, "sigmoid": True}, 0.5),  # reflect-sigmoid: probabilities
    ({"n_classes": 1, "threshold": 0.5}, 0.5),  # what the config records wins
    ({"n_classes": 1, "sigmoid": True, "threshold": 0.3}, 0.3),
])  # fmt: skip
def test_mask_threshold_of_a_config(config, threshold):
    from unet_export.models import mask_threshold

    assert mask_threshold(config) == threshold
