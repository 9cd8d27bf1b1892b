"""AOTInductor packages (.pt2), loaded as torch._inductor.aoti_load_package does; a package runs
only on the device kind it was compiled for."""

from pathlib import Path

import torch

from unet_export.errors import UserError
from unet_export.runtimes.aoti.export import quiet_cpp_extension
from unet_export.runtimes.base import Runner, torch_stream


# Before anything imports torch._inductor (reading a package's metadata does): the log is at import.
quiet_cpp_extension()


class AotiRunner(Runner):
    name = "aoti"

    def __init__(self, path: str | Path, device="cpu", precision="fp32"):
        super().__init__(device, precision)
        self.path = Path(path)
        self.package = None

    def _activate_impl(self) -> None:
        if not self.path.is_file():
            raise UserError(f"AOTInductor package not found: {self.path}")
        package = torch._inductor.aoti_load_package(str(self.path))
        built_for = package.get_metadata().get("AOTI_DEVICE_KEY", "cpu")
        if built_for != self.device.type:
            raise UserError(f"{self.path.name} was compiled for {built_for}, not {self.device.type}: "
                            f"run `unet-export aoti --device {self.device.type}`")  # fmt: skip
        self.package = package

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.package(x.contiguous())
        return (out[0] if isinstance(out, (list, tuple)) else out).float()

    def _deactivate_impl(self) -> None:
        self.package = None

    def throughput_setting(self) -> str:
        return torch_stream(self.device)
