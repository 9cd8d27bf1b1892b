"""`unet-bench WEIGHTS`: benchmark straight from a checkpoint, as `yolo benchmark model=x.pt` does.

The artefacts the benchmark's rows need are exported into the workdir first, each through its
usual parity gate, unless the workdir already holds them verified from the same checkpoint
(sha256 in its manifest). A workdir holding another checkpoint's artefacts is refused, never
mixed or silently replaced. Only what can run here is exported (a row that needs CUDA on a CPU
machine, TensorRT without the tensorrt package, INT8 without calibration images: skipped, each
said once), so the extra time is bounded by the formats asked for (--backends).
"""

import importlib.util
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from unet_export.bench.run import backend_names
from unet_export.checkpoint import load_checkpoint
from unet_export.device import resolve_device
from unet_export.errors import UserError
from unet_export.flows.export import ExportResult, build_trt, export_artifact, export_fp16_onnx
from unet_export.parity.realimages import folder_record
from unet_export.workdir.manifest import checked_path, load_manifest

# backend -> the artefact (format, precision) its row runs; rows absent here need none (eager,
# torch.compile) or calibration images (INT8).
NEEDS = {
    "torchscript": ("torchscript", "fp32"),
    "aoti": ("aoti", "fp32"),
    "onnxruntime": ("onnx", "fp32"),
    "onnxruntime-cuda": ("onnx", "fp32"),
    "onnxruntime-trt": ("onnx", "fp32"),
    "openvino": ("onnx", "fp32"),  # OpenVINO reads the ONNX model when the workdir has no IR
    "openvino-bf16": ("onnx", "fp32"),
    "onnxruntime-cuda-fp16": ("onnx", "fp16"),
    "tensorrt-fp16": ("tensorrt", "fp16"),
    "tensorrt-fp32": ("tensorrt", "fp32"),
}
DERIVED = {("onnx", "fp16"), ("tensorrt", "fp16"), ("tensorrt", "fp32")}  # made from the verified FP32 ONNX model
INT8_BACKENDS = ("openvino-int8", "onnxruntime-int8")
ORDER = [("onnx", "fp32"), ("torchscript", "fp32"), ("aoti", "fp32"), ("onnx", "fp16"), ("tensorrt", "fp16"),
         ("tensorrt", "fp32")]  # the FP32 ONNX model first: FP16 ONNX and TensorRT are made from it  # fmt: skip


@dataclass
class Prepared:
    exported: list[ExportResult] = field(default_factory=list)
    reused: list[dict] = field(default_factory=list)  # manifest entries, verified from this checkpoint
    skipped: list[str] = field(default_factory=list)  # "what: why", one per artefact not made here

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.exported)


def prepare_workdir(weights: str | Path | None, workdir: str | Path = "exports", *, backends: list[str] | None = None,
                    device: str = "auto", height: int | None = None, width: int | None = None,
                    data: str | Path | None = None, model=None,
                    on_export: Callable[[ExportResult], None] | None = None) -> Prepared:  # fmt: skip
    """Make ``workdir`` hold verified artefacts of ``weights`` for the rows of ``backends``
    (default: all): reuse those it has, export the missing ones (``on_export`` sees each)."""
    ckpt = load_checkpoint(weights, model)  # a missing or unreadable checkpoint: exit 2 before anything
    workdir, dev = Path(workdir), resolve_device(device)
    _refuse_other_checkpoint(load_manifest(workdir), ckpt.sha256, workdir)
    real_images = data is not None or folder_record(ckpt.validation) is not None
    wanted, prepared = plan(backend_names(backends), dev.type, real_images)
    size = dict(height=height or 256, width=width or 256)  # the export commands' default size
    for fmt, precision in wanted:
        entry = _verified_entry(load_manifest(workdir), workdir, fmt, precision)
        if entry is not None:
            prepared.reused.append(entry)
            continue
        if (fmt, precision) in DERIVED:
            if not _onnx_verified(workdir):  # its source failed the gate: nothing to derive it from
                prepared.skipped.append(f"{fmt} {precision}: the FP32 ONNX model it is made from failed its gate")
                continue
        result = _export(fmt, precision, weights, workdir, dev.type, size, data, model)
        prepared.exported.append(result)
        if on_export:
            on_export(result)
    return prepared


def plan(names: list[str], device: str, real_images: bool) -> tuple[list[tuple[str, str]], Prepared]:
    """The artefacts to have, in export order, and a Prepared naming those that cannot be made here."""
    prepared, wanted = Prepared(), set()
    for name in names:
        need = NEEDS.get(name)
        if need is None:
            continue
        reason = _cannot_export(need, name, device, real_images)
        if reason:
            prepared.skipped.append(f"{name}: {reason}")
        else:
            wanted.add(need)
    if any(name in INT8_BACKENDS for name in names):
        prepared.skipped.append("INT8: needs calibration images (unet-export int8 WEIGHTS --calib DIR)")
    if wanted & DERIVED:
        wanted.add(("onnx", "fp32"))
    return [step for step in ORDER if step in wanted], prepared


def _cannot_export(need: tuple[str, str], backend: str, device: str, real_images: bool) -> str:
    fmt, precision = need
    if ("cuda" in backend or "trt" in backend or fmt == "tensorrt") and device != "cuda":
        return "needs a CUDA GPU"
    if fmt == "tensorrt" and not installed("tensorrt"):
        return "TensorRT is not installed here"
    if fmt in ("onnx", "tensorrt") and not installed("onnxruntime"):
        return "onnxruntime is not installed, so no ONNX model can be gated here"
    if fmt == "aoti" and shutil.which("c++") is None:
        return "AOTInductor needs a C++ compiler (c++) to compile the package"
    if precision != "fp32" and not real_images:
        return f"{precision} is judged on real images only: pass --data DIR"
    return ""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (TensorRT's import is slow)."""
    return importlib.util.find_spec(module) is not None


def _refuse_other_checkpoint(manifest: dict, sha256: str, workdir: Path) -> None:
    recorded = (manifest.get("model") or {}).get("checkpoint") or {}
    if recorded and recorded.get("sha256") != sha256:
        raise UserError(f"{workdir} holds the artefacts of another checkpoint ({recorded.get('path')}); "
                        f"benchmark this one in its own workdir: --workdir DIR")  # fmt: skip


def _verified_entry(manifest: dict, workdir: Path, fmt: str, precision: str) -> dict | None:
    """The workdir's verified artefact of (fmt, precision); None when there is none or its file is
    gone (then it is exported again). A file changed since it was verified stops the run (exit 2),
    as it stops the benchmark: it is never silently overwritten."""
    for entry in manifest["artifacts"]:
        if (entry["format"], entry["precision"]) == (fmt, precision) and entry["status"] == "verified":
            if not (workdir / entry["path"]).exists():
                return None
            checked_path(workdir, entry)
            return entry
    return None


def _onnx_verified(workdir: Path) -> bool:
    return _verified_entry(load_manifest(workdir), workdir, "onnx", "fp32") is not None


def _export(fmt: str, precision: str, weights, workdir: Path, device: str, size: dict, data, model) -> ExportResult:
    if fmt == "tensorrt":
        return build_trt(workdir, precision=precision, data=data, model=model)
    if (fmt, precision) == ("onnx", "fp16"):
        return export_fp16_onnx(workdir, device=device, data=data, model=model)
    return export_artifact(weights, fmt, workdir, device=device, model=model, **size)
