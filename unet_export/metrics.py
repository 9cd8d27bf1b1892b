"""Masks from logits and milesial's Dice (utils/dice_score.py, evaluate.py)."""

import torch
import torch.nn.functional as F

EPSILON = 1e-6


def logits_to_mask(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """(N, C, H, W) outputs -> (N, H, W) class indices: argmax, or output > ``threshold`` for one
    class (0 for a logit, i.e. sigmoid > 0.5; 0.5 for a sigmoid output: models.mask_threshold)."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > threshold).long()
    return logits.argmax(dim=1)


def decision_margin(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """How far each pixel's decision is from flipping: top-1 minus top-2 output (|output - threshold|
    for one class)."""
    if logits.shape[1] == 1:
        return (logits[:, 0] - threshold).abs()
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def dice_score(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> float:
    """Mean Dice of (N, H, W) index masks as milesial computes it.

    Per image and class: (2*|x*y| + eps) / (|x|+|y| + eps), empty vs empty = 1. Multi-class:
    one-hot masks with the background class (0) dropped; mean over images and classes.
    """
    if n_classes == 1:
        pred_1h, target_1h = pred[:, None].float(), target[:, None].float()
    else:
        pred_1h = F.one_hot(pred.long(), n_classes).permute(0, 3, 1, 2)[:, 1:].float()
        target_1h = F.one_hot(target.long(), n_classes).permute(0, 3, 1, 2)[:, 1:].float()
    inter = 2 * (pred_1h * target_1h).sum(dim=(-1, -2))
    sets = pred_1h.sum(dim=(-1, -2)) + target_1h.sum(dim=(-1, -2))
    sets = torch.where(sets == 0, inter, sets)
    return ((inter + EPSILON) / (sets + EPSILON)).mean().item()


def center_crop(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The centre of (..., H, W) ``target`` at ``size``: an unpadded U-Net (the 2015 paper's)
    predicts only the centre of its input, so its ground truth is cropped to match."""
    height, width = target.shape[-2:]
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    return target[..., top : top + size[0], left : left + size[1]]
