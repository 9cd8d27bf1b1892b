"""Round trips through export_artifact: every checkpoint variant, both formats, both sizes."""

import json

import onnx
import onnxruntime as ort
import pytest
import torch

from tests.conftest import VARIANTS
from unet_export.api import export_artifact
from unet_export.checkpoint import build_model, load_checkpoint
from unet_export.runtimes.formats import FORMATS
from unet_export.runtimes.onnx.export import read_metadata
from unet_export.runtimes.torchscript.export import read_metadata as read_ts_metadata
from unet_export.workdir.manifest import load_manifest


# The envelope's probes at the 256x256 export (parity.envelope): batch 1-8, sides 256-384.
ENVELOPE_256 = [(1, 3, 256, 256), (1, 3, 384, 384), (1, 3, 384, 256), (1, 3, 256, 384), (1, 3, 257, 321), (8, 3, 256, 256)]


def check_two_size_parity(result):
    shapes = [tuple(case.shape) for case in result.parity.cases]
    assert shapes == ENVELOPE_256
    assert result.entry["envelope"]["proven"]
    for case in result.parity.cases:
        assert case.max_abs_err <= 1e-4 * max(1.0, case.max_abs_ref)
        assert case.argmax_disagreement == 0.0 and case.passed
    assert result.passed and result.entry["status"] == "verified"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onnx_round_trip_for_every_release(make_checkpoint, tmp_path, variant):
    weights = make_checkpoint(variant)
    result = export_artifact(weights, "onnx", tmp_path / "out", device="cpu")
    check_two_size_parity(result)
    assert result.path == tmp_path / "out" / f"unet_{variant}.onnx"

    model = onnx.load(str(result.path))
    onnx.checker.check_model(model)
    meta = read_metadata(result.path)
    assert json.loads(meta["config"])["n_classes"] == VARIANTS[variant]["config"]["n_classes"]
    assert json.loads(meta["mask_values"]) == VARIANTS[variant]["mask_values"]
    assert json.loads(meta["checkpoint"])["sha256"] == load_checkpoint(weights).sha256
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "height", "width"]
    assert result.entry["opset"] == 18


@pytest.mark.parametrize("variant", ["v1", "v4"])
def test_torchscript_round_trip_runs_at_other_sizes(make_checkpoint, tmp_path, variant):
    weights = make_checkpoint(variant)
    result = export_artifact(weights, "torchscript", tmp_path, device="cpu")
    check_two_size_parity(result)
    module = torch.jit.load(str(result.path), map_location="cpu")
    eager = build_model(load_checkpoint(weights))
    x = torch.rand(3, 3, 97, 131)  # neither the trace nor the parity sizes
    with torch.no_grad():
        torch.testing.assert_close(module(x), eager(x), rtol=0, atol=1e-5)
    assert read_ts_metadata(result.path)["architecture"] == "milesial"


def test_static_onnx_has_fixed_shape_and_one_parity_case(make_checkpoint, tmp_path):
    result = export_artifact(make_checkpoint("v3"), "onnx", tmp_path, device="cpu", static=True, height=64, width=96)
    assert [tuple(c.shape) for c in result.parity.cases] == [(1, 3, 64, 96)] and result.passed
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 64, 96]
    assert result.entry["dynamic_axes"] == {}


def test_manifest_records_model_and_replaces_own_entry(make_checkpoint, tmp_path):
    weights, small = make_checkpoint("v4"), dict(device="cpu", height=64, width=64)
    export_artifact(weights, "onnx", tmp_path, **small)
    export_artifact(weights, "torchscript", tmp_path, **small)
    export_artifact(weights, "onnx", tmp_path, **small)  # re-run replaces, not appends
    manifest = load_manifest(tmp_path)
    assert manifest["model"]["architecture"] == "milesial"
    assert manifest["model"]["mask_values"] == [0, 127, 255]
    assert manifest["model"]["checkpoint"]["sha256"] == load_checkpoint(weights).sha256
    assert sorted(a["format"] for a in manifest["artifacts"]) == ["onnx", "torchscript"]
    entry = manifest["artifacts"][-1]
    assert entry["format"] == "onnx" and entry["path"] == "unet_v4.onnx" and entry["precision"] == "fp32"
    assert entry["inputs"][0]["name"] == "input" and entry["outputs"][0]["name"] == "logits"
    assert entry["dynamic_axes"]["input"] == {"0": "batch", "2": "height", "3": "width"}
    assert entry["parity"]["passed"] is True and len(entry["parity"]["cases"]) == len(ENVELOPE_256)
    assert entry["versions"]["torch"] == torch.__version__
    assert entry["versions"]["onnxruntime"] == ort.__version__ and "created" in entry


