"""The envelope (issue 28): what an artefact declares, the shapes that prove it, the shapes it
refuses, batch invariance, the manifest record, verify re-proving it on another host, and the
damages the old two-shape gate passed: an ONNX graph wrong only above a height inside the declared
range, or only for a batch larger than 2 (it checked 1 and 2). Each must fail with exit 1 and name
the shape."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from benchmarks.damage import damage_when
from unet_export.cli.main import app
from unet_export.errors import UserError
from unet_export.fileio import sha256_file
from unet_export.flows.export import parity_shapes
from unet_export.models.sizes import SizeRule
from unet_export.parity.envelope import Envelope, declared, parse_size, record
from unet_export.parity.gate import FP32, TOLERANCES, check_parity
from unet_export.runtimes import EagerRunner, Runner
from unet_export.workdir.manifest import load_manifest, transaction

runner = CliRunner()
SIZE = 64  # export size: the default envelope is then 64..96 per side, batch 1..8


# --- what is declared and which shapes prove it ---------------------------------------------------


def test_default_envelope_is_the_export_size_to_one_and_a_half_times_it_and_batch_8():
    env = declared(SizeRule(), 3, (256, 256))
    assert env.describe() == "batch 1-8, height 256-384, width 256-384"
    assert [(p.label, p.shape) for p in env.probes((256, 256))] == [
        ("export size", (1, 3, 256, 256)), ("largest", (1, 3, 384, 384)), ("tall", (1, 3, 384, 256)),
        ("wide", (1, 3, 256, 384)), ("non-square", (1, 3, 257, 321)), ("largest batch", (8, 3, 256, 256))]  # fmt: skip
    assert [(p.label, p.shape) for p in env.refusals()] == [("height just over", (1, 3, 385, 256)),
                                                           ("batch just over", (9, 3, 256, 256))]  # fmt: skip


def test_the_size_rule_shapes_every_probe_and_declared_bounds():
    env = declared(SizeRule(multiple=16), 3, (256, 320), max_batch=4, min_size=(64, 64), max_size=(500, 700))
    assert env.describe() == "batch 1-4, height 64-496, width 64-688; sides a multiple of 16, at least 16"
    shapes = [p.shape for p in env.probes((256, 320))]
    assert all(h % 16 == 0 and w % 16 == 0 for _, _, h, w in shapes)
    assert (1, 3, 496, 688) in shapes and (4, 3, 64, 64) in shapes and (1, 3, 80, 384) in shapes  # non-square: 65, 377 up
    unpadded = declared(SizeRule(min=188, multiple=16, offset=124, shrink=184), 1, (572, 572))
    assert all((h - 124) % 16 == 0 for _, _, h, _ in (p.shape for p in unpadded.probes((572, 572))))


def test_static_artefacts_declare_their_one_shape_and_are_checked_there_alone():
    env = declared(SizeRule(), 3, (64, 96), static_shape=(1, 3, 64, 96))
    assert [p.shape for p in env.probes((64, 96))] == [(1, 3, 64, 96)]
    assert parity_shapes(SizeRule(), 3, 64, 96, True) == [(1, 3, 64, 96)]
    assert [p.shape for p in env.refusals()] == [(1, 3, 65, 96), (2, 3, 64, 96)]


def test_a_shape_outside_is_refused_in_one_line_with_the_nearest_accepted_sizes():
    env = declared(SizeRule(multiple=16), 3, (256, 256))
    with pytest.raises(UserError) as err:
        env.check(1, 250, 400)
    message = str(err.value)
    assert message == ("input 1x3x250x400 is outside the proven envelope (batch 1-8, height 256-384, width 256-384; "
                       "sides a multiple of 16, at least 16): use height 256, width 384")  # fmt: skip
    with pytest.raises(UserError, match=r"use batch 8$"):
        env.check(9, 256, 256)
    env.check(8, 384, 256)  # a corner is inside
    with pytest.raises(UserError, match="use height 272 or 288$"):
        env.check(1, 280, 256)  # inside the range, off the rule


@pytest.mark.parametrize("smallest, largest, why", [
    ((300, 300), None, "does not hold the export height 256"),
    (None, (200, 400), "does not hold the export height 256"),
])  # fmt: skip
def test_declared_bounds_must_hold_the_export_size(smallest, largest, why):
    with pytest.raises(UserError, match=why):
        declared(SizeRule(), 3, (256, 256), min_size=smallest, max_size=largest)


def test_bad_options_are_one_line_errors():
    assert parse_size("512x768") == (512, 768) and parse_size("96") == (96, 96)
    for bad in ("", "0x5", "3x3x3", "ax5", "-1"):
        with pytest.raises(UserError, match="not HxW"):
            parse_size(bad)
    with pytest.raises(UserError, match="--max-batch must be at least 1"):
        declared(SizeRule(), 3, (64, 64), max_batch=0)


def test_the_record_round_trips_and_every_refusal_is_a_refusal():
    env = declared(SizeRule(), 3, (64, 64), max_batch=3)
    assert Envelope.from_dict(json.loads(json.dumps(env.to_dict()))) == env


# --- batch invariance ---------------------------------------------------------------------------


class BatchDependent(Runner):
    """The eager model, except that a batch of more than one image comes out shifted: what the
    second item of a Triton batch being wrong looks like from outside."""

    name = "batch-dependent"

    def __init__(self, net, shift: float):
        super().__init__("cpu")
        self.net, self.shift = net, shift

    def _activate_impl(self):
        pass

    def _infer_impl(self, x):
        with torch.no_grad():
            out = self.net(x)
        if x.shape[0] > 1:  # class 0's logit moved: a large shift changes the class of most pixels
            out = out.clone()
            out[:, 0] += self.shift
        return out


def test_a_batch_that_differs_from_its_images_alone_fails_and_says_so(tmp_path):
    from unet_export.flows.demo import random_milesial

    net = random_milesial(0, width=8).eval()
    inputs = [torch.rand(1, 3, 32, 32), torch.rand(3, 3, 32, 32)]
    with BatchDependent(net, 1e-3) as bad, EagerRunner(net, "cpu") as eager:
        report = check_parity(bad, eager, inputs, FP32, probes=["export size", "largest batch"])
    single, batch = report.cases
    assert single.passed and single.alone is None  # batch 1: nothing to compare
    assert not batch.passed and not batch.alone["passed"] and batch.alone["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert any("(3, 3, 32, 32) (largest batch): batch 3 differs from each image run alone" in f for f in report.failures())
    with EagerRunner(net, "cpu") as good, EagerRunner(net, "cpu") as eager:
        report = check_parity(good, eager, inputs, FP32)
    alone = report.cases[1].alone  # eager's own batch and single runs round differently, within the bound
    assert report.passed and alone["passed"] and alone["class_change"] == 0.0
    assert 0 <= alone["max_abs_diff"] <= alone["allowed"] == report.cases[1].atol
    reduced = TOLERANCES["fp16"]
    with BatchDependent(net, 10.0) as bad, EagerRunner(net, "cpu") as eager:  # most pixels become class 0
        report = check_parity(bad, eager, [torch.rand(2, 3, 32, 32)], reduced)
    assert report.cases[0].alone["class_change"] > reduced.max_disagreement
    assert any("change class (allowed" in f and "run alone" in f for f in report.failures())


# --- the export and verify commands ------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from unet_export.flows.demo import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("env") / "unet.pth", seed=0, width=8)


def _export(weights, workdir, *extra) -> object:
    return runner.invoke(app, ["onnx", str(weights), "-w", str(workdir), "--height", str(SIZE), "--width", str(SIZE),
                               "--device", "cpu", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def proven(weights, tmp_path_factory):
    """A workdir whose ONNX model passed its envelope (exported once per module)."""
    workdir = tmp_path_factory.mktemp("proven") / "exports"
    result = _export(weights, workdir, "--json", str(workdir.parent / "export.json"))
    assert result.exit_code == 0, result.output
    return workdir, result.output


def test_export_proves_and_records_the_envelope(proven):
    workdir, output = proven
    entry = load_manifest(workdir)["artifacts"][0]
    record = entry["envelope"]
    assert record["proven"] and record["describe"] == "batch 1-8, height 64-96, width 64-96"
    assert [(c["probe"], c["shape"]) for c in record["checked"]] == [
        ("export size", [1, 3, 64, 64]), ("largest", [1, 3, 96, 96]), ("tall", [1, 3, 96, 64]),
        ("wide", [1, 3, 64, 96]), ("non-square", [1, 3, 65, 81]), ("largest batch", [8, 3, 64, 64])]  # fmt: skip
    assert all(c["passed"] and c["floor_ratio"] < 5 for c in record["checked"])
    assert record["checked"][-1]["alone"]["passed"] and record["checked"][-1]["alone"]["max_abs_diff"] <= \
        record["checked"][-1]["alone"]["allowed"]  # fmt: skip
    assert [r["shape"] for r in record["refused"]] == [[1, 3, 97, 64], [9, 3, 64, 64]]
    assert all("outside the proven envelope" in r["message"] for r in record["refused"])
    assert "envelope: batch 1-8, height 64-96, width 64-96: proven at 6 shapes" in output
    assert "refuses 1x3x97x64 (height just over)" in output
    doc = json.loads((workdir.parent / "export.json").read_text())
    assert doc["artifacts"][0]["envelope"]["proven"] is True


def test_declared_options_reach_the_manifest(weights, tmp_path):
    result = _export(weights, tmp_path / "w", "--max-batch", "3", "--smallest", "48x32", "--largest", "80x128")
    assert result.exit_code == 0, result.output
    record = load_manifest(tmp_path / "w")["artifacts"][0]["envelope"]
    assert record["declared"]["boxes"] == [{"batch": [1, 3], "height": [48, 80], "width": [32, 128]}]
    assert [3, 3, 48, 32] in [c["shape"] for c in record["checked"]]
    bad = _export(weights, tmp_path / "bad", "--largest", "60")
    assert bad.exit_code == 2 and "does not hold the export height 64" in bad.output
    assert not (tmp_path / "bad" / "unet.onnx").exists()


def _damaging_writer(monkeypatch, tmp_path, **damage):
    """The ONNX writer, followed by an edit of the file it wrote (benchmarks/damage.py), on a copy
    of the registry's entry: the registry itself is left alone."""
    from dataclasses import replace

    from unet_export.runtimes.formats import FORMATS

    write = FORMATS["onnx"].write

    def damaged(net, staged, *args, **kwargs):
        io = write(net, staged, *args, **kwargs)
        damage_when(staged, tmp_path / "damaged.onnx", **damage)
        shutil.copy(tmp_path / "damaged.onnx", staged)
        return io

    monkeypatch.setitem(FORMATS, "onnx", replace(FORMATS["onnx"], write=damaged))


