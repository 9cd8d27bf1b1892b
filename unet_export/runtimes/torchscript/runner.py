"""TorchScript modules, loaded the way libtorch loads them (torch.jit.load); ``freeze`` inlines
weights and folds BatchNorm into the convs (torch.jit.freeze + optimize_for_inference)."""

import warnings
from pathlib import Path

import torch

from unet_export.errors import UserError
from unet_export.runtimes.base import Runner, torch_stream


class TorchScriptRunner(Runner):
    name = "torchscript"

    def __init__(self, path: str | Path, device="cpu", precision="fp32", freeze: bool = False):
        super().__init__(device, precision)
        self.path = Path(path)
        self.freeze = freeze
        self.module = None

    def _activate_impl(self) -> None:
        if not self.path.is_file():
            raise UserError(f"TorchScript module not found: {self.path}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
            module = torch.jit.load(str(self.path), map_location=self.device).eval()
            if self.freeze:
                module = torch.jit.optimize_for_inference(torch.jit.freeze(module))
        self.module = module

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            return self.module(x).float()

    def _deactivate_impl(self) -> None:
        self.module = None

    def throughput_setting(self) -> str:
        return torch_stream(self.device)

    def describe(self) -> str:
        return f"{self.device}, frozen" if self.freeze else str(self.device)
