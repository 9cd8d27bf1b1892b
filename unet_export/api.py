"""The library's public face: every use case of the CLI, one import away. Re-exports only; each
use case lives in the module named beside its example, and the CLI calls the same functions.

    from pathlib import Path
    from unet_export import api

    # Export and gate (flows/export.py): checkpoint -> verified artefact, recorded in the workdir
    result = api.export_artifact("weights.pth", "onnx", workdir="exports")
    assert result.passed, result.parity.failures()
    api.export_fp16_onnx("exports")                       # FP16 ONNX from the workdir's manifest
    api.build_trt("exports", precision="fp16")            # TensorRT engine, on an NVIDIA GPU
    api.export_openvino("weights.pth", "exports")         # OpenVINO IR (flows/openvino.py)
    api.quantize_int8("weights.pth", "calib_imgs/", "exports", val="val_set/")  # flows/int8.py

    # Any nn.Module instead of a checkpoint file (models/external.py): what it takes is an InputSpec
    net = MyNet().eval()                                  # the CLI's way in: --model-factory mynet.py:MyNet
    model = api.from_module(net, api.InputSpec(channels=3, sizes=api.SizeRule(min=32, multiple=32)))
    result = api.export_artifact(None, "onnx", "exports", model=model)   # model=net: the default InputSpec
    api.quantize_int8(None, "calib_imgs/", "exports", model=model, val="val_set/")
    api.verify_workdir("exports", model=model)            # only the module rebuilds its eager model

    # Prove it again, score it, time it (flows/verify.py, flows/evaluate.py, bench/run.py)
    assert api.verify_workdir("exports").exit_code() == 0
    scores = api.evaluate("weights.pth", "val_set/", "exports")   # Dice of eager and every artefact
    report = api.benchmark("exports", batch=8)                     # parity-gated rows, side by side
    api.prepare_workdir("weights.pth", "exports")         # unet-bench WEIGHTS: export what is missing

    # Reports people and CI read (report/): an HTML page with pictures, JUnit XML, from a result document
    doc = {"workdir": "exports", "artifacts": api.workdir_artifacts(Path("exports"))}  # what `unet-export report` reads
    api.write_html(doc, Path("report.html"), data="val_set/")                         # re-runs each on real images
    api.write_junit(doc, Path("report.xml"))

    # Use it (predict/, serving/repository.py, flows/cpp_check.py)
    masks = api.predict("exports/model.onnx", [Path("images/")], Path("masks"))
    api.write_repository("exports", "triton_repo")       # a Triton model repository
    api.cpp_check("exports")                              # the TorchScript/AOTI models from C++

    # Train, make data, look around (flows/train.py, data/, flows/doctor.py, flows/inspect.py)
    api.train("data/", "runs/", api.TrainConfig(epochs=5))
    api.make_synth(Path("data/"), n=64)
    api.convert_labelme(Path("json/"), Path("data/"), ["background", "cat"])
    rows = api.run_checks()                               # what `unet-export doctor` checks
    info = api.inspect_artifact("exports/model.onnx")

    # The pieces: the workdir's checkpoint (workdir/lookup.py), one entry's parity (parity/run.py),
    # the gate itself (parity/gate.py), a runner for an entry (workdir/runners.py), --device
    api.manifest_checkpoint, api.run_parity, api.check_parity, api.artifact_runner, api.resolve_device
"""

# Re-exports only. The underscored names are what the OpenVINO and INT8 exports (now
# flows/openvino.py, flows/int8.py) took from here before workdir/publish.py held them; they stay importable.
from unet_export.bench.prepare import prepare_workdir
from unet_export.bench.run import benchmark
from unet_export.checkpoint import Checkpoint, build_model, load_checkpoint
from unet_export.data.labelme import convert_labelme
from unet_export.data.synth import make_synth
from unet_export.device import resolve_device
from unet_export.errors import EagerUnavailable, UnetExportError, UserError
from unet_export.flows.cpp_check import cpp_check
from unet_export.flows.doctor import run_checks
from unet_export.flows.evaluate import evaluate
from unet_export.flows.export import (
    SECOND_PARITY_SHAPE,
    ExportResult,
    build_trt,
    export_artifact,
    export_fp16_onnx,
    model_record,
    parity_shapes,
    require_real_images,
)
from unet_export.flows.inspect import inspect_artifact
from unet_export.flows.int8 import quantize_int8
from unet_export.flows.openvino import export_openvino
from unet_export.flows.train import TrainConfig, train
from unet_export.flows.verify import verify_workdir
from unet_export.models import from_module
from unet_export.models.external import InputSpec
from unet_export.models.sizes import SizeRule
from unet_export.parity.gate import (
    FP16, FP32, TOLERANCES, ParityReport, Tolerance, check_parity, seeded_inputs, tolerance_for,
)  # fmt: skip
from unet_export.parity.run import run_parity
from unet_export.predict import predict
from unet_export.report.build import (
    artefact_pictures, hold_against_recheck, workdir_artifacts, workdir_exit_code, write_html, write_junit,
)  # fmt: skip
from unet_export.report.summary import append_summary
from unet_export.runtimes import EagerRunner
from unet_export.runtimes.formats import FORMATS
from unet_export.runtimes.onnx.export import DEFAULT_OPSET
from unet_export.serving.repository import write_repository
from unet_export.workdir.lookup import manifest_checkpoint, onnx_entry
from unet_export.workdir.publish import created_dir as _created_dir
from unet_export.workdir.publish import estimated_bytes as _estimated_bytes
from unet_export.workdir.publish import record_artifact
from unet_export.workdir.publish import same_model as _same_model
from unet_export.workdir.publish import staged as _staged
from unet_export.workdir.runners import artifact_runner

__all__ = [
    # use cases
    "benchmark", "build_trt", "convert_labelme", "cpp_check", "evaluate", "export_artifact", "export_fp16_onnx",
    "export_openvino", "inspect_artifact", "make_synth", "predict", "prepare_workdir", "quantize_int8", "run_checks", "train",
    "TrainConfig", "verify_workdir", "write_repository", "workdir_artifacts", "workdir_exit_code", "write_html",
    "write_junit", "append_summary",
    "artefact_pictures", "hold_against_recheck",
    # an nn.Module instead of a checkpoint
    "from_module", "InputSpec", "EagerUnavailable",
    # pieces
    "DEFAULT_OPSET", "FORMATS", "FP16", "FP32", "SECOND_PARITY_SHAPE", "TOLERANCES", "Checkpoint", "EagerRunner",
    "ExportResult", "ParityReport", "SizeRule", "Tolerance", "UnetExportError", "UserError", "artifact_runner",
    "build_model", "check_parity", "load_checkpoint",
    "manifest_checkpoint", "model_record", "onnx_entry", "parity_shapes", "record_artifact", "require_real_images",
    "resolve_device", "run_parity", "seeded_inputs", "tolerance_for",
]  # fmt: skip
