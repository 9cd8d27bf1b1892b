"""unet-bench keeps to the envelope each artefact was proven on (issue 28): a --batch, --height or
--width outside it exits 2 with one line naming the row, the artefact and its envelope, before
any model is built or anything is timed; rows that run no artefact (eager) are not limited."""

import pytest
from typer.testing import CliRunner

import unet_export.bench.run as bench
from unet_export.cli.bench import app
from unet_export.workdir.manifest import transaction

runner = CliRunner()
ENVELOPE = "(batch 1-8, height 64-96, width 64-96)"  # exported at 64x64: the export size to 1.5x it


@pytest.fixture(scope="module")
def workdir(exports, tmp_path_factory):
    weights = exports.checkpoint("unet_v3.pth")
    return exports.copy(tmp_path_factory.mktemp("bench-env") / "exports", weights, ("onnx", "torchscript"), 64, 64)


@pytest.fixture
def untimed(monkeypatch):
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr(bench, "time_infer", lambda *a, **k: pytest.fail("something was timed"))


def bench_cli(workdir, *args):
    return runner.invoke(app, ["-w", str(workdir), "--device", "cpu", "--warmup", "0", "--iters", "1", *map(str, args)])


@pytest.mark.parametrize("args, row, shape, use", [
    (["--batch", 9], "torchscript runs unet_v3.ts", "9x3x64x64", "use batch 8"),  # the first row with an artefact
    (["--batch", 2, "--height", 97, "--backends", "onnxruntime"], "onnxruntime runs unet_v3.onnx", "2x3x97x64",
     "use height 96"),
    (["--batch", 2, "--height", 64, "--width", 200, "--backends", "openvino"], "openvino runs unet_v3.onnx",
     "2x3x64x200", "use width 96"),
    (["--batch", 2, "--width", 112, "--backends", "eager,torchscript"], "torchscript runs unet_v3.ts", "2x3x64x112",
     "use width 96"),
])  # fmt: skip
def test_a_shape_outside_the_envelope_exits_2_before_anything_is_timed(workdir, untimed, args, row, shape, use):
    result = bench_cli(workdir, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: --batch/--height/--width: {row}, whose input {shape} is outside the proven "
                             f"envelope {ENVELOPE}: {use}\n")  # fmt: skip


def test_rows_without_an_artefact_and_entries_without_an_envelope_are_not_limited(workdir, tmp_path):
    eager = bench_cli(workdir, "--batch", 2, "--height", 144, "--backends", "eager")
    assert eager.exit_code == 0, eager.output
    copy = tmp_path / "exports"
    import shutil

    shutil.copytree(workdir, copy)
    with transaction(copy) as manifest:
        for entry in manifest["artifacts"]:
            entry.pop("envelope")
    before = bench_cli(copy, "--batch", 2, "--height", 144, "--backends", "onnxruntime")
    assert before.exit_code == 0, before.output
    assert "onnxruntime" in before.stdout


def test_inside_the_envelope_every_row_runs(workdir):
    result = bench_cli(workdir, "--batch", 8, "--height", 96, "--width", 64, "--backends", "onnxruntime,torchscript")
    assert result.exit_code == 0, result.output
