"""The CLI contract: exit 0 verified, 1 parity failed, 2 bad input; one line, no traceback,
nothing left in the workdir after a bad input."""

import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import milesial_state_dict
from tests.test_checkpoint import BAD, _bad_files
from unet_export.cli.main import app
from unet_export.export import FORMATS
from unet_export.manifest import load_manifest

runner = CliRunner()


def test_onnx_command_verifies_and_exits_zero(make_checkpoint, tmp_path):
    out = tmp_path / "exports"
    result = runner.invoke(app, ["onnx", str(make_checkpoint("v4")), "--workdir", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout and "1x3x256x256" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [".manifest.lock", "manifest.json", "unet_v4.onnx"]


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


def test_parity_failure_exits_1(make_checkpoint, tmp_path, monkeypatch):
    real = FORMATS["torchscript"]

    def wrong(model, dest, sample, metadata, **kw):
        other = type(model)(**{k: getattr(model, k) for k in ("n_channels", "n_classes", "bilinear")}, width=8)
        other.load_state_dict(milesial_state_dict("v3", seed=1))
        return real.write(other.eval(), dest, sample, metadata, **kw)

    monkeypatch.setitem(FORMATS, "torchscript", real.__class__(wrong, real.suffix))
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