@pytest.mark.parametrize("damage, shape, probe", [
    (dict(axis=2, above=80), "(1, 3, 96, 96)", "largest"),  # wrong only above 80 rows (see benchmarks/envelope.py
    # for the demo's 256: above 300 rows, which the two-shape gate, at most 256 rows, passed)
    (dict(axis=0, above=2), "(8, 3, 64, 64)", "largest batch"),  # wrong only for batch > 2: it saw 1 and 2
])  # fmt: skip
def test_a_damage_only_inside_the_envelope_fails_with_exit_1_naming_the_shape(weights, tmp_path, monkeypatch, damage,
                                                                             shape, probe):  # fmt: skip
    _damaging_writer(monkeypatch, tmp_path, **damage)
    result = _export(weights, tmp_path / "w")
    assert result.exit_code == 1, result.output
    assert f"parity failed {shape} ({probe}): max error vs float64" in result.output
    assert "envelope: batch 1-8, height 64-96, width 64-96: not proven" in result.output
    entry = load_manifest(tmp_path / "w")["artifacts"][0]
    assert entry["status"] == "failed" and not entry["envelope"]["proven"]
    passed = [c for c in entry["envelope"]["checked"] if c["passed"]]
    assert [1, 3, 64, 64] in [c["shape"] for c in passed]  # the export size itself was fine


def test_verify_reproves_the_envelope_and_fails_a_damage_at_a_corner(proven, tmp_path):
    """The artefact replaced on the deployment host by one wrong only above 80 rows (its manifest
    updated to match, as a careless re-copy would): verify checks every probe again, exit 1."""
    workdir = shutil.copytree(proven[0], tmp_path / "exports")
    result = runner.invoke(app, ["verify", "-w", str(workdir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "envelope of unet.onnx: batch 1-8, height 64-96, width 64-96: proven here at 6 shapes" in result.output
    onnx_path = workdir / "unet.onnx"
    damage_when(onnx_path, tmp_path / "d.onnx", axis=2, above=80)
    shutil.copy(tmp_path / "d.onnx", onnx_path)
    with transaction(workdir) as manifest:
        manifest["artifacts"][0] |= {"sha256": sha256_file(onnx_path), "bytes": onnx_path.stat().st_size}
    result = runner.invoke(app, ["verify", "-w", str(workdir), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "(1, 3, 96, 96) (largest)" in result.output and "(1, 3, 96, 64) (tall)" in result.output
    entry = load_manifest(workdir)["artifacts"][0]
    assert entry["status"] == "failed" and entry["verified_on"]["envelope"]["proven"] is False
