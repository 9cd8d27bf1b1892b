"""A manifest entry -> the Runner that checks it: ``ARTIFACT_RUNNERS`` says which runner runs
which exported format (the runners themselves take paths, never entries: unet_export.runtimes)."""

from pathlib import Path
from typing import Callable

import torch

from unet_export.errors import UserError
from unet_export.runtimes import AotiRunner, OnnxRuntimeRunner, OpenVinoRunner, Runner, TensorRTRunner, TorchScriptRunner
from unet_export.workdir.ir import ir_weights
from unet_export.workdir.manifest import checked_path

# format -> runner(path, device, manifest entry)
ARTIFACT_RUNNERS: dict[str, Callable[[Path, torch.device, dict], Runner]] = {
    # INT8 QDQ models are made for ONNX Runtime's CPU provider, wherever the parity or Dice runs
    "onnx": lambda path, device, entry: OnnxRuntimeRunner(path, "cpu" if entry["precision"] == "int8" else device,
                                                          entry["precision"]),
    "torchscript": lambda path, device, entry: TorchScriptRunner(path, device, entry["precision"]),
    "tensorrt": lambda path, device, entry: TensorRTRunner(path, device, entry["precision"], record=entry),
    "aoti": lambda path, device, entry: AotiRunner(path, device, entry["precision"]),
    # OpenVINO IR (fp32, fp16-compressed weights, int8): CPU only; INT8 ONNX goes through "onnx"
    "openvino": lambda path, device, entry: OpenVinoRunner(path, "cpu", entry["precision"], weights=ir_weights(path, entry),
                                                           hint=entry.get("inference_precision")),
}


def artifact_runner(entry: dict, workdir: Path, device, path: Path | None = None) -> Runner:
    """A runner for one manifest entry (``format``, ``path`` relative to the workdir, ``precision``).
    The file must be the one the entry verified (sha256); ``path`` runs a file not yet published."""
    try:
        make = ARTIFACT_RUNNERS[entry["format"]]
    except KeyError:
        raise UserError(f"no runner for artefact format {entry.get('format')!r}") from None
    return make(Path(path) if path else checked_path(workdir, entry), torch.device(device), entry)
