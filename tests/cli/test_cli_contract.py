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

import unet_export.cli.export as cli_export
from unet_export.cli.main import app
from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS
from unet_export.runtimes.openvino.runner import openvino_cpu_bf16
from unet_export.fileio import write_json
from unet_export.workdir.manifest import load_manifest

runner = CliRunner()
UNET_EXPORT = [sys.executable, "-m", "unet_export"]
UNET_BENCH = [sys.executable, "-c", "from unet_export.cli.bench import main; main()"]


@pytest.mark.parametrize("tool, args, expected", [
    (UNET_EXPORT, ["onnx"], "Missing argument 'weights'"),
    (UNET_EXPORT, ["onnx", "w.pth", "--height", "abc"], "Invalid value for '--height'"),
    (UNET_EXPORT, ["nosuch"], "No such command 'nosuch'"),
    (UNET_BENCH, ["--batch", "x"], "Invalid value for '--batch'"),
    (UNET_BENCH, ["--compile-mode", "fast"], "choose one of default"),
    (UNET_BENCH, ["--mode", "fast"], "--mode 'fast': choose one of latency, throughput, both"),
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

    monkeypatch.setattr(cli_export, "export_artifact", broken)
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
    for name in ("eager-bf16", "openvino-bf16") if openvino_cpu_bf16() else ("eager-bf16",):
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


# Issue 15: a rough edge a new user hit, reproduced before it was fixed (was tests/test_rough_edges.py).


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


def test_long_steps_show_a_status_on_a_terminal(monkeypatch, tmp_path):
    from unet_export.cli import common, export
    from unet_export.errors import UserError

    shown = []
    monkeypatch.setattr(common.console, "_force_terminal", True)  # as on a terminal: a CI log gets plain lines
    monkeypatch.setattr(common.console, "status", lambda what, **kw: (shown.append(what), _Null())[1])

    def stop(*args, **kwargs):
        raise UserError("stopped here")

    monkeypatch.setattr(export, "export_artifact", stop)
    result = runner.invoke(app, ["aoti", str(tmp_path / "w.pth"), "-w", str(tmp_path / "x")])
    assert result.exit_code == 2 and shown == ["compiling the AOTInductor package and checking parity..."]
    assert "aoti:" not in result.stdout  # the spinner instead of the plain lines


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# Issue 25 (helper i25a): a closed pipe, --version, counts in the singular, failures on stderr
# (was tests/test_rough_edges.py).


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
    from unet_export.cli.render_verify import dice_table
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


# Issue 25, rough edge 5: long steps say when they start and how long they took, off a terminal
# (was tests/test_rough_edges.py).


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


# Issue 25, rough edge 8: help texts (helper i25-help; was tests/test_rough_edges.py).


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
