"""The exit-code contract at the CLI boundary: usage errors are one line and exit 2 like any
other bad input, a bug exits 3 even with UNET_EXPORT_DEBUG=1, and reports can go to new folders."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import unet_export.cli.main as cli_main
from unet_export.cli.main import app
from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS
from unet_export.fileio import write_json
from unet_export.workdir.manifest import load_manifest

UNET_EXPORT = [sys.executable, "-m", "unet_export"]
UNET_BENCH = [sys.executable, "-c", "from unet_export.cli.bench import main; main()"]


@pytest.mark.parametrize("tool, args, expected", [
    (UNET_EXPORT, ["onnx"], "Missing argument 'weights'"),
    (UNET_EXPORT, ["onnx", "w.pth", "--height", "abc"], "Invalid value for '--height'"),
    (UNET_EXPORT, ["nosuch"], "No such command 'nosuch'"),
    (UNET_BENCH, ["--batch", "x"], "Invalid value for '--batch'"),
    (UNET_BENCH, ["--compile-mode", "fast"], "choose one of default"),
])  # fmt: skip
def test_usage_errors_are_one_line_and_exit_2(tool, args, expected):
    proc = subprocess.run([*tool, *args], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]


def test_help_still_exits_0():
    proc = subprocess.run([*UNET_EXPORT, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "onnx" in proc.stdout


@pytest.mark.parametrize("debug", ["", "1"])
def test_a_bug_exits_3_with_or_without_debug(monkeypatch, tmp_path, debug):
    def broken(*_, **__):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli_main, "export_artifact", broken)
    monkeypatch.setenv("UNET_EXPORT_DEBUG", debug)
    result = CliRunner().invoke(app, ["torchscript", str(DEMO_WEIGHTS), "-w", str(tmp_path)])
    assert result.exit_code == 3 and "ZeroDivisionError" in result.stderr
    assert ("Traceback" in result.stderr) == bool(debug)


def test_reports_go_into_folders_that_do_not_exist_yet(tmp_path):
    write_json(tmp_path / "reports" / "nested" / "bench.json", {"ok": 1})
    assert (tmp_path / "reports" / "nested" / "bench.json").read_text() == '{\n  "ok": 1\n}\n'
    assert [p.name for p in (tmp_path / "reports" / "nested").iterdir()] == ["bench.json"]


def test_a_write_error_names_the_destination_not_the_temp_file(tmp_path):
    (tmp_path / "reports").write_text("a file, not a folder")
    with pytest.raises(OSError) as info:
        write_json(tmp_path / "reports" / "bench.json", {})
    assert info.value.filename == str(tmp_path / "reports")  # the file in the way, not a hidden temp name


def test_a_failed_write_leaves_nothing(tmp_path):
    def unserialisable():
        pass

    dest = tmp_path / "r.json"
    with pytest.raises(TypeError):
        write_json(dest, {"f": unserialisable})
    assert list(tmp_path.iterdir()) == []


def test_an_evaluate_gate_with_nothing_to_judge_is_an_error(tmp_path):
    """--max-delta with no artefact of this checkpoint in the workdir used to score eager alone
    and exit 0 without a word."""
    from unet_export.flows.demo import DEMO_VAL

    empty = tmp_path / "exports"
    empty.mkdir()
    result = CliRunner().invoke(app, ["evaluate", str(DEMO_WEIGHTS), str(DEMO_VAL), "-w", str(empty),
                                      "--max-delta", "0.001", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 2 and "no artefact of this checkpoint" in result.stderr
    # --min-dice alone judges eager, which is there: a real gate, both sides
    passing = CliRunner().invoke(app, ["evaluate", str(DEMO_WEIGHTS), str(DEMO_VAL), "-w", str(empty),
                                       "--min-dice", "0.99", "--device", "cpu"])  # fmt: skip
    assert passing.exit_code == 0, passing.output
    failing = CliRunner().invoke(app, ["evaluate", str(DEMO_WEIGHTS), str(DEMO_VAL), "-w", str(empty),
                                       "--min-dice", "0.9999", "--device", "cpu"])  # fmt: skip
    assert failing.exit_code == 1 and "gate failed" in failing.stdout


def test_bench_judges_reduced_precision_on_the_recorded_validation_images(exports, tmp_path):
    """The documented `unet-bench --batch 8` failed the trained demo model's bf16 rows on noise;
    without --data the held-out images its training recorded are the inputs."""
    from unet_export.bench.run import NOISE_NOTE, benchmark
    from unet_export.flows.demo import DEMO_VAL

    demo = exports.copy(tmp_path / "demo", DEMO_WEIGHTS, ("onnx", "torchscript"), 128, 128)
    report = benchmark(demo, backends=["eager", "eager-bf16"], device="cpu", batch=8, warmup=0, iters=1)
    recorded = load_manifest(demo)["model"]["heldout"]["images"]
    assert len(recorded) == 24 and all(Path(i["path"]).parent == (DEMO_VAL / "imgs").resolve() for i in recorded)
    assert report.config["inputs"] == "24 held-out images (recorded)"
    assert [r.status for r in report.rows] == ["ok", "ok"]
    random = exports.copy(tmp_path / "random", exports.checkpoint("other.pth", seed=1), ("onnx",), 64, 64)
    noise = benchmark(random, backends=["eager"], device="cpu", batch=2, warmup=0, iters=1)
    assert noise.config["inputs"].startswith(NOISE_NOTE)


def test_the_release_ci_line_passes_on_a_plain_trained_checkpoint(exports, tmp_path):
    """Issue 24: `unet-export onnx weights.pth` + `unet-bench --batch 8` on the trained demo
    checkpoint without its training sidecar exited 1: eager-bf16 (0.56%) and openvino-bf16 (0.31%)
    were judged on seeded noise. Without real images they are timed, not judged; FP32 still gates.
    The exports (`unet-export onnx|torchscript weights.pth`, exit 0) are the session's, copied to ./exports."""
    weights = exports.checkpoint("weights.pth", write=lambda path: shutil.copy(DEMO_WEIGHTS, path))  # no sidecar
    exports.copy(tmp_path / "exports", weights, ("onnx", "torchscript"), 128, 128)
    env = os.environ | {"UNET_BENCH_ITERS": "1", "UNET_BENCH_WARMUP": "0", "COLUMNS": "250"}
    backends = "eager,eager-bf16,onnxruntime,openvino,openvino-bf16,torchscript"
    proc = subprocess.run([*UNET_BENCH, "--batch", "8", "--device", "cpu", "--backends", backends, "--json", "b.json"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["backend"]: r for r in json.loads((tmp_path / "b.json").read_text())["results"]}
    for name in ("eager-bf16", "openvino-bf16"):
        assert rows[name]["status"] == "not_judged" and rows[name]["img_per_s"] > 0, rows[name]
        assert "bf16 is judged on real images only" in rows[name]["reason"] and "--data DIR" in rows[name]["reason"]
    for name in ("onnxruntime", "openvino", "torchscript"):
        assert rows[name]["status"] == "ok" and rows[name]["parity"]["passed"], rows[name]
    # Given real images, the same bf16 row is judged (and passes): the gate moved, it was not dropped.
    rows_with_data = subprocess.run([*UNET_BENCH, "--batch", "8", "--device", "cpu", "--backends", "eager-bf16",
                                     "--data", str(DEMO_VAL), "--json", "d.json"], cwd=tmp_path, capture_output=True,
                                    text=True, env=env, timeout=600)  # fmt: skip
    assert rows_with_data.returncode == 0, rows_with_data.stdout + rows_with_data.stderr
    judged = {r["backend"]: r for r in json.loads((tmp_path / "d.json").read_text())["results"]}
    assert judged["eager-bf16"]["status"] == "ok" and judged["eager-bf16"]["parity"]["passed"]


@pytest.mark.parametrize("suffix", [".onnx", ".ts", ".pt2"])
def test_predict_on_a_corrupt_artefact_exits_2(tmp_path, suffix):
    from unet_export.flows.demo import DEMO_VAL

    model = tmp_path / f"random{suffix}"
    model.write_bytes(bytes(range(256)) * 20)
    image = next((DEMO_VAL / "imgs").iterdir())
    proc = subprocess.run([*UNET_EXPORT, "predict", str(model), str(image), "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and f"is not a readable {suffix} artefact" in lines[-1] and lines[-1].startswith("error:")
    assert not (tmp_path / "m").exists()


def test_predict_on_an_onnx_model_unet_export_did_not_write_exits_2(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from unet_export.flows.demo import DEMO_VAL

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])])  # fmt: skip
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    image = next((DEMO_VAL / "imgs").iterdir())
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "other.onnx"), str(image), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "carries no unet-export model record" in result.stderr
