"""The CLI contract: exit 0 verified, 1 parity failed, 2 bad input; one line, no traceback,
nothing left in the workdir after a bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from tests.unit.test_checkpoint import BAD, _bad_files
from unet_export.api import export_artifact
from unet_export.cli.main import app
from unet_export.errors import ArtifactError
from unet_export.flows.demo import DEMO_VAL
from unet_export.runtimes.formats import FORMATS
from unet_export.workdir.manifest import load_manifest

runner = CliRunner()


def test_onnx_command_verifies_and_exits_zero(make_checkpoint, tmp_path):
    out = tmp_path / "exports"
    result = runner.invoke(app, ["onnx", str(make_checkpoint("v4")), "--workdir", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout and "1x3x256x256" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [".manifest.lock", "manifest.json", "unet_v4.onnx"]


def test_a_safetensors_checkpoint_exports_verifies_and_reverifies(tmp_path):
    """issue 27, item 3: `unet-export onnx weights.safetensors` as for a .pth, and `verify` reloads
    it from the path the manifest records."""
    from safetensors.torch import save_file

    from tests.conftest import milesial_state_dict

    weights = tmp_path / "unet.safetensors"
    save_file(milesial_state_dict("v3"), str(weights))
    out = tmp_path / "exports"
    result = runner.invoke(app, ["onnx", str(weights), "-w", str(out), "--height", "64", "--width", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    entry = load_manifest(out)["artifacts"][0]
    assert (entry["path"], entry["status"]) == ("unet.onnx", "verified")
    assert load_manifest(out)["model"]["architecture"] == "milesial"
    again = runner.invoke(app, ["verify", "-w", str(out), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert load_manifest(out)["artifacts"][0]["status"] == "verified"


def test_torchscript_command_with_custom_size(make_checkpoint, tmp_path):
    args = ["torchscript", str(make_checkpoint("v2")), "-w", str(tmp_path), "--height", "96", "--width", "72"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_manifest(tmp_path)["artifacts"][0]["parity"]["cases"][0]["shape"] == [1, 3, 96, 72]


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_exits_2_with_one_line_and_leaves_nothing(tmp_path, case):
    path, fragment = _bad_files(tmp_path)[case]
    out = tmp_path / "exports"
    result = runner.invoke(app, ["onnx", str(path), "--workdir", str(out)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert fragment.lower() in result.stderr.lower() and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--height", "8"], "does not fit this model"),
        (["--opset", "9"], "--opset 9 is not supported"),
        (["--model", "nope"], "unknown model"),
    ],
)
def test_bad_options_exit_2(make_checkpoint, tmp_path, args, fragment):
    out = tmp_path / "exports"
    result = runner.invoke(app, ["onnx", str(make_checkpoint("v3")), "-w", str(out), *args])
    assert result.exit_code == 2 and fragment in result.stderr
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_exits_2(make_checkpoint, tmp_path):
    result = runner.invoke(app, ["onnx", str(make_checkpoint("v3")), "-w", str(tmp_path / "o"), "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA GPU" in result.stderr


def test_corrupt_manifest_exits_2_without_writing(make_checkpoint, tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    result = runner.invoke(app, ["torchscript", str(make_checkpoint("v3")), "-w", str(tmp_path)])
    assert result.exit_code == 2 and "manifest.json is not valid JSON" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "unet_v3.pth"]


def test_parity_failure_exits_1(make_checkpoint, tmp_path, wrong_torchscript):
    result = runner.invoke(app, ["torchscript", str(make_checkpoint("v3")), "-w", str(tmp_path)])
    assert result.exit_code == 1
    assert "FAILED" in result.stdout and "recorded as failed" in result.stdout
    assert load_manifest(tmp_path)["artifacts"][0]["status"] == "failed"


def test_internal_errors_exit_3_with_a_hint(make_checkpoint, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(FORMATS, "torchscript", FORMATS["torchscript"].__class__(broken, ".ts"))
    result = runner.invoke(app, ["torchscript", str(make_checkpoint("v3")), "-w", str(tmp_path / "o")])
    assert result.exit_code == 3 and "UNET_EXPORT_DEBUG" in result.stderr
    assert not (tmp_path / "o").exists()


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "unet_export", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "onnx" in proc.stdout and "torchscript" in proc.stdout


def test_tolerances_are_options_and_recorded_with_the_verdict(make_checkpoint, tmp_path):
    weights = make_checkpoint("v3")
    args = ["torchscript", str(weights), "-w", str(tmp_path), "--height", "32", "--width", "32", "--device", "cpu"]
    result = runner.invoke(app, args + ["--rtol", "12", "--atol", "2e-6"])
    assert result.exit_code == 0, result.output
    assert "12 x noise floor + 2e-06 x max(1, |logit|)" in result.stdout and "err vs f64" in result.stdout
    parity = load_manifest(tmp_path)["artifacts"][0]["parity"]
    assert parity["limits"] == {"name": "fp32", "rtol": 12.0, "atol": 2e-6, "max_class_change": 0.0, "min_dice": None}
    assert all(c["reference"] == "float64" and c["max_err_fp64"] <= c["atol"] for c in parity["cases"])
    failed = runner.invoke(app, args + ["--rtol", "0.5", "--atol", "0"])  # stricter than eager fp32 itself
    assert failed.exit_code == 1 and "would pass with --rtol" in failed.stdout
    bad = runner.invoke(app, ["onnx", str(weights), "-w", str(tmp_path / "o"), "--min-dice", "0.99"])
    assert bad.exit_code == 2 and "add --fp16" in bad.stderr


@pytest.fixture(scope="module")
def real_images(tmp_path_factory):
    """A folder of real images for the small model (made once)."""
    from unet_export.data.synth import make_synth

    data = tmp_path_factory.mktemp("verify") / "data"
    make_synth(data, n=3, size=(48, 80), seed=1)
    return data


@pytest.fixture
def exported(exports, real_images, tmp_path):
    """A copy each test may change of ONNX and TorchScript of a small model (exported once per
    session), and the images."""
    weights = exports.checkpoint("unet_v3.pth")
    return exports.copy(tmp_path / "exports", weights, ("onnx", "torchscript"), 64, 64), real_images


def test_verify_rechecks_every_artefact_and_records_where(exported):
    import json

    out, data = exported
    before = load_manifest(out)
    # an engine this machine cannot run is reported, its verdict left alone, and fails nothing
    engine = before["artifacts"][0] | {"format": "tensorrt", "precision": "fp16", "status": "verified"}
    (out / "manifest.json").write_text(json.dumps(before | {"artifacts": before["artifacts"] + [engine]}))
    result = runner.invoke(app, ["verify", "-w", str(out), "--data", str(data), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # the 48x80 images run at their own size: these artefacts are dynamic and take it
    text = " ".join(result.stdout.split())
    assert f"inputs: seeded (fp32 only) + real images: 3 images from --data {data}" in text
    assert "1x3x64x64" in result.stdout and "3x3x48x80 images" in result.stdout
    assert "unavailable" in result.stdout and "runs on CUDA only" in result.stdout
    after = load_manifest(out)
    assert after["artifacts"][2] == engine
    for old, new in zip(before["artifacts"], after["artifacts"]):
        assert new["status"] == "verified" and new["sha256"] == old["sha256"] and new["parity"] == old["parity"]
        record = new["verified_on"]
        assert {"host", "device", "versions", "time", "inputs", "parity"} <= set(record)
        # the envelope's probes again (seeded), then the real images
        assert record["parity"]["passed"] and len(record["parity"]["cases"]) == len(old["envelope"]["checked"]) + 1
        assert record["envelope"]["proven"] and record["envelope"]["declared"] == old["envelope"]["declared"]
        assert record["parity"]["cases"][-1]["label"] == "images"


def test_verify_fails_a_wrong_artefact_and_refuses_a_changed_one(exported, exports, tmp_path):
    import json

    from unet_export.fileio import sha256_file

    out, _ = exported
    other = exports.run(exports.checkpoint("other.pth", seed=1), ("onnx",), 64, 64).workdir  # another model's
    onnx_file = out / "unet_v3.onnx"
    onnx_file.write_bytes((other / "other.onnx").read_bytes())
    changed = runner.invoke(app, ["verify", "-w", str(out), "--device", "cpu"])
    assert changed.exit_code == 2 and "changed since it was verified" in changed.stderr
    assert changed.stderr.count("\n") == 1 and "changed" in changed.stdout
    # An exporter that recorded the wrong file's hash: only the parity check can catch that.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"][0] |= {"sha256": sha256_file(onnx_file), "bytes": onnx_file.stat().st_size}
    (out / "manifest.json").write_text(json.dumps(manifest))
    failed = runner.invoke(app, ["verify", "-w", str(out), "--device", "cpu"])
    assert failed.exit_code == 1 and "would pass with" in failed.stdout
    statuses = {a["format"]: a["status"] for a in load_manifest(out)["artifacts"]}
    assert statuses == {"onnx": "failed", "torchscript": "verified"}


def test_verify_and_bench_check_every_artefacts_bytes_before_any_work(exported, monkeypatch):
    """Issue 24: a changed file was found only when its turn came, after minutes of parity checks
    or timing of the others. Now the last artefact's changed bytes stop both before any of it."""
    import unet_export.bench.run as bench
    import unet_export.flows.verify as verify_flow
    from unet_export.errors import IntegrityError

    out, _ = exported
    last = out / load_manifest(out)["artifacts"][-1]["path"]
    last.write_bytes(last.read_bytes() + b"\0")
    ran = []
    monkeypatch.setattr(verify_flow, "run_parity", lambda *a, **k: ran.append("parity"))
    monkeypatch.setattr(bench, "bench_row", lambda *a, **k: ran.append("row"))
    result = runner.invoke(app, ["verify", "-w", str(out), "--device", "cpu"])
    assert result.exit_code == 2 and f"{last} changed since it was verified" in result.stderr, result.output
    with pytest.raises(IntegrityError, match="changed since it was verified"):
        bench.benchmark(out, backends=["eager", "onnxruntime"], device="cpu", iters=1, warmup=0)
    assert ran == []
    assert "verified_on" not in load_manifest(out)["artifacts"][0]