def test_new_checkpoint_in_same_workdir_drops_old_entries(make_checkpoint, tmp_path):
    export_artifact(make_checkpoint("v3"), "torchscript", tmp_path, device="cpu")
    result = export_artifact(make_checkpoint("v1"), "torchscript", tmp_path, device="cpu")
    assert result.dropped == 1
    assert [a["path"] for a in load_manifest(tmp_path)["artifacts"]] == ["unet_v1.ts"]


def test_wrong_artefact_fails_parity_and_is_recorded(make_checkpoint, tmp_path, monkeypatch):
    """An exporter that writes a subtly different model must be caught, not praised."""
    real = FORMATS["onnx"]

    def perturbed(model, dest, sample, metadata, **kw):
        with torch.no_grad():
            model.outc.conv.bias.add_(0.5)
        try:
            return real.write(model, dest, sample, metadata, **kw)
        finally:
            with torch.no_grad():
                model.outc.conv.bias.sub_(0.5)

    monkeypatch.setitem(FORMATS, "onnx", real.__class__(perturbed, real.suffix))
    result = export_artifact(make_checkpoint("v3"), "onnx", tmp_path, device="cpu")
    assert not result.passed and result.entry["status"] == "failed"
    assert "would pass with" in result.parity.failures()[0]
    assert load_manifest(tmp_path)["artifacts"][0]["parity"]["passed"] is False


def test_artefact_that_will_not_run_is_a_failed_check(make_checkpoint, tmp_path, monkeypatch):
    real = FORMATS["onnx"]

    def garbage(model, dest, sample, metadata, **kw):
        record = real.write(model, dest, sample, metadata, **kw)
        dest.write_bytes(b"not an onnx model")
        return record

    monkeypatch.setitem(FORMATS, "onnx", real.__class__(garbage, real.suffix))
    result = export_artifact(make_checkpoint("v3"), "onnx", tmp_path, device="cpu")
    assert not result.passed and result.parity.error


@pytest.mark.slow  # a full-size (31M) export, 20-30 s each: make test-all
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_full_size_milesial_round_trip(make_checkpoint, tmp_path, fmt):
    result = export_artifact(make_checkpoint("v3", width=64), fmt, tmp_path, device="cpu")
    check_two_size_parity(result)


def test_torchscript_metadata_is_real_json_under_the_final_name(tmp_path):
    """The archive's unet_export.json holds values, not JSON strings, and its root folder is not
    a temp file's name; files written the old way (JSON strings) still read the same."""
    import json
    import zipfile

    from unet_export.flows.demo import DEMO_WEIGHTS
    from unet_export.fileio import decode_metadata
    from unet_export.runtimes.torchscript.export import read_metadata

    result = export_artifact(DEMO_WEIGHTS, "torchscript", tmp_path, device="cpu", height=64, width=64)
    names = zipfile.ZipFile(result.path).namelist()
    assert not any(".tmp" in n for n in names)
    stored = json.loads(zipfile.ZipFile(result.path).read(next(n for n in names if n.endswith("unet_export.json"))))
    assert stored["config"]["n_classes"] == 3 and stored["export_size"] == [64, 64]
    decoded = decode_metadata(read_metadata(result.path))
    assert decoded["mask_values"] == stored["mask_values"] and decoded["architecture"] == "milesial"
    old_form = {k: v if isinstance(v, str) else json.dumps(v) for k, v in stored.items()}
    assert decode_metadata(old_form) == decoded
