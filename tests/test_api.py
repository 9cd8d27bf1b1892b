"""unet_export.api is the public face (issue 26): every name it has offered keeps working after
the moves, and every use case the CLI has is one import away, the very function the CLI calls."""

import ast
from pathlib import Path

import unet_export.api as api

# What api.py exported before the restructuring, plus the private helpers older callers took.
BEFORE = ["DEFAULT_OPSET", "FORMATS", "FP16", "FP32", "SECOND_PARITY_SHAPE", "TOLERANCES", "Checkpoint", "EagerRunner",
          "ExportResult", "ParityReport", "SizeRule", "Tolerance", "UnetExportError", "UserError", "artifact_runner",
          "build_model", "build_trt", "check_parity", "export_artifact", "export_fp16_onnx", "load_checkpoint",
          "manifest_checkpoint", "model_record", "onnx_entry", "parity_shapes", "record_artifact",
          "require_real_images", "resolve_device", "run_parity", "seeded_inputs", "tolerance_for",
          "_staged", "_created_dir", "_estimated_bytes", "_same_model"]  # fmt: skip
USE_CASES = {  # name -> where it lives
    "export_artifact": "unet_export.flows.export", "export_fp16_onnx": "unet_export.flows.export",
    "build_trt": "unet_export.flows.export", "export_openvino": "unet_export.flows.openvino",
    "quantize_int8": "unet_export.flows.int8", "verify_workdir": "unet_export.flows.verify",
    "evaluate": "unet_export.flows.evaluate", "benchmark": "unet_export.bench.run", "predict": "unet_export.predict",
    "write_repository": "unet_export.serving.repository", "cpp_check": "unet_export.flows.cpp_check",
    "train": "unet_export.flows.train", "make_synth": "unet_export.data.synth",
    "convert_labelme": "unet_export.data.labelme", "run_checks": "unet_export.flows.doctor",
    "inspect_artifact": "unet_export.flows.inspect", "prepare_workdir": "unet_export.bench.prepare",
}  # fmt: skip


def test_every_name_api_offered_still_works():
    missing = [name for name in BEFORE if not hasattr(api, name)]
    assert not missing
    assert set(BEFORE) - set(api.__all__) == {"_staged", "_created_dir", "_estimated_bytes", "_same_model"}


def test_every_use_case_is_one_import_away_and_is_the_function_the_flow_defines():
    import importlib

    for name, module in USE_CASES.items():
        assert name in api.__all__, name
        assert getattr(api, name) is getattr(importlib.import_module(module), name), name


def test_api_only_re_exports():
    """No function or class is defined in api.py: the use cases live in their modules."""
    tree = ast.parse(Path(api.__file__).read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    assert defined == []
    assert {n for n in api.__all__ if not hasattr(api, n)} == set()
