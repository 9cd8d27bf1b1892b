"""`unet-export openvino`: the OpenVINO IR (.xml + .bin) from the verified ONNX model, its model
record in rt_info, both files recorded and checked, published together even across a crash, and
read by the runner registry, evaluate and the benchmark rows."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from unet_export.bench.run import benchmark
from unet_export.checkpoint import build_model, load_checkpoint
from unet_export.cli.main import app
from unet_export.flows.demo import DEMO_SIZE, DEMO_VAL, DEMO_WEIGHTS
from unet_export.errors import IntegrityError
from unet_export.flows.evaluate import evaluate
from unet_export.fileio import sha256_file
from unet_export.workdir.manifest import load_manifest, transaction
from unet_export.runtimes import EagerRunner
from unet_export.workdir.runners import artifact_runner

pytest.importorskip("openvino")
runner = CliRunner()
HEIGHT, WIDTH = DEMO_SIZE


def ir_entry(workdir, precision="fp32"):
    return next(
        a for a in load_manifest(workdir)["artifacts"] if a["format"] == "openvino" and a["precision"] == precision
    )


@pytest.fixture(scope="module")
def ir_workdir(exports, tmp_path_factory):
    """The demo model's ONNX model and FP32 IR, exported once through the CLI (this module's copy of
    the session's export)."""
    return exports.copy(tmp_path_factory.mktemp("ov") / "exports", DEMO_WEIGHTS, ("openvino",), HEIGHT, WIDTH)


def test_openvino_prints_both_artefacts_it_wrote(exports):
    """`unet-export openvino` on an empty workdir: the ONNX model it converts and the IR, with its .bin."""
    stdout = exports.run(DEMO_WEIGHTS, ("openvino",), HEIGHT, WIDTH).stdout
    assert "onnx fp32" in stdout and "openvino fp32" in stdout and "demo_unet.bin" in stdout


