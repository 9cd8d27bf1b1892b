"""ONNX Runtime: CUDA provider when the runner is on CUDA and onnxruntime-gpu is installed,
else the CPU provider (describe() says which one actually ran)."""

from pathlib import Path

import torch

from unet_export.errors import UserError, require
from unet_export.runners.base import Runner


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, path: str | Path, device="cpu", precision="fp32"):
        super().__init__(device, precision)
        self.path = Path(path)
        self.session = None
        self.provider = None

    def _activate_impl(self) -> None:
        ort = require("onnxruntime")
        if not self.path.is_file():
            raise UserError(f"ONNX model not found: {self.path}")
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns about unused initialisers
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})
        return torch.from_numpy(logits).to(self.device)

    def _deactivate_impl(self) -> None:
        self.session = None

    def describe(self) -> str:
        return self.provider or "onnxruntime"
