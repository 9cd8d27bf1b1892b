"""Rough edges a new user hit (issue 15), each reproduced before it was fixed."""

import pytest
from typer.testing import CliRunner

from unet_export.cli.main import app
from unet_export.flows.demo import DEMO_VAL

runner = CliRunner()


def test_fp32_layers_that_match_nothing_write_nothing(make_checkpoint, tmp_path):
    weights, out = make_checkpoint("v3"), tmp_path / "exports"
    result = runner.invoke(app, ["onnx", str(weights), "-w", str(out), "--fp16", "--fp32-layers", "nomatch*",
                                 "--height", "64", "--width", "64", "--device", "cpu", "--data", str(DEMO_VAL)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--fp32-layers nomatch* matches no node of unet_v3.onnx" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() or sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []


def test_synth_refuses_a_folder_that_holds_a_dataset_unless_told_to_overwrite(tmp_path):
    out = tmp_path / "s"
    first = runner.invoke(app, ["data", "synth", str(out), "--n", "3", "--size", "32x32"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["data", "synth", str(out), "--n", "2", "--size", "32x32"])
    assert again.exit_code == 2 and "already holds a dataset (6 files in imgs/ and masks/)" in again.stderr
    assert len(list((out / "imgs").iterdir())) == 3  # untouched
    replaced = runner.invoke(app, ["data", "synth", str(out), "--n", "2", "--size", "32x32", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in (out / "imgs").iterdir()) == ["synth_0000.png", "synth_0001.png"]
    assert len(list((out / "masks").iterdir())) == 2


def test_synth_size_errors_speak_of_height_x_width(tmp_path):
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "s"), "--size", "128"])
    assert result.exit_code == 2 and "--size '128' is not HxW, e.g. 128x128" in result.stderr
    assert "NxCxHxW" not in result.stderr


def test_labelme_refuses_a_shape_drawn_with_the_background_label(tmp_path):
    from tests.flows.test_labelme import SHAPES, png_bytes, write_labelme

    (tmp_path / "a.png").write_bytes(png_bytes())
    write_labelme(tmp_path, "a", SHAPES, image_path="a.png")
    result = runner.invoke(app, ["data", "labelme", str(tmp_path), str(tmp_path / "voc"), "--labels", "cat,dog,bird"])
    assert result.exit_code == 2
    assert "labelled 'cat', the first of --labels, which is class 0, the background" in result.stderr
    assert "--labels background,cat,dog,bird" in result.stderr and not (tmp_path / "voc").exists()
    named = runner.invoke(app, ["data", "labelme", str(tmp_path), str(tmp_path / "ok"),
                                "--labels", "sky,cat,dog,bird"])  # fmt: skip
    assert named.exit_code == 0, named.output  # any background name no shape uses is fine


def test_train_says_amp_does_nothing_on_the_cpu(tmp_path):
    from unet_export.data.synth import make_synth

    make_synth(tmp_path / "data", n=4, size=(32, 32), classes=2, seed=0)
    args = ["train", str(tmp_path / "data"), "--width", "8", "--epochs", "1", "--batch-size", "2", "--device", "cpu",
            "-w", str(tmp_path / "runs"), "--val-fraction", "0.25"]  # fmt: skip
    result = runner.invoke(app, args + ["--amp"])
    assert result.exit_code == 0, result.output
    assert "--amp: mixed precision runs on CUDA only; training in FP32 on the CPU" in result.stdout
    assert "nan" not in result.stdout


def test_predict_counts_one_mask_in_the_singular(tmp_path):
    from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS

    image = sorted((DEMO_VAL / "imgs").iterdir())[0]
    result = runner.invoke(app, ["predict", str(DEMO_WEIGHTS), str(image), "--out", str(tmp_path / "m"),
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote 1 mask to {tmp_path / 'm'}" in " ".join(result.stdout.split())


def _help(*command):
    result = runner.invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.replace("│", " ").split())


def test_help_texts_say_what_each_option_does_for_its_command():
    for command in ("train", "evaluate", "predict"):
        assert "Where parity runs" not in _help(command) and "Where the model runs" in _help(command), command
    assert "Where parity runs" in _help("onnx")
    cpp = _help("cpp-check")
    assert "[default: cpu]" in cpp and "CUDA when there is a GPU" not in cpp
    train = _help("train")
    assert "manifest.json" not in train and "Directory for the checkpoints" in train
    assert "polygon, rectangle, circle" in _help("data", "labelme")


def test_help_shows_flags_without_a_type_and_arguments_as_click_does():
    """Typer 0.29 printed `<bool>` beside every flag and `{weights}` in usage lines."""
    from unet_export.cli.bench import app as bench_app

    predict = _help("predict")
    assert "predict [OPTIONS] MODEL INPUTS..." in predict
    assert "onnx [OPTIONS] WEIGHTS" in _help("onnx")
    assert "--overlay Also write the mask" in predict and "--batch-size <int range>" in predict
    bench = runner.invoke(bench_app, ["--help"], terminal_width=200)
    assert bench.exit_code == 0 and "Usage:" in bench.stdout, bench.output
    bench = bench.stdout
    for text in (predict, _help("onnx"), _help("train"), _help("data", "synth"), bench):
        assert "<bool>" not in text and "{" not in text.split("Options")[0]


def test_cpp_check_without_artefacts_names_the_formats_it_runs(tmp_path):
    result = runner.invoke(app, ["cpp-check", "-w", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "unet-export torchscript WEIGHTS" in result.stderr
    assert "unet-export onnx" not in result.stderr


def test_a_static_onnx_model_pads_to_its_size_or_says_it_cannot(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from unet_export.flows.demo import DEMO_WEIGHTS
    from unet_export.predict import load_predictor, predict_classes
    from unet_export.data.synth import make_synth

    out = tmp_path / "exports"
    exported = runner.invoke(app, ["onnx", str(DEMO_WEIGHTS), "-w", str(out), "--static", "--height", "128",
                                   "--width", "128", "--device", "cpu"])  # fmt: skip
    assert exported.exit_code == 0, exported.output
    onnx_path = out / f"{DEMO_WEIGHTS.stem}.onnx"
    small = tmp_path / "small.png"
    Image.new("RGB", (120, 100), (90, 40, 200)).save(small)  # 100x120: fits in 128x128
    pad = runner.invoke(app, ["predict", str(onnx_path), str(small), "--out", str(tmp_path / "m"), "--device", "cpu"])
    assert pad.exit_code == 0, pad.output
    with Image.open(tmp_path / "m" / "small_mask.png") as mask:
        assert mask.size == (120, 100)
    # the same padding through the eager model gives the same classes
    static, eager = load_predictor(onnx_path, torch.device("cpu")), load_predictor(DEMO_WEIGHTS, torch.device("cpu"))
    assert static.fixed == (128, 128) and eager.fixed is None
    eager.fixed = static.fixed
    with static.runner, eager.runner:
        assert np.array_equal(predict_classes(static, small)[0], predict_classes(eager, small)[0])
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 150), (90, 40, 200)).save(big)
    # streaming predict (issue 18): the image it cannot take is that image's failure, the rest run
    refused = runner.invoke(app, ["predict", str(onnx_path), str(small), str(big), "--out", str(tmp_path / "n"),
                                  "--batch-size", "4", "--device", "cpu"])  # fmt: skip
    assert refused.exit_code == 1 and "wrote 1 mask " in refused.stdout and "batch 1," in refused.stdout
    assert "big.png: the model is static at 128x128 and the image is 150x200" in refused.stderr
    make_synth(tmp_path / "data", n=2, size=(96, 96), classes=3, seed=0)
    evaluated = runner.invoke(app, ["evaluate", str(DEMO_WEIGHTS), str(tmp_path / "data"), "-w", str(out),
                                    "--device", "cpu"])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert "static artefact takes 1x3x128x128, the images are 96x96" in " ".join(evaluated.stdout.split())


def test_parity_table_keeps_the_input_column_whole_at_80_columns():
    from rich.console import Console

    from unet_export.cli.render import parity_table
    from unet_export.parity.gate import FP32, ParityReport, compare
    import torch

    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    cases = [compare(x.float(), x.float(), FP32, exact=x) for _ in range(2)]
    cases[0].shape, cases[1].shape = [1, 3, 256, 256], [2, 3, 250, 375]
    report = ParityReport("onnxruntime (cpu)", "fp32", cases, limits=FP32.to_dict())
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(parity_table(report))
    text = console.export_text()
    assert "1x3x256x256" in text and "2x3x250x375" in text


def test_long_steps_show_a_status_on_a_terminal(monkeypatch, tmp_path):
    from unet_export.cli import common, main
    from unet_export.errors import UserError

    shown = []
    monkeypatch.setattr(common.console, "_force_terminal", True)  # as on a terminal: a CI log gets plain lines
    monkeypatch.setattr(common.console, "status", lambda what, **kw: (shown.append(what), _Null())[1])

    def stop(*args, **kwargs):
        raise UserError("stopped here")

    monkeypatch.setattr(main, "export_artifact", stop)
    result = runner.invoke(app, ["aoti", str(tmp_path / "w.pth"), "-w", str(tmp_path / "x")])
    assert result.exit_code == 2 and shown == ["compiling the AOTInductor package and checking parity..."]
    assert "aoti:" not in result.stdout  # the spinner instead of the plain lines


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_bench_table_keeps_backend_names_whole_in_a_ci_log():
    from types import SimpleNamespace

    from rich.console import Console

    from unet_export.bench.stats import Row
    from unet_export.cli.render import bench_table

    rows = [Row(name, "fp32", "ok", img_per_s=10.0, latency_ms={"mean": 1.0, "p50": 1.0, "p99": 1.0}, cv=0.01,
                speedup_vs_eager=1.0, peak_mem_mb=1000.0) for name in ("eager-channels-last", "onnxruntime-int8")]
    report = SimpleNamespace(rows=rows, config={"batch": 8, "height": 128, "width": 128, "inputs": "seeded"},
                             device={"name": "cpu", "type": "cpu"})  # fmt: skip
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(bench_table(report))
    text = console.export_text()
    assert "eager-channels-last" in text and "onnxruntime-int8" in text


def test_predict_on_a_dataset_folder_predicts_its_images_not_its_masks(tmp_path):
    from unet_export.data.synth import make_synth
    from unet_export.flows.demo import DEMO_WEIGHTS

    make_synth(tmp_path / "data", n=3, size=(32, 32), seed=0)
    out = tmp_path / "m"
    result = runner.invoke(app, ["predict", str(DEMO_WEIGHTS), str(tmp_path / "data"), "--out", str(out),
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == [f"synth_000{i}_mask.png" for i in range(3)]
    assert f"wrote 3 masks to {out}" in " ".join(result.stdout.split())


@pytest.fixture(scope="module")
def onnx_workdir(exports, tmp_path_factory):
    """The demo model exported to ONNX at its training size (a copy of the session's export)."""
    from unet_export.flows.demo import DEMO_WEIGHTS

    return exports.copy(tmp_path_factory.mktemp("triton") / "exports", DEMO_WEIGHTS, ("onnx",), 128, 128)


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fake_tritonserver(folder):
    """A tritonserver that is found (an executable beside a Python backend) but never runs."""
    binary = folder / "bin/tritonserver"
    for backend in ("python", "onnxruntime"):
        (folder / "backends" / backend).mkdir(parents=True)
    (folder / "backends/python/triton_python_backend_stub").touch()
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)
    return binary


BAD_CHECK_INPUT = [
    (["--tritonserver", "/nonexistent"], "not an executable file"),
    (["--data", "/nonexistent"], "--data /nonexistent: not a folder"),
    (["--weights", "/nonexistent.pth"], "/nonexistent.pth is gone"),
]


@pytest.mark.parametrize("bad, fragment", BAD_CHECK_INPUT)
def test_triton_check_that_cannot_start_writes_no_repository(onnx_workdir, tmp_path, monkeypatch, bad, fragment):
    monkeypatch.setenv("UNET_EXPORT_TRITONSERVER", str(_fake_tritonserver(tmp_path / "server")))  # never fetched
    monkeypatch.chdir(tmp_path)
    made = runner.invoke(app, ["triton", "-w", str(onnx_workdir), "--repo", "old"])
    assert made.exit_code == 0, made.output
    before = _tree(tmp_path / "old")
    for repo in ("new", "old"):
        result = runner.invoke(app, ["triton", "-w", str(onnx_workdir), "--repo", repo, "--check", *bad])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert fragment in result.stderr
    assert not (tmp_path / "new").exists()
    assert _tree(tmp_path / "old") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "server"]  # no staged or old copies left


# Issue 25 (helper i25a): a closed pipe, --version, counts in the singular, failures on stderr.

import os
import subprocess
import sys

CLI = "from unet_export.cli.main import main; main()"
BENCH = "from unet_export.cli.bench import main; main()"


def _into_a_closed_pipe(entry: str, *args: str) -> subprocess.CompletedProcess:
    """Run a CLI with stdout a pipe whose reader has already gone: the worst case of
    `| head -c 10`, where the reader leaves before the first write rather than by luck after it."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-c", entry, *args], stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=120)  # fmt: skip
    finally:
        os.close(write)


def test_a_closed_pipe_ends_commands_quietly_with_exit_0():
    for entry, args in ((CLI, ["doctor", "--json"]), (CLI, ["--help"]), (CLI, ["predict", "--help"]),
                        (BENCH, ["--help"])):  # fmt: skip
        result = _into_a_closed_pipe(entry, *args)
        assert (result.returncode, result.stderr) == (0, ""), (args, result.returncode, result.stderr)


def test_a_gate_cut_short_by_a_closed_pipe_keeps_its_verdict(make_checkpoint, tmp_path):
    """`unet-bench | head`: the reader leaving is no error (no traceback, no exit 3), but it must not
    turn a failing gate into exit 0: the run goes on, its output to devnull, to its own exit code."""
    weights = make_checkpoint("v3")
    args = ["onnx", str(weights), "-w", str(tmp_path / "w"), "--height", "32", "--width", "32", "--device", "cpu"]
    assert runner.invoke(app, args).exit_code == 0
    # a zero tolerance fails even eager's own float32 noise against float64: a gate that fails
    bench = ["-w", str(tmp_path / "w"), "--backends", "eager,onnxruntime", "--device", "cpu", "--iters", "1",
             "--warmup", "0", "--rtol", "0", "--atol", "0"]  # fmt: skip
    failing = _into_a_closed_pipe(BENCH, *bench)
    assert (failing.returncode, failing.stderr) == (1, ""), (failing.returncode, failing.stderr)
    passing = _into_a_closed_pipe(BENCH, *bench[:-4])
    assert (passing.returncode, passing.stderr) == (0, ""), (passing.returncode, passing.stderr)


def test_doctor_json_into_head_exits_0_under_pipefail():
    script = f"set -o pipefail; {sys.executable} -c '{CLI}' doctor --json | head -c 10 >/dev/null"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (0, "")


def test_version_of_both_commands_is_the_installed_package_version():
    from importlib.metadata import version

    for entry in (CLI, BENCH):
        result = subprocess.run([sys.executable, "-c", entry, "--version"], capture_output=True, text=True, timeout=120)
        assert (result.returncode, result.stdout, result.stderr) == (0, f"unet-export {version('unet-export')}\n", "")


def test_counts_of_one_are_singular_in_what_commands_print(tmp_path):
    from tests.flows.test_labelme import SHAPES, png_bytes, write_labelme
    from unet_export.cli.render import dice_table
    from unet_export.parity.realimages import real_images_for

    synth = runner.invoke(app, ["data", "synth", str(tmp_path / "s"), "--n", "1", "--size", "32x32"])
    assert synth.exit_code == 0 and "wrote 1 image and mask to" in " ".join(synth.stdout.split()), synth.output
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "a.png").write_bytes(png_bytes())
    write_labelme(tmp_path / "lm", "a", SHAPES[:1], image_path="a.png")
    labelme = runner.invoke(app, ["data", "labelme", str(tmp_path / "lm"), str(tmp_path / "voc"),
                                  "--labels", "background,cat,dog,bird"])  # fmt: skip
    assert labelme.exit_code == 0 and "wrote 1 image, 1 shape to" in " ".join(labelme.stdout.split()), labelme.output
    (tmp_path / "one").mkdir()
    image = sorted((DEMO_VAL / "imgs").iterdir())[0]
    (tmp_path / "one" / image.name).write_bytes(image.read_bytes())
    assert real_images_for({}, None, tmp_path / "one", 8)[1] == f"1 image from --data {tmp_path / 'one'}"
    table = dice_table({"images": 1, "eager": {"dice": 0.5}, "artifacts": []}, "val")
    assert table.title == "Dice on val (1 image, milesial's definition)"


def test_predict_lists_failures_on_stderr_and_counts_in_the_singular(tmp_path):
    from unet_export.flows.demo import DEMO_WEIGHTS

    (tmp_path / "in").mkdir()
    good = sorted((DEMO_VAL / "imgs").iterdir())[0]
    (tmp_path / "in" / good.name).write_bytes(good.read_bytes())
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["predict", str(DEMO_WEIGHTS), str(tmp_path / "in"), "--out", str(tmp_path / "m"),
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "1 failed:" in result.stderr and "broken.png" in result.stderr
    assert "failed" not in result.stdout and "broken.png" not in result.stdout
    assert f"wrote 1 mask to {tmp_path / 'm'}" in " ".join(result.stdout.split())


def test_evaluate_scores_a_plain_checkpoint_against_0_255_masks_with_mask_values(make_checkpoint, tmp_path):
    from unet_export.data.synth import make_synth

    weights = make_checkpoint("v3")  # 2 classes, no mask_values: milesial's early releases
    make_synth(tmp_path / "d", n=2, size=(32, 32), classes=2)  # masks hold 0 and 255
    args = ["evaluate", str(weights), str(tmp_path / "d"), "-w", str(tmp_path / "none"), "--device", "cpu"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert len(refused.stderr.strip().splitlines()) == 1 and "--mask-values 0,255" in refused.stderr
    scored = runner.invoke(app, [*args, "--mask-values", "0,255"])
    assert scored.exit_code == 0, scored.output
    assert "Dice" in scored.stdout and "eager" in scored.stdout
    bad = runner.invoke(app, [*args, "--mask-values", "0,x"])
    assert bad.exit_code == 2 and "--mask-values '0,x'" in bad.stderr


def test_evaluate_refuses_mask_values_that_differ_from_the_checkpoints(make_checkpoint, tmp_path):
    from unet_export.data.synth import make_synth

    data = tmp_path / "d"
    make_synth(data, n=2, size=(32, 32), classes=2)
    train = runner.invoke(app, ["train", str(data), "--width", "8", "--epochs", "1", "--batch-size", "1",
                                "--val-fraction", "0.5", "-w", str(tmp_path / "run"), "--device", "cpu"])  # fmt: skip
    assert train.exit_code == 0, train.output
    weights = sorted((tmp_path / "run").glob("*.pth"))[-1]
    args = ["evaluate", str(weights), str(data), "-w", str(tmp_path / "none"), "--device", "cpu"]
    assert runner.invoke(app, [*args, "--mask-values", "0,255"]).exit_code == 0
    differ = runner.invoke(app, [*args, "--mask-values", "0,128"])
    assert differ.exit_code == 2 and len(differ.stderr.strip().splitlines()) == 1, differ.output
    assert "[0, 128]" in differ.stderr and "[0, 255]" in differ.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here: --device cuda is no error")
def test_benchmark_script_without_a_gpu_exits_2_with_one_line(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    work = root / "benchmarks" / "work" / "cuda"
    before = sorted(work.rglob("*")) if work.exists() else None
    result = subprocess.run([sys.executable, str(root / "benchmarks" / "run.py"), "--device", "cuda"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "--device cpu" in result.stderr
    assert result.stdout == ""
    assert (sorted(work.rglob("*")) if work.exists() else None) == before  # nothing written before the refusal


# --- issue 25, rough edges 4 and 9 (a, b) -----------------------------------------------------------------


def _realistic_bench_report():
    from types import SimpleNamespace

    from unet_export.bench.stats import Row

    lat = {"mean": 12.3, "p50": 12.1, "p99": 15.9}
    parity = {"max_abs_err": 1.2e-5, "max_err_fp64": 2.3e-5, "noise_floor": 1.1e-5, "argmax_disagreement": 0.0001,
              "dice_vs_eager": 0.99998}  # fmt: skip
    rows = [
        Row("eager", "fp32", "ok", img_per_s=81.2, latency_ms=lat, cv=0.02, speedup_vs_eager=1.0, peak_mem_mb=812.0,
            parity=parity),
        Row("eager-channels-last", "fp32", "ok", img_per_s=90.1, latency_ms=lat, cv=0.03, speedup_vs_eager=1.11,
            peak_mem_mb=820.0, parity=parity),
        Row("onnxruntime-int8", "int8-static", "parity_failed", img_per_s=150.0, latency_ms=lat, cv=0.05,
            speedup_vs_eager=1.85, peak_mem_mb=400.0, parity=parity),
        Row("tensorrt-fp16", "fp16", "unavailable", reason="no CUDA device"),
        Row("openvino-int8", "int8", "not_judged", img_per_s=120.0, latency_ms=lat, cv=0.04, speedup_vs_eager=1.48,
            peak_mem_mb=300.0),
    ]  # fmt: skip
    return SimpleNamespace(rows=rows, config={"batch": 8, "height": 256, "width": 256, "inputs": "seeded"},
                           device={"name": "Intel(R) Xeon(R) Platinum 8480+", "type": "cpu"})  # fmt: skip


@pytest.mark.parametrize("width", [160, 100])
def test_bench_table_never_cuts_status_words_or_names_in_a_ci_log(width):
    from rich.console import Console

    from unet_export.cli.render import bench_table

    report = _realistic_bench_report()
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(bench_table(report))
    text = console.export_text()
    assert "…" not in text, text  # nothing cut: numbers fold, optional columns go
    for word in ("parity_failed", "unavailable", "not_judged", "int8-static", "precision", "status", "Dice vs"):
        assert word in text, (word, text)
    for row in report.rows:
        assert row.backend in text, (row.backend, text)


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


# --- issue 25, rough edge 10 (c): benchmarks/run.py when an export child exits 2 -----------------------------


def test_benchmark_script_passes_on_a_childs_exit_2_without_a_second_line(tmp_path, monkeypatch, capfd):
    """The child said its one line (bad input); the script adds none and exits 2 as the child did."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    spec = importlib.util.spec_from_file_location("bench_run_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def not_a_checkpoint(dest, seed=0):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"not a checkpoint")
        return dest

    monkeypatch.setattr(script, "HERE", tmp_path)
    monkeypatch.setattr(script, "write_random_checkpoint", not_a_checkpoint)
    monkeypatch.setattr(sys, "argv", ["run.py", "--device", "cpu"])
    monkeypatch.setenv("PYTHONPATH", str(path.parents[1]))
    with pytest.raises(SystemExit) as stop:
        script.main()
    err = capfd.readouterr().err
    assert stop.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "unet_full.pth" in err, err


# --- issue 25, rough edge 5: long steps say when they start and how long they took, off a terminal -----------


def test_a_long_step_prints_its_start_and_duration_in_a_ci_log(tmp_path):
    """CliRunner's stdout is no terminal, as a CI log is not: a spinner would show nothing there."""
    import re

    from unet_export.flows.demo import DEMO_WEIGHTS

    result = runner.invoke(app, ["torchscript", str(DEMO_WEIGHTS), "-w", str(tmp_path / "exports"), "--height", "32",
                                 "--width", "32", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "torchscript: scripting TorchScript and checking parity ...", result.stdout
    assert any(re.fullmatch(r"torchscript: done in \d+\.\d s", line) for line in lines[1:]), result.stdout
    assert result.stderr == ""


def test_a_long_step_that_fails_keeps_the_one_error_line_on_stderr(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["aoti", str(bad), "-w", str(tmp_path / "exports"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert result.stdout.splitlines()[0] == "aoti: compiling the AOTInductor package and checking parity ..."
    assert result.stdout.splitlines()[1].startswith("aoti: stopped after ")
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


# --- issue 25, rough edge 8: help texts (helper i25-help) --------------------------------------------------


def _every_command():
    """(app, argv prefix, click command) for every command and group of unet-export and unet-bench."""
    import typer

    from unet_export.cli.bench import app as bench_app

    def walk(cli_app, command, path):
        yield cli_app, path, command
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(cli_app, sub, [*path, name])

    for cli_app in (app, bench_app):
        yield from walk(cli_app, typer.main.get_command(cli_app), [])


def test_every_help_speaks_to_users_not_python_or_the_seeds():
    """predict --help read "(extra unet-export)" (Rich ate [ray]), `<list[Path]>` and `<list[str]>`
    leaked Python types, exporters said the checkpoint comes "from milesial/Pytorch-UNet or
    unet-export train" though nine architectures load, the train help spoke of "seed 003"."""
    import re

    seen = set()
    for cli_app, path, command in _every_command():
        result = runner.invoke(cli_app, [*path, "--help"], terminal_width=200, env={"COLUMNS": "1000"})
        assert result.exit_code == 0, (path, result.output)
        text = " ".join(result.stdout.replace("│", " ").split())
        where = " ".join(path) or "(top)"
        assert "<list[" not in text and "list[" not in text, where
        assert "(extra unet-export)" not in text, where
        assert not re.search(r"seed 00\d", text), where
        assert "Pytorch-UNet or unet-export train" not in text, where
        # Square brackets in a help text are words the user needs, not Rich markup to drop.
        for param in command.params:
            for bracketed in re.findall(r"\w[\w-]*\[[\w,-]+\]", getattr(param, "help", None) or ""):
                assert bracketed in text, (where, bracketed)
        seen.add(" ".join(path))
    assert {"", "onnx", "openvino", "predict", "data", "data synth", "serve", "triton"} <= seen  # groups too
    predict = _help("predict")
    assert "unet-export[ray]" in predict and "inputs... <path>" in predict
    onnx = _help("onnx")
    assert "--fp32-layers <pattern>" in onnx
    for name in ("milesial", "valid", "resnet50", "deeplabv3"):  # the architectures that load are named
        assert name in onnx, name


def test_model_descriptions_name_the_architecture_not_the_seed():
    from unet_export.models import MODELS

    for name, spec in MODELS.items():
        assert "seed" not in spec.description, (name, spec.description)
    assert "2015 U-Net" in MODELS["valid"].description and "unpadded" in MODELS["valid"].description


# --- issue 25, rough edge 9: a pickled whole model (helper i25-help) ---------------------------------------
# torch.save(model) pickles the model's classes by module path: these "projects" are packages on disk,
# importable only in a subprocess that puts them on its path, as in the project that made the file.

MILESIAL_PROJECT = {"unet/__init__.py": "from .unet_model import UNet\n",
                    "unet/unet_model.py": "from unet_export.models import milesial\n\n\nclass UNet(milesial.UNet):\n"
                                          "    pass\n"}  # fmt: skip
SMP_LIKE_PROJECT = {"segnet/__init__.py": "", "segnet/model.py": (
    "import torch.nn as nn\n\n\nclass FPNLike(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
    "        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())\n"
    "        self.segmentation_head = nn.Conv2d(8, 2, 1)\n\n    def forward(self, x):\n"
    "        return self.segmentation_head(self.encoder(x))\n")}  # fmt: skip


def _in_project(tmp_path, files: dict, code: str) -> None:
    import os
    import subprocess
    import sys

    project = tmp_path / "project"
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(project), os.getcwd()])}
    proc = subprocess.run([sys.executable, "-c", "import torch\n" + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_a_pickled_supported_model_is_told_to_resave_its_state_dict_and_that_then_exports(tmp_path):
    _in_project(tmp_path, MILESIAL_PROJECT, "from unet import UNet\ntorch.save(UNet(3, 2, width=8), 'whole.pth')")
    whole = tmp_path / "whole.pth"
    result = runner.invoke(app, ["onnx", str(whole), "-w", str(tmp_path / "exports"), "--device", "cpu"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    message = result.stderr
    assert "unet.unet_model.UNet" in message and "a milesial model" in message, message
    advice = "torch.save(model.state_dict(), 'weights.pth')"
    assert advice in message
    # The advice, followed literally in the project that made the file, leads to an export that passes.
    _in_project(tmp_path, MILESIAL_PROJECT, f"model = torch.load('whole.pth', weights_only=False)\n{advice}")
    result = runner.invoke(app, ["onnx", str(tmp_path / "weights.pth"), "-w", str(tmp_path / "exports"),
                                 "--height", "32", "--width", "32", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_pickled_model_of_an_unsupported_architecture_is_no_dead_end(tmp_path):
    from unet_export.models import MODELS

    _in_project(tmp_path, SMP_LIKE_PROJECT, "from segnet.model import FPNLike\ntorch.save(FPNLike(), 'whole.pth')")
    result = runner.invoke(app, ["onnx", str(tmp_path / "whole.pth"), "-w", str(tmp_path / "exports")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    message = result.stderr
    assert "segnet.model.FPNLike" in message and "not support" in message, message
    assert "re-saving its state_dict would not help" in message and "state_dict())" not in message
    assert all(name in message for name in MODELS)
    assert "encoder.0.weight" in message  # what its keys are, so the user sees why
    # and it is true: the state_dict, re-saved, is refused as an unknown architecture
    _in_project(tmp_path, SMP_LIKE_PROJECT, "m = torch.load('whole.pth', weights_only=False)\n"
                                            "torch.save(m.state_dict(), 'weights.pth')")  # fmt: skip
    resaved = runner.invoke(app, ["onnx", str(tmp_path / "weights.pth"), "-w", str(tmp_path / "exports")])
    assert resaved.exit_code == 2 and "not a checkpoint of a known architecture" in resaved.stderr


def test_reading_a_pickled_model_imports_and_runs_none_of_it(tmp_path):
    """The class names and shapes come from the pickle's opcodes: the module that would be imported
    to unpickle it leaves a mark when imported, and it is on the path here."""
    import sys

    from unet_export.pickled import read_pickled_model

    files = dict(SMP_LIKE_PROJECT)
    files["segnet/model.py"] = "import pathlib\npathlib.Path('imported').write_text('x')\n" + files["segnet/model.py"]
    _in_project(tmp_path, files, "from segnet.model import FPNLike\ntorch.save(FPNLike(), 'whole.pth')")
    (tmp_path / "imported").unlink()
    sys.path.insert(0, str(tmp_path / "project"))
    try:
        found = read_pickled_model(tmp_path / "whole.pth", "zip", "whole")
    finally:
        sys.path.remove(str(tmp_path / "project"))
    assert "segnet" not in sys.modules and not (tmp_path / "imported").exists()
    assert found.cls == "segnet.model.FPNLike" and found.complete
    assert found.shapes["encoder.0.weight"] == (8, 3, 3, 3) and found.shapes["encoder.1.num_batches_tracked"] == ()
    assert list(found.shapes)[-1] == "segmentation_head.bias"


# --- issue 25, rough edge 10 (a): setuptools' "Editable installation" box on every venv build ----------------


def test_the_venv_build_drops_setuptools_editable_installation_box(tmp_path):
    """scripts/venv.sh installs the project editable; setuptools' build prints a 10-line box that
    reached every fresh `make demo`/.ci/run log. The filter venv.sh passes drops that message, and
    only it: the same build without it prints the box (so the check can fail)."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = (root / "scripts" / "venv.sh").read_text()
    quiet = re.search(r'^QUIET_EDITABLE="([^"]+)"', script, flags=re.M).group(1)
    assert 'PYTHONWARNINGS="$QUIET_EDITABLE"' in script and "-e ." in script
    project = tmp_path / "project"
    (project / "unet_export").mkdir(parents=True)
    shutil.copy(root / "pyproject.toml", project)
    shutil.copy(root / "unet_export" / "__init__.py", project / "unet_export")
    build = "from setuptools import build_meta; build_meta.build_editable(%r)"

    def stderr_of_a_build(extra_env: dict) -> str:
        out = tmp_path / f"wheel{len(extra_env)}"
        out.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | extra_env
        proc = subprocess.run([sys.executable, "-c", build % str(out)], cwd=project, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stderr

    assert "Editable installation" in stderr_of_a_build({})
    assert "Editable installation" not in stderr_of_a_build({"PYTHONWARNINGS": quiet})



FILTERED = """import os, sys, time
from unet_export.predict.stderr_filter import RAY_ACTOR_RESTART_WARNING, dropping_stderr_lines
ray_line = (b"[2026-12-06 09:43:19,950 E 11329 11329] core_worker.cc:2465: Actor with class name: "
            b"'MapWorker(MapBatches(_InferActor))' and ID: '748a' has constructor arguments in the object store "
            b"and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
            b"restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.\\n")
with dropping_stderr_lines(RAY_ACTOR_RESTART_WARNING):
    os.write(2, b"before\\n" + ray_line)
    print("from python", file=sys.stderr)
    os.write(2, b"[2026-12-06 09:43:20,000 E 1 1] core_worker.cc:99: another Ray error\\n")
    for i in range(20000):  # more than a pipe holds: the copier must keep up, nothing blocks
        os.write(2, b"line %d\\n" % i)
    os.write(2, ray_line[:40])  # a line split across two writes
    os.write(2, ray_line[40:])
    os.write(2, b"no newline")
os.write(2, b"|after\\n")
"""


def test_the_stderr_filter_drops_rays_actor_restart_line_and_keeps_every_other_line():
    """Issue 25, rough edge 10 (b): Ray's C++ core worker writes this line straight to fd 2 on
    every `predict --ray` (ray-project/ray#57733); tests/predict/test_predict_ray.py checks the real run."""
    result = subprocess.run([sys.executable, "-c", FILTERED], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = (b"before\nfrom python\n[2026-12-06 09:43:20,000 E 1 1] core_worker.cc:99: another Ray error\n"
                + b"".join(b"line %d\n" % i for i in range(20000)) + b"no newline|after\n")  # fmt: skip
    assert result.stderr == expected
