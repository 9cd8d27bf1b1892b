"""Runner registry: which runner runs which artefact format. Runner modules import their
runtime lazily, so importing this package costs nothing."""

from pathlib import Path

from unet_export.errors import UserError
from unet_export.runners.base import Runner
from unet_export.runners.eager import EagerRunner
from unet_export.runners.onnxruntime import OnnxRuntimeRunner
from unet_export.runners.torchscript import TorchScriptRunner

ARTIFACT_RUNNERS: dict[str, type[Runner]] = {
    "onnx": OnnxRuntimeRunner,
    "torchscript": TorchScriptRunner,
}


def artifact_runner(entry: dict, workdir: Path, device) -> Runner:
    """A runner for one manifest entry (``format``, ``path`` relative to the workdir, ``precision``)."""
    try:
        cls = ARTIFACT_RUNNERS[entry["format"]]
    except KeyError:
        raise UserError(f"no runner for artefact format {entry.get('format')!r}") from None
    return cls(Path(workdir) / entry["path"], device=device, precision=entry.get("precision", "fp32"))


__all__ = ["ARTIFACT_RUNNERS", "EagerRunner", "OnnxRuntimeRunner", "Runner", "TorchScriptRunner", "artifact_runner"]
