"""torch.compile over the eager model (Inductor); compilation happens on the first infer(),
which the parity check and the benchmark's warm-up absorb."""

import torch
import torch.nn as nn

from unet_export.runtimes.torch.eager import EagerRunner

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class TorchCompileRunner(EagerRunner):
    name = "torch.compile"

    def __init__(self, model: nn.Module, device="cpu", precision="fp32", mode="default", **kwargs):
        super().__init__(model, device, precision, **kwargs)
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown torch.compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        self.mode = mode

    def _prepare(self, module: nn.Module) -> nn.Module:
        # dynamic=False: the benchmark runs one shape, and static kernels are the fast ones.
        return torch.compile(module, mode=self.mode, dynamic=False)

    def describe(self) -> str:
        return f"{self.device}, mode={self.mode}"
