"""Artefact writers, one per format: ``write(model, dest, sample, metadata, **options) -> io record``.
Each writes through a temp file and renames, so a failure leaves nothing behind."""

from dataclasses import dataclass
from typing import Callable

from unet_export.runtimes.aoti.export import export_aoti
from unet_export.runtimes.onnx.export import export_onnx
from unet_export.runtimes.torchscript.export import export_torchscript


@dataclass(frozen=True)
class Format:
    write: Callable[..., dict]
    suffix: str


FORMATS: dict[str, Format] = {
    "onnx": Format(export_onnx, ".onnx"),
    "torchscript": Format(export_torchscript, ".ts"),
    "aoti": Format(export_aoti, ".pt2"),
}
