"""AOTInductor packages and the libtorch C++ example: both artefact kinds run from C++ and
match Python within the FP32 tolerance."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from unet_export.api import export_artifact
from unet_export.bench.run import benchmark
from unet_export.cli.main import app
from unet_export.flows.cpp_check import cpp_check
from unet_export.flows.demo import DEMO_SIZE, DEMO_VAL, DEMO_WEIGHTS
from unet_export.workdir.manifest import load_manifest
from unet_export.predict import predict

runner = CliRunner()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpp") / "exports"
    for fmt in ("torchscript", "aoti"):
        result = export_artifact(DEMO_WEIGHTS, fmt, out, device="cpu", height=DEMO_SIZE[0], width=DEMO_SIZE[1])
        assert result.passed, result.parity.failures()
    return out


@pytest.fixture(scope="module")
def cpp_build(tmp_path_factory):
    """One build folder for the module's C++ runs: the example is compiled once, later runs reuse it."""
    return tmp_path_factory.mktemp("cpp-build")


def test_aoti_package_is_verified_with_its_limits(workdir, tmp_path):
    entry = {a["format"]: a for a in load_manifest(workdir)["artifacts"]}["aoti"]
    assert entry["path"] == "demo_unet.pt2" and entry["device"] == "cpu" and entry["status"] == "verified"
    assert entry["limits"] == {"batch": [1, None], "height": [16, None], "width": [16, None]}
    assert [c["shape"] for c in entry["parity"]["cases"]] == [
        [1, 3, 128, 128], [1, 3, 192, 192], [1, 3, 192, 128], [1, 3, 128, 192], [1, 3, 129, 161], [8, 3, 128, 128]]
    image = DEMO_VAL / "imgs" / "synth_0003.png"
    (from_pt2,) = predict(workdir / "demo_unet.pt2", [image], tmp_path / "a")
    (from_pth,) = predict(DEMO_WEIGHTS, [image], tmp_path / "b")
    assert np.array_equal(np.asarray(Image.open(from_pt2)), np.asarray(Image.open(from_pth)))
    row = benchmark(workdir, backends=["aoti"], device="cpu", batch=2, warmup=1, iters=2).rows[1]
    assert row.backend == "aoti" and row.status == "ok" and row.parity["max_abs_err"] < 1e-4


@pytest.mark.cpp
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                    reason="cmake or a C++ compiler is absent")  # fmt: skip
def test_cpp_example_matches_python(workdir, cpp_build):
    rows = cpp_check(workdir, cpp_build, device="cpu")
    assert sorted(r["format"] for r in rows) == ["aoti", "torchscript"]
    for row in rows:
        case = row["case"]
        assert row["status"] == "ok", case.failures
        assert case.max_abs_err <= case.atol and case.differing_pixels == 0
        assert row["mean_ms"] > 0 and row["min_ms"] <= row["mean_ms"]
    pgm = (cpp_build / "runs" / "demo_unet.pt2.mask.pgm").read_bytes()
    assert pgm.startswith(b"P5\n128 128\n255\n") and len(pgm) == len(b"P5\n128 128\n255\n") + 128 * 128


@pytest.mark.cpp
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                    reason="cmake or a C++ compiler is absent")  # fmt: skip
def test_cpp_runs_a_traced_torchscript_model_at_its_one_shape(cpp_build, tmp_path, monkeypatch):
    """TorchScript that had to be traced is static: C++ feeds it its 1xCxHxW, not the batch of 2."""

    def cannot_script(*_, **__):
        raise RuntimeError("scripting refused")

    monkeypatch.setattr(torch.jit, "script", cannot_script)
    out = tmp_path / "exports"
    assert export_artifact(DEMO_WEIGHTS, "torchscript", out, device="cpu", height=64, width=96).entry["traced"]
    (row,) = cpp_check(out, cpp_build, device="cpu")
    assert row["status"] == "ok", row["case"].failures
    assert row["case"].shape[0] == 1 and row["case"].shape[2:] == [64, 96]


def test_predict_from_a_package_prints_no_toolchain_noise(workdir, tmp_path):
    import subprocess
    import sys

    image = DEMO_VAL / "imgs" / "synth_0003.png"
    result = subprocess.run([sys.executable, "-m", "unet_export", "predict", str(workdir / "demo_unet.pt2"), str(image),
                             "--out", str(tmp_path / "m"), "--device", "cpu"], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()  # the summary, and what the runtime ran
    assert result.stderr == "" and len(lines) == 2 and lines[1].startswith("throughput mode: "), result.stdout
    assert result.stdout.startswith(f"wrote 1 mask to {tmp_path / 'm'} in ") and ", aoti, batch 8, local)" in result.stdout


# Issue 15: a rough edge a new user hit, reproduced before it was fixed (was tests/test_rough_edges.py).


def test_cpp_check_without_artefacts_names_the_formats_it_runs(tmp_path):
    result = runner.invoke(app, ["cpp-check", "-w", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "unet-export torchscript WEIGHTS" in result.stderr
    assert "unet-export onnx" not in result.stderr
