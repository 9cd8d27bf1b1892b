"""`unet-export demo`, whole, in a real process (slow: `make test-all`): export, verify, INT8, Dice and
bench exit 0 with every artefact verified at the demo model's own size. A README promise that had no
test able to fail (issue 14; was in tests/test_promises_bench.py)."""

import json
import subprocess
import sys

import pytest

from unet_export.runtimes.openvino.runner import openvino_cpu_bf16


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    """The whole demo (export, verify, INT8, Dice, bench) exits 0 with every artefact verified at
    the demo model's own size."""
    command = [sys.executable, "-m", "unet_export", "demo", "-w", str(tmp_path / "demo"), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    formats = {(a["format"], a["precision"]) for a in manifest["artifacts"]}
    assert {("onnx", "fp32"), ("torchscript", "fp32"), ("aoti", "fp32")} <= formats
    for entry in manifest["artifacts"]:
        assert entry["status"] == "verified" and entry["export_size"] == [128, 128], entry["path"]
    out = " ".join(result.stdout.split())
    assert "Dice on the shipped validation set" in out
    bf16 = openvino_cpu_bf16()
    for row in ("eager", "onnxruntime", "openvino", "openvino-bf16") if bf16 else ("eager", "onnxruntime", "openvino"):
        assert f"ok {row} " in out, row
    if not bf16:  # the hint would run f32 under a bf16 label
        assert "unavailable openvino-bf16 " in out
    for entry in manifest["artifacts"]:
        assert (tmp_path / "demo" / entry["path"]).stat().st_size == entry["bytes"]