def test_verify_without_artefacts_exits_2(tmp_path):
    result = runner.invoke(app, ["verify", "-w", str(tmp_path)])
    assert result.exit_code == 2 and "run `unet-export onnx" in result.stderr


# Exit codes at the CLI boundary: issue 14 pinned the proof value by value (these were tests/test_promises_core.py, section B).

# B: exit codes at the CLI boundary ----------------------------------------------------------


def test_an_artefact_that_cannot_be_exported_exits_1_and_publishes_nothing(make_checkpoint, tmp_path, monkeypatch):
    def cannot_script(*_, **__):
        raise RuntimeError("Python builtin <built-in function id> is currently not supported in Torchscript")

    def cannot_trace(*_, **__):  # the fallback when scripting fails
        raise RuntimeError("Only tensors, lists, tuples of tensors, or dictionary of tensors can be output")

    monkeypatch.setattr(torch.jit, "script", cannot_script)
    monkeypatch.setattr(torch.jit, "trace", cannot_trace)
    weights = make_checkpoint("v3")
    with pytest.raises(ArtifactError, match="torch.jit.script failed: RuntimeError") as info:
        export_artifact(weights, "torchscript", tmp_path / "lib", device="cpu", height=32, width=32, static=True)
    assert info.value.exit_code == 1
    assert "; torch.jit.trace at 1x3x32x32 failed too: RuntimeError: Only tensors" in str(info.value)
    out = tmp_path / "exports"
    args = ["torchscript", str(weights), "-w", str(out), "--height", "32", "--width", "32", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: torch.jit.script failed")
    assert "Traceback" not in result.output
    assert not list(out.glob("*.ts")) and not list(out.glob(".*tmp*"))  # nothing published, no temp left
    assert not out.exists() or load_manifest(out)["artifacts"] == []


def test_a_traced_torchscript_export_says_it_takes_only_its_shape(make_checkpoint, tmp_path, monkeypatch):
    """Scripting failed, the trace worked: one line says so and what the model now takes; --json
    carries the same reason."""

    def cannot_script(*_, **__):
        raise RuntimeError("Unable to extract string literal index. ModuleDict indexing is only supported\n  File")

    monkeypatch.setattr(torch.jit, "script", cannot_script)
    out, doc = tmp_path / "exports", tmp_path / "r.json"
    args = ["torchscript", str(make_checkpoint("v3")), "-w", str(out), "--height", "32", "--width", "48",
            "--device", "cpu", "--json", str(doc)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    reason = "RuntimeError: Unable to extract string literal index. ModuleDict indexing is only supported"
    line = f"torch.jit.script failed ({reason}): traced at 1x3x32x48, the TorchScript model takes only that shape"
    assert line in result.stdout.splitlines()
    assert "torchscript fp32" in result.stdout and ", static)" in result.stdout
    [artifact] = json.loads(doc.read_text())["artifacts"]
    assert artifact["traced"] == reason and [c["shape"] for c in artifact["parity"]["cases"]] == [[1, 3, 32, 48]]


def test_debug_shows_the_traceback_and_an_internal_error_still_exits_3(make_checkpoint, tmp_path):
    """Through the real entry point (run_app), not Typer's test runner: the contract's 3, not 1."""
    code = (
        "import sys\n"
        "import unet_export.cli.export as e, unet_export.cli.main as m\n"
        "def broken(*a, **k):\n"
        "    raise ZeroDivisionError('a bug')\n"
        "e.export_artifact = broken\n"
        f"sys.argv = ['unet-export', 'torchscript', {str(make_checkpoint('v3'))!r}, '-w', {str(tmp_path / 'o')!r}]\n"
        "m.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"UNET_EXPORT_DEBUG": "1"})  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr and "in broken" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: internal error: ZeroDivisionError: a bug")


# Issue 15: a rough edge a new user hit, reproduced before it was fixed (was tests/test_rough_edges.py).


def test_fp32_layers_that_match_nothing_write_nothing(make_checkpoint, tmp_path):
    weights, out = make_checkpoint("v3"), tmp_path / "exports"
    result = runner.invoke(app, ["onnx", str(weights), "-w", str(out), "--fp16", "--fp32-layers", "nomatch*",
                                 "--height", "64", "--width", "64", "--device", "cpu", "--data", str(DEMO_VAL)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--fp32-layers nomatch* matches no node of unet_v3.onnx" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() or sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []


# Issue 25, rough edges 4 and 9 (a, b) (was tests/test_rough_edges.py).


@pytest.mark.parametrize("command", [["onnx"], ["torchscript"]])
def test_a_workdir_that_is_a_file_is_one_clear_line(tmp_path, command):
    from unet_export.flows.demo import DEMO_WEIGHTS

    workdir = tmp_path / "exports"
    workdir.write_text("not a folder")
    result = runner.invoke(app, [*command, str(DEMO_WEIGHTS), "-w", str(workdir), "--height", "32", "--width", "32",
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: --workdir {workdir} is a file, not a folder", result.stderr
    assert workdir.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["exports"]


@pytest.mark.parametrize("suffix", [".onnx", ".ts", ".pt2", ".xml"])
def test_an_exported_model_passed_as_a_checkpoint_is_named_for_what_it_is(tmp_path, suffix):
    import onnx
    from onnx import TensorProto, helper

    model = tmp_path / f"model{suffix}"
    if suffix == ".onnx":
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])  # fmt: skip
        onnx.save(helper.make_model(graph), model)
    elif suffix == ".xml":
        model.write_text('<?xml version="1.0"?>\n<net name="unet" version="11"></net>\n')
    else:  # TorchScript and AOTI packages are zips, as torch.save's checkpoints are
        import zipfile

        with zipfile.ZipFile(model, "w") as z:
            z.writestr("model/data.pkl" if suffix == ".ts" else "model/archive_format", b"x")
    out = tmp_path / "exports"
    result = runner.invoke(app, ["onnx", str(model), "-w", str(out), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    kind = {".onnx": "an ONNX model", ".ts": "a TorchScript model", ".pt2": "an AOTInductor package",
            ".xml": "an OpenVINO model"}[suffix]  # fmt: skip
    assert result.stderr.startswith(f"error: {model} is {kind}, not a checkpoint: pass it to predict or unet-bench"), (
        result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
