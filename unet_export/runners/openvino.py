"""OpenVINO on the CPU, reading the ONNX artefact. Each new input shape is compiled static
once (static kernels are faster than dynamic ones); ``precision`` sets the inference
precision hint: fp32 keeps full precision, bf16 uses the CPU's bf16 units where it has them."""

from pathlib import Path

import torch

from unet_export.errors import UserError, require
from unet_export.runners.base import Runner

HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


class OpenVinoRunner(Runner):
    name = "openvino"

    def __init__(self, path: str | Path, device="cpu", precision="fp32"):
        super().__init__(device, precision)
        if self.device.type != "cpu":
            raise UserError("the OpenVINO runner runs on the CPU only")
        if precision not in HINTS:
            raise UserError(f"OpenVINO precision {precision!r}: choose one of {', '.join(HINTS)}")
        self.path = Path(path)
        self.requests = {}

    def _activate_impl(self) -> None:
        ov = require("openvino", extra="openvino")
        if not self.path.is_file():
            raise UserError(f"ONNX model not found: {self.path}")
        self.core = ov.Core()
        self.model = self.core.read_model(str(self.path))
        self.requests = {}

    def _request(self, shape: tuple[int, ...]):
        if shape not in self.requests:
            model = self.model.clone()
            model.reshape({model.input(0).get_any_name(): list(shape)})
            config = {"INFERENCE_PRECISION_HINT": HINTS[self.precision], "PERFORMANCE_HINT": "LATENCY"}
            compiled = self.core.compile_model(model, "CPU", config)
            self.requests[shape] = (compiled.create_infer_request(), compiled.output(0))
        return self.requests[shape]

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        request, output = self._request(tuple(x.shape))
        request.infer({0: x.detach().contiguous().numpy()})
        return torch.from_numpy(request.get_tensor(output).data.copy())

    def _deactivate_impl(self) -> None:
        self.requests = {}
        self.model = None

    def describe(self) -> str:
        return f"CPU, {HINTS[self.precision]} inference precision"
