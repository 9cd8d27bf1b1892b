"""`unet-export inspect ARTEFACT`: what an exported model is, read from the file and the manifest of
its workdir, checked against the values the exporters wrote (issue 25)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from unet_export.cli.main import app
from unet_export.flows.demo import DEMO_WEIGHTS
from unet_export.fileio import sha256_file
from unet_export.flows.inspect import inspect_artifact
from unet_export.workdir.manifest import load_manifest

runner = CliRunner()
SIZE = 128  # the export (and first parity) size: the demo's, as the workdir the triton tests share


@pytest.fixture(scope="module")
def demo_workdir(exports, tmp_path_factory):
    """The shipped demo checkpoint exported to ONNX, TorchScript and an OpenVINO IR, verified (this
    module's copy of the session's export)."""
    pytest.importorskip("openvino")
    formats = ("onnx", "torchscript", "openvino")
    return exports.copy(tmp_path_factory.mktemp("inspect") / "exports", DEMO_WEIGHTS, formats, SIZE, SIZE)


def _inspect(*args):
    result = runner.invoke(app, ["inspect", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


def _entry(workdir, fmt):
    return next(a for a in load_manifest(workdir)["artifacts"] if a["format"] == fmt)


def test_inspect_reads_the_demo_onnx_model(demo_workdir):
    import onnx

    path = demo_workdir / "demo_unet.onnx"
    out = _inspect(path)
    assert out.startswith("demo_unet.onnx: ONNX, fp32, opset 18, ")
    nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
    assert f"opset 18, {nodes} nodes" in out and nodes > 20
    assert "input    input float32 [batch, 3, height, width]" in out
    assert "output   logits float32 [batch, 3, height, width]" in out  # the demo model has 3 classes
    assert "dynamic  batch (axis 0), height (axis 2), width (axis 3)" in out
    assert f"sha256 {sha256_file(path)}" in out and f"({path.stat().st_size / 1e6:.1f} MB)" in out
    assert "model    milesial {" in out and f"exported at {SIZE}x{SIZE}" in out
    assert "sizes    H and W: any, at least 16" in out
    assert "verdict  verified: fp32 tolerance: max |err vs float64| <= 5 x noise floor" in out
    assert "onnxruntime (CPUExecutionProvider) on cpu" in out and "note" not in out
    info = inspect_artifact(path)
    assert info.opset == 18 and info.nodes == nodes and info.verified_file and info.precision == "fp32"
    assert info.size_rule == _entry(demo_workdir, "onnx")["size_rule"]


def test_inspect_reads_torchscript_named_inside_its_workdir(demo_workdir):
    out = _inspect(demo_workdir, "demo_unet.ts")
    info = inspect_artifact(demo_workdir, "demo_unet.ts")
    assert out.startswith(f"demo_unet.ts: TorchScript, fp32, {info.nodes} nodes") and info.nodes > 50
    assert "input    input float32 [batch, 3, height, width]" in out
    assert "output   logits float32 [batch, 3, height, width]" in out
    assert "verdict  verified:" in out and "checked with torchscript (cpu)" in out
    assert info.sha256 == _entry(demo_workdir, "torchscript")["sha256"]


def test_inspect_reads_the_openvino_ir_and_its_weights(demo_workdir):
    from unet_export.runtimes.openvino.export import RT_KEY
    from unet_export.flows.inspect import IR_RECORD_KEY

    assert IR_RECORD_KEY == RT_KEY  # inspection keeps its own copy so as not to import torch
    out = _inspect(demo_workdir / "demo_unet.xml")
    info = inspect_artifact(demo_workdir / "demo_unet.xml")
    assert out.startswith(f"demo_unet.xml: OpenVINO IR, fp32, {info.nodes} ops") and info.nodes > 50
    assert f"weights  demo_unet.bin (" in out and f"sha256 {sha256_file(demo_workdir / 'demo_unet.bin')}" in out
    # the IR says [?,3,?,?]: the dynamic axes are named from the ONNX model it came from
    assert "input    input float32 [batch, 3, height, width]" in out
    assert "dynamic  batch (axis 0), height (axis 2), width (axis 3)" in out
    assert info.model["architecture"] == "milesial" and info.model["config"]["n_classes"] == 3
    assert "verdict  verified:" in out and "openvino (CPU, IR" in out


def test_a_changed_file_is_not_given_the_recorded_verdict(demo_workdir, tmp_path):
    workdir = shutil.copytree(demo_workdir, tmp_path / "w")
    manifest = json.loads((workdir / "manifest.json").read_text())
    weights = next(a for a in manifest["artifacts"] if a["format"] == "openvino")["weights"]
    weights["sha256"] = "0" * 64  # as if the .bin had been replaced after it was verified
    (workdir / "manifest.json").write_text(json.dumps(manifest))
    out = _inspect(workdir / "demo_unet.xml")
    assert "verdict  verified (for another file: this one changed since)" in out
    assert "note     the file changed since it was verified" in out
    assert not inspect_artifact(workdir / "demo_unet.xml").verified_file


def test_an_engine_is_described_from_its_manifest_and_never_opened(demo_workdir, tmp_path):
    workdir = shutil.copytree(demo_workdir, tmp_path / "w")
    engine = workdir / "demo_unet.fp16.engine"
    engine.write_bytes(os.urandom(4096))  # not an engine at all: it is never opened
    manifest = json.loads((workdir / "manifest.json").read_text())
    onnx_entry = _entry(workdir, "onnx")
    manifest["artifacts"].append({
        "format": "tensorrt", "path": engine.name, "precision": "fp16", "status": "verified",
        "inputs": onnx_entry["inputs"], "outputs": onnx_entry["outputs"], "size_rule": onnx_entry["size_rule"],
        "bytes": engine.stat().st_size, "sha256": sha256_file(engine),
        "parity": {"tolerance": "fp16", "limits": {"max_class_change": 0.001, "min_dice": 0.99}}})  # fmt: skip
    (workdir / "manifest.json").write_text(json.dumps(manifest))
    out = _inspect(engine)
    assert out.startswith("demo_unet.fp16.engine: TensorRT engine, fp16")
    assert "input    input float32 [batch, 3, height, width]" in out and "verdict  verified: fp16 tolerance" in out
    assert "note     a TensorRT engine is not opened here" in out
    alone = tmp_path / "alone.engine"
    shutil.copy(engine, alone)
    result = runner.invoke(app, ["inspect", str(alone)])
    assert result.exit_code == 2 and "none beside it records it" in result.stderr, result.output


@pytest.mark.parametrize("suffix", [".onnx", ".ts", ".pt2", ".xml"])
def test_a_corrupt_artefact_exits_2_with_one_line(tmp_path, suffix):
    bad = tmp_path / f"model{suffix}"
    bad.write_bytes(b"<net" + os.urandom(3000) if suffix == ".xml" else os.urandom(3000))
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {bad} is not a readable ") and result.stderr.count("\n") == 1
    assert not result.stdout


@pytest.mark.parametrize("args, fragment", [
    (["missing.onnx"], "artefact not found"),
    (["weights.pth"], "is not an exported model: inspect reads .onnx, .ts, .pt2, .xml, .engine files"),
    (["."], "is a folder: name the artefact in it"),
])  # fmt: skip
def test_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.pth").write_bytes(b"x")
    result = runner.invoke(app, ["inspect", *args])
    assert result.exit_code == 2 and fragment in result.stderr and result.stderr.count("\n") == 1, result.output


def test_nothing_outside_the_workdir_is_read_through_it(demo_workdir, tmp_path):
    workdir = shutil.copytree(demo_workdir, tmp_path / "w")
    outside = tmp_path / "outside.onnx"
    shutil.copy(workdir / "demo_unet.onnx", outside)
    escape = runner.invoke(app, ["inspect", str(workdir), "../outside.onnx"])
    assert escape.exit_code == 2 and "is not a file name inside the workdir" in escape.stderr, escape.output
    (workdir / "demo_unet.onnx").unlink()
    (workdir / "demo_unet.onnx").symlink_to(outside)  # a link in the workdir that leads out of it
    for args in ([workdir, "demo_unet.onnx"], [workdir / "demo_unet.onnx"]):
        linked = runner.invoke(app, ["inspect", *map(str, args)])
        assert linked.exit_code == 2 and "outside the workdir" in linked.stderr, linked.output
    manifest = json.loads((workdir / "manifest.json").read_text())
    manifest["artifacts"][0]["path"] = "../outside.onnx"  # a manifest that names a file elsewhere
    (workdir / "manifest.json").write_text(json.dumps(manifest))
    named = runner.invoke(app, ["inspect", str(workdir / "demo_unet.ts")])
    assert named.exit_code == 2 and "is not a file name inside the workdir" in named.stderr, named.output


def test_inspect_imports_only_the_runtime_of_the_format_asked(demo_workdir):
    code = ("import sys\nfrom unet_export.flows.inspect import inspect_artifact\n"
            "inspect_artifact(sys.argv[1])\n"
            "print(','.join(m for m in ('torch', 'onnx', 'openvino', 'onnxruntime') if m in sys.modules))")  # fmt: skip
    loaded = {}
    for name in ("demo_unet.onnx", "demo_unet.xml"):
        proc = subprocess.run([sys.executable, "-c", code, str(demo_workdir / name)], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        loaded[name] = proc.stdout.strip()
    assert loaded == {"demo_unet.onnx": "onnx", "demo_unet.xml": "openvino"}
