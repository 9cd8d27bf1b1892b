"""The mask `unet-export predict` gives for an image with the eager model: what a served pipeline
must return for the same image."""

from pathlib import Path

import numpy as np
import torch

from unet_export.checkpoint import class_mask_values
from unet_export.data.dataset import Preprocess
from unet_export.inference.predictor import Predictor, mask_to_image_array, predict_classes
from unet_export.models import mask_threshold
from unet_export.models.sizes import SizeRule
from unet_export.runtimes import EagerRunner


class _RecordingEager(EagerRunner):
    """Eager, keeping its last logits: a pixel the pipeline classes differently is excused only
    where eager's own decision is a numerical tie."""

    last: torch.Tensor | None = None
    last_input: torch.Tensor | None = None

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        self.last_input, self.last = x, super()._infer_impl(x)
        return self.last


def expected_mask(net, model: dict, size_rule: dict, path: Path, envelope=None) -> tuple[np.ndarray, tuple | None]:
    """(predict's mask for ``path``, (eager's logits at the mask's size, the input that gave them,
    the model), or None where predict padded or resized them: then no pixel is excused as a tie).
    ``envelope``: the served artefact's (parity.envelope), which predict pads a small image up to."""
    config = model["config"]
    values = class_mask_values(model.get("mask_values"), config.get("n_classes", 2))
    rule = SizeRule.from_record(size_rule)
    runner = _RecordingEager(net, "cpu")
    # halo None: whole images, as the pipeline runs them (predict tiles only images over 1024 px)
    predictor = Predictor(runner, values, Preprocess.from_dict(model.get("preprocess")), rule,
                          int(config.get("n_channels", 3)), threshold=mask_threshold(config), envelope=envelope)  # fmt: skip
    with runner:
        classes, _ = predict_classes(predictor, path)
    if runner.last is None or tuple(runner.last.shape[-2:]) != classes.shape:
        return mask_to_image_array(classes, values), None
    return mask_to_image_array(classes, values), (runner.last, runner.last_input, net)
