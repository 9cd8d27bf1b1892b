"""The one interface every runtime implements; parity checks and benchmarks both use it.

A template in the manner of Polygraphy's runners: the public methods do the state checks
once, each runtime writes only ``_activate_impl`` / ``_infer_impl`` / ``_deactivate_impl``.
Construction is cheap (paths and options only); loading and building happen in activate().
"""

import torch


class Runner:
    name = "runner"

    def __init__(self, device: str | torch.device = "cpu", precision: str = "fp32"):
        self.device = torch.device(device)
        self.precision = precision
        self.is_active = False
        # Set before activate() when other threads need the CPU alongside (predict's decode and
        # write stages): a runtime that would spin-wait between calls yields instead.
        self.shares_cpu = False

    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate_impl()
            self.is_active = True
        return self

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 NCHW batch in, float32 logits out, both on ``self.device``."""
        if not self.is_active:
            raise RuntimeError(f"{self.name}: call activate() (or use a with-block) before infer()")
        return self._infer_impl(x.to(self.device, non_blocking=True))

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def synchronize(self) -> None:
        """Wait for queued device work, so a timer around infer() measures all of it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        """Where it runs, as shown in reports (e.g. the ONNX Runtime provider actually used)."""
        return str(self.device)

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        """Drop what activate() loaded; most runtimes need nothing more."""