def decode(value: str):
    """Metadata values are strings, as in ONNX metadata_props: JSON, or plain (the architecture)."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def copy_of(workdir, tmp_path):
    dest = tmp_path / "exports"
    shutil.copytree(workdir, dest)
    return dest


def test_ir_is_verified_and_both_files_recorded(ir_workdir):
    entry = ir_entry(ir_workdir)
    assert entry["status"] == "verified" and entry["path"] == "demo_unet.xml" and entry["source"] == "demo_unet.onnx"
    assert entry["sha256"] == sha256_file(ir_workdir / "demo_unet.xml")
    weights = entry["weights"]
    assert weights["path"] == "demo_unet.bin" and "pending" not in weights
    assert weights["sha256"] == sha256_file(ir_workdir / "demo_unet.bin")
    assert weights["bytes"] == (ir_workdir / "demo_unet.bin").stat().st_size
    assert entry["ir_shapes"]["input"].startswith("[?,3,?,?")  # dynamic batch, height and width
    # the ONNX model's envelope, proven again on the IR (batch 1-8, sides 128-192)
    assert [c["shape"] for c in entry["parity"]["cases"]] == [
        [1, 3, HEIGHT, WIDTH], [1, 3, 192, 192], [1, 3, 192, 128], [1, 3, 128, 192], [1, 3, 129, 161], [8, 3, 128, 128]]
    source = next(a for a in load_manifest(ir_workdir)["artifacts"] if a["format"] == "onnx" and a["precision"] == "fp32")
    assert entry["envelope"]["proven"] and entry["envelope"]["declared"] == source["envelope"]["declared"]
    assert not [p for p in ir_workdir.iterdir() if ".tmp" in p.name or p.name.endswith(".pending")]


def test_ir_carries_the_model_record(ir_workdir):
    from unet_export.runtimes.openvino.export import read_metadata

    record = {k: decode(v) for k, v in read_metadata(ir_workdir / "demo_unet.xml").items()}
    ckpt = load_checkpoint(DEMO_WEIGHTS)
    assert record["architecture"] == "milesial" and record["config"] == ckpt.config
    assert record["mask_values"] == ckpt.mask_values and record["checkpoint"]["sha256"] == ckpt.sha256
    assert record["precision"] == "fp32" and record["export_size"] == [HEIGHT, WIDTH]


def test_ir_runs_any_batch_and_size(ir_workdir):
    x = torch.rand(3, 3, 96, 152, generator=torch.Generator().manual_seed(1))
    net = build_model(load_checkpoint(DEMO_WEIGHTS))
    with artifact_runner(ir_entry(ir_workdir), ir_workdir, "cpu") as ov, EagerRunner(net) as eager:
        assert torch.allclose(ov.infer(x), eager.infer(x), atol=1e-4)


def test_a_changed_or_missing_bin_is_refused(ir_workdir, tmp_path):
    out = copy_of(ir_workdir, tmp_path)
    data = bytearray((out / "demo_unet.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / "demo_unet.bin").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="demo_unet.bin .*changed since it was verified"):
        artifact_runner(ir_entry(out), out, "cpu")
    (out / "demo_unet.bin").unlink()
    with pytest.raises(IntegrityError, match="missing on disk"):
        artifact_runner(ir_entry(out), out, "cpu")
    with pytest.raises(IntegrityError, match="demo_unet.bin"):  # a benchmark row stops the run, as for any artefact
        benchmark(out, batch=1, backends=["openvino"], device="cpu", iters=1, warmup=0)


def test_killed_while_publishing_leaves_a_consistent_ir(ir_workdir, tmp_path):
    """Killed after the manifest names the new IR as pending, before either file is renamed: the
    next transaction renames the .xml, the next reader the parked .bin, and the IR is whole."""
    out = copy_of(ir_workdir, tmp_path)
    old = ir_entry(out)
    proc = subprocess.run([sys.executable, "-m", "unet_export", "openvino", str(DEMO_WEIGHTS), "-w", str(out), "--fp16"],
                          capture_output=True, text=True, timeout=300, check=False,
                          env=os.environ | {"UNET_EXPORT_KILL_AT": "before-rename"})  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    with transaction(out):  # any command's next transaction redoes the .xml rename
        pass
    entry = ir_entry(out, "fp16")
    assert entry["weights"].get("pending") and not (out / "demo_unet.fp16.bin").exists()
    x = torch.rand(1, 3, HEIGHT, WIDTH)
    with artifact_runner(entry, out, "cpu") as ov:  # the reader finishes the .bin and checks it
        ov.infer(x)
    entry = ir_entry(out, "fp16")
    assert "pending" not in entry["weights"] and entry["weights"]["sha256"] == sha256_file(out / "demo_unet.fp16.bin")
    assert ir_entry(out)["sha256"] == old["sha256"]  # the FP32 IR is untouched
    assert not [p for p in out.iterdir() if ".tmp" in p.name or p.name.endswith(".pending")]


def test_fp16_ir_has_half_the_weights_and_the_fp16_gate(ir_workdir, tmp_path):
    out = copy_of(ir_workdir, tmp_path)
    result = runner.invoke(app, ["openvino", str(DEMO_WEIGHTS), "-w", str(out), "--fp16"])
    assert result.exit_code == 0, result.output
    entry = ir_entry(out, "fp16")
    assert entry["path"] == "demo_unet.fp16.xml" and entry["weights_fp16"] and entry["parity"]["tolerance"] == "fp16"
    assert entry["weights"]["bytes"] < 0.6 * ir_entry(out)["weights"]["bytes"]
    assert ir_entry(out)["status"] == "verified"  # the FP32 IR stays beside it (keyed by precision)


def test_evaluate_and_bench_read_the_ir(ir_workdir):
    report = evaluate(DEMO_WEIGHTS, DEMO_VAL, ir_workdir, device="cpu")
    row = next(a for a in report["artifacts"] if a["format"] == "openvino")
    assert row["status"] == "ok" and abs(row["delta_vs_eager"]) < 1e-4
    bench = benchmark(ir_workdir, batch=2, backends=["openvino"], device="cpu", data=DEMO_VAL, iters=1, warmup=0)
    ov_row = bench.rows[-1]
    assert ov_row.status == "ok" and "IR" in ov_row.runs_on, ov_row


def test_bad_weights_exit_2_and_write_nothing(tmp_path):
    out = tmp_path / "exports"
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["openvino", str(tmp_path / "junk.pth"), "-w", str(out)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert not out.exists()


# Issue 25, rough edge 8: `openvino` lacked the parity options every other exporter takes.
def test_openvino_takes_the_gate_options_of_the_other_exporters(make_checkpoint, tmp_path):
    from unet_export.parity.gate import FP32

    weights = make_checkpoint("v3")
    args = ["openvino", str(weights), "-w", str(tmp_path), "--height", "32", "--width", "32", "--device", "cpu"]
    result = runner.invoke(app, args + ["--rtol", "12", "--atol", "2e-6"])
    assert result.exit_code == 0, result.output
    assert "12 x noise floor + 2e-06 x max(1, |logit|)" in result.stdout
    assert ir_entry(tmp_path)["parity"]["limits"] == {"name": "fp32", "rtol": 12.0, "atol": 2e-6,
                                                      "max_class_change": 0.0, "min_dice": None}  # fmt: skip
    onnx = next(a for a in load_manifest(tmp_path)["artifacts"] if a["format"] == "onnx")
    assert onnx["parity"]["limits"]["rtol"] == FP32.rtol  # the ONNX model it converts keeps `onnx`'s own gate
    failed = runner.invoke(app, args + ["--rtol", "0", "--atol", "0"])  # no error at all: the IR has some
    assert failed.exit_code == 1 and "would pass with --rtol" in failed.stdout, failed.output
    assert ir_entry(tmp_path)["status"] != "verified" and ir_entry(tmp_path)["parity"]["limits"]["rtol"] == 0
    for wrong, fix in ((["--min-dice", "0.9"], "add --fp16"), (["--fp16", "--rtol", "3"], "drop --fp16")):
        refused = runner.invoke(app, args + wrong)
        assert refused.exit_code == 2 and fix in refused.stderr and refused.stderr.count("\n") == 1, refused.output


def test_fp16_ir_records_the_reduced_precision_gate_it_was_given(ir_workdir, tmp_path):
    out = copy_of(ir_workdir, tmp_path)
    result = runner.invoke(app, ["openvino", str(DEMO_WEIGHTS), "-w", str(out), "--fp16", "--max-class-change", "0.25",
                                 "--min-dice", "0.5"])  # fmt: skip
    assert result.exit_code == 0, result.output
    limits = ir_entry(out, "fp16")["parity"]["limits"]
    assert limits["max_class_change"] == 0.25 and limits["min_dice"] == 0.5
