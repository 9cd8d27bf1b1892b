"""The library's public face: checkpoint in, verified artefact out. Re-exports only; each use
case lives in the module named beside it.

    from unet_export.api import export_artifact, export_fp16_onnx, build_trt
    result = export_artifact("weights.pth", "onnx", workdir="exports")   # flows/export.py
    assert result.passed, result.parity.failures()
    export_fp16_onnx("exports")                  # then from the workdir's manifest
    build_trt("exports", precision="fp16")       # on an NVIDIA GPU

    from unet_export.api import manifest_checkpoint, run_parity, resolve_device
    # the workdir's checkpoint (workdir/lookup.py), one entry's parity (parity/run.py), --device (device.py)
"""

# Re-exports only. The underscored names are what the OpenVINO and INT8 exports (now
# flows/openvino.py, flows/int8.py) took from here before workdir/publish.py held them; they stay importable.
from unet_export.checkpoint import Checkpoint, build_model, load_checkpoint
from unet_export.device import resolve_device
from unet_export.errors import UnetExportError, UserError
from unet_export.runtimes.formats import FORMATS
from unet_export.runtimes.onnx.export import DEFAULT_OPSET
from unet_export.flows.export import (
    SECOND_PARITY_SHAPE,
    ExportResult,
    _engine_entry,
    _refuse_concurrent_model,
    build_trt,
    export_artifact,
    export_fp16_onnx,
    model_record,
    parity_shapes,
    require_real_images,
)
from unet_export.models.sizes import SizeRule
from unet_export.runtimes import EagerRunner
from unet_export.workdir.runners import artifact_runner
from unet_export.parity.run import run_parity
from unet_export.parity.gate import (
    FP16, FP32, TOLERANCES, ParityReport, Tolerance, check_parity, seeded_inputs, tolerance_for,
)  # fmt: skip
from unet_export.workdir.lookup import manifest_checkpoint, onnx_entry
from unet_export.workdir.publish import created_dir as _created_dir
from unet_export.workdir.publish import estimated_bytes as _estimated_bytes
from unet_export.workdir.publish import record_artifact
from unet_export.workdir.publish import same_model as _same_model
from unet_export.workdir.publish import staged as _staged

__all__ = [
    "DEFAULT_OPSET", "FORMATS", "FP16", "FP32", "SECOND_PARITY_SHAPE", "TOLERANCES", "Checkpoint", "EagerRunner",
    "ExportResult", "ParityReport", "SizeRule", "Tolerance", "UnetExportError", "UserError", "artifact_runner",
    "build_model", "build_trt", "check_parity", "export_artifact", "export_fp16_onnx", "load_checkpoint",
    "manifest_checkpoint", "model_record", "onnx_entry", "parity_shapes", "record_artifact", "require_real_images",
    "resolve_device", "run_parity", "seeded_inputs", "tolerance_for",
]  # fmt: skip
