"""Runner registries. ``ARTIFACT_RUNNERS``: which runner checks which exported format.
``BACKENDS``: every runtime the benchmark knows, each a function of the context that returns
a runner or raises Unavailable with the reason. Runner modules import their runtime lazily, so
importing this package costs nothing."""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from unet_export.errors import UserError
from unet_export.runners.base import Runner
from unet_export.runners.compiled import TorchCompileRunner
from unet_export.runners.eager import EagerRunner
from unet_export.runners.onnxruntime import OnnxRuntimeRunner
from unet_export.runners.openvino import OpenVinoRunner
from unet_export.runners.torchscript import TorchScriptRunner

ARTIFACT_RUNNERS: dict[str, type[Runner]] = {
    "onnx": OnnxRuntimeRunner,
    "torchscript": TorchScriptRunner,
}


class Unavailable(Exception):
    """This runtime cannot run here; the benchmark shows the reason in its row."""


def artifact_runner(entry: dict, workdir: Path, device) -> Runner:
    """A runner for one manifest entry (``format``, ``path`` relative to the workdir, ``precision``)."""
    try:
        cls = ARTIFACT_RUNNERS[entry["format"]]
    except KeyError:
        raise UserError(f"no runner for artefact format {entry.get('format')!r}") from None
    return cls(Path(workdir) / entry["path"], device=device, precision=entry.get("precision", "fp32"))


@dataclass
class BackendContext:
    model: nn.Module  # the eager fp32 model, on the CPU
    workdir: Path
    manifest: dict
    device: torch.device
    shape: tuple[int, int, int, int]
    compile_mode: str = "default"

    def artifact(self, fmt: str, precision: str = "fp32") -> Path:
        for entry in self.manifest["artifacts"]:
            if entry["format"] == fmt and entry["precision"] == precision:
                static = entry.get("size_rule", {}).get("static")
                if static and entry["inputs"][0]["shape"] != list(self.shape):
                    raise Unavailable(f"static {fmt} artefact takes {entry['inputs'][0]['shape']}, not {list(self.shape)}")
                return self.workdir / entry["path"]
        raise Unavailable(f"no {precision} {fmt} artefact in {self.workdir}/manifest.json (run unet-export {fmt})")

    def needs_cuda(self, what: str) -> None:
        if self.device.type != "cuda":
            raise Unavailable(f"{what} needs a CUDA GPU (benchmark device is {self.device})")


def _eager_half(ctx: BackendContext) -> Runner:
    ctx.needs_cuda("eager fp16")
    return EagerRunner(ctx.model, ctx.device, "fp16", channels_last=True)


def _ort_provider(provider: str):
    def make(ctx: BackendContext) -> Runner:
        ctx.needs_cuda(f"ONNX Runtime's {provider} provider")
        return OnnxRuntimeRunner(ctx.artifact("onnx"), ctx.device, provider=provider)

    return make


def _tensorrt(ctx: BackendContext) -> Runner:
    ctx.needs_cuda("TensorRT")
    raise Unavailable("this version has no TensorRT engine runner yet")


# Order is the table's order; "eager" is the baseline every speed-up is relative to.
BACKENDS = {
    "eager": lambda ctx: EagerRunner(ctx.model, ctx.device),
    "eager-channels-last": lambda ctx: EagerRunner(ctx.model, ctx.device, channels_last=True),
    "eager-bf16": lambda ctx: EagerRunner(ctx.model, ctx.device, "bf16", channels_last=ctx.device.type == "cuda"),
    "eager-fp16": _eager_half,
    "torch.compile": lambda ctx: TorchCompileRunner(ctx.model, ctx.device, mode=ctx.compile_mode),
    "torchscript": lambda ctx: TorchScriptRunner(ctx.artifact("torchscript"), ctx.device, freeze=True),
    "onnxruntime": lambda ctx: OnnxRuntimeRunner(ctx.artifact("onnx"), "cpu"),
    "onnxruntime-cuda": _ort_provider("cuda"),
    "onnxruntime-trt": _ort_provider("tensorrt"),
    "openvino": lambda ctx: OpenVinoRunner(ctx.artifact("onnx"), "cpu", "fp32"),
    "openvino-bf16": lambda ctx: OpenVinoRunner(ctx.artifact("onnx"), "cpu", "bf16"),
    "tensorrt": _tensorrt,
}


__all__ = ["ARTIFACT_RUNNERS", "BACKENDS", "BackendContext", "EagerRunner", "OnnxRuntimeRunner", "Runner",
           "TorchScriptRunner", "Unavailable", "artifact_runner"]  # fmt: skip
