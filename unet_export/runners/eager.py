"""Eager PyTorch: the reference every artefact is compared against."""

import torch
import torch.nn as nn

from unet_export.runners.base import Runner


class EagerRunner(Runner):
    name = "eager"

    def __init__(self, model: nn.Module, device="cpu", precision="fp32", tf32: bool = False):
        super().__init__(device, precision)
        self.model = model
        # PyTorch lets cuDNN use TF32 for FP32 convs by default on Ampere+; a reference that
        # artefacts must match to 1e-4 has to be true FP32, so it is off unless asked for.
        self.tf32 = tf32

    def _activate_impl(self) -> None:
        self.model = self.model.eval().to(self.device)

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=self.tf32):
            return self.model(x).float()
