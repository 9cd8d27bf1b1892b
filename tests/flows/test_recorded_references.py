"""Recorded references (issue 27): an artefact of a model the deployment host cannot rebuild (an
smp model where smp is not installed) is judged against the float64 outputs recorded when it was
published, never skipped. "smp is missing" is simulated in-process: sys.modules maps it to None,
so importing it raises ImportError exactly as on a host without it."""

import hashlib
import io
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from unet_export.cli.main import app
from unet_export.errors import EagerUnavailable, UserError
from unet_export.runtimes.recorded import RecordedRunner, References, sample_key

runner = CliRunner()
DEMO_IMAGES = "unet_export/assets/demo_val"
SMP = "segmentation_models_pytorch"


@pytest.fixture(scope="module")
def smp_workdir(tmp_path_factory):
    """A tiny smp Unet (random weights, randomised BatchNorm statistics) saved with save_pretrained,
    exported to ONNX at 64x64 and to FP16 ONNX judged on the demo's real images (random weights:
    near ties, so its Dice gate is loosened)."""
    smp = pytest.importorskip(SMP)
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("recorded")
    torch.manual_seed(0)
    net = smp.Unet("resnet18", encoder_weights=None, classes=2)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    net.save_pretrained(root / "unet")
    workdir = root / "exports"
    common = ["--workdir", str(workdir), "--device", "cpu"]
    result = runner.invoke(app, ["onnx", str(root / "unet"), "--height", "64", "--width", "64", "--fp16",
                                 "--data", DEMO_IMAGES, "--min-dice", "0.99", *common])  # fmt: skip
    assert result.exit_code == 0, result.output
    mp.undo()
    return workdir


@pytest.fixture
def copied(smp_workdir, tmp_path):
    return shutil.copytree(smp_workdir, tmp_path / "exports")


@pytest.fixture
def no_smp(monkeypatch):
    """The deployment host without smp."""
    monkeypatch.setitem(sys.modules, SMP, None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def manifest(workdir):
    return json.loads((workdir / "manifest.json").read_text())


def save(workdir, data):
    (workdir / "manifest.json").write_text(json.dumps(data))


def verify(workdir, *extra):
    return runner.invoke(app, ["verify", "--workdir", str(workdir), "--device", "cpu", *extra])


def test_publishing_records_the_references_of_the_gate_inputs(smp_workdir):
    record = manifest(smp_workdir)["model"]["references"]
    path = smp_workdir / record["path"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    # one file per model: the FP16 export merged its images into the ONNX export's file
    assert sorted(p.name for p in smp_workdir.glob("references.*.npz")) == [record["path"]]
    seeded = [r for r in record["inputs"] if r["source"] == "seeded"]
    # the envelope's probes of a 64x64 export (batch 1-8, sides 64-96): export size, largest, tall,
    # wide, non-square, largest batch
    probes = [[1, 3, 64, 64], [1, 3, 96, 96], [1, 3, 96, 64], [1, 3, 64, 96], [1, 3, 65, 81], [8, 3, 64, 64]]
    assert [r["shape"] for r in seeded] == probes and all(r["seed"] == 0 for r in seeded)
    images = [r for r in record["inputs"] if r["source"] == "images"]
    assert sum(len(r["samples"]) for r in images) == 8 and images[0]["names"][0] == "synth_0000.png"
    # only the named real-image batch the FP16 gate ran at the images' own size, not its crops to the probes
    assert [r["shape"] for r in images] == [[8, 3, 128, 128]] and len(images[0]["names"]) == 8
    # exactly the seeded inputs the gate ran: their hashes are those of seeded_inputs(shapes, 0)
    from unet_export.parity.gate import seeded_inputs

    xs = seeded_inputs([tuple(s) for s in probes], 0)
    assert [r["samples"] for r in seeded] == [[sample_key(s) for s in x] for x in xs]
    with np.load(path, allow_pickle=False) as npz:
        assert npz[f"fp64_{seeded[0]['samples'][0]}"].dtype == np.float64
        assert npz[f"fp32_{seeded[0]['samples'][0]}"].shape == (2, 64, 64)
        assert str(npz["checkpoint"]) == manifest(smp_workdir)["model"]["checkpoint"]["sha256"]


def test_the_manifest_checkpoint_without_smp_is_eager_unavailable(smp_workdir, no_smp):
    from unet_export.workdir.lookup import manifest_checkpoint

    with pytest.raises(EagerUnavailable, match=r'unet-export\[smp\]'):
        manifest_checkpoint(manifest(smp_workdir))


def test_verify_without_smp_judges_against_the_recorded_references(copied, no_smp, tmp_path):
    result = verify(copied, "--data", DEMO_IMAGES, "--json", str(tmp_path / "v.json"))
    assert result.exit_code == 0, result.output
    assert "judged against recorded float64 references (eager not rebuilt: segmentation_models_pytorch is not" \
        in " ".join(result.output.split())
    doc = json.loads((tmp_path / "v.json").read_text())
    assert [(a["precision"], a["status"]) for a in doc["artifacts"]] == [("fp32", "verified"), ("fp16", "verified")]
    assert all(a["reason"].startswith("judged against recorded float64 references") for a in doc["artifacts"])
    fp16 = doc["artifacts"][1]["parity"]["cases"]
    assert fp16 and all(case["label"] == "images" for case in fp16)  # judged on the recorded real images


def test_a_damaged_onnx_fails_against_the_recorded_references(copied, no_smp):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    path = copied / "unet.onnx"
    model = onnx.load(str(path))
    head = next(t for t in model.graph.initializer if "segmentation_head" in t.name and t.name.endswith("weight"))
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 1.01, head.name))
    onnx.save(model, str(path))
    data = manifest(copied)  # as if it had been exported so: only the gate can tell
    entry = next(e for e in data["artifacts"] if e["path"] == "unet.onnx")
    entry["sha256"], entry["bytes"] = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size
    save(copied, data)
    result = verify(copied)
    assert result.exit_code == 1, result.output
    assert "failed" in result.output and "max error vs float64" in result.output


def test_an_edited_references_file_is_exit_2(copied, no_smp):
    path = copied / manifest(copied)["model"]["references"]["path"]
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    for name in arrays:
        if name.startswith("fp"):
            arrays[name] = arrays[name] * 1.01  # references edited to fit a damaged artefact
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    result = verify(copied)
    assert result.exit_code == 2, result.output
    assert "changed since it was recorded" in result.output


@pytest.mark.parametrize("where", ["../references.npz", "/etc/passwd", "sub/references.npz"])
def test_a_references_path_outside_the_workdir_is_exit_2(copied, no_smp, where):
    data = manifest(copied)
    shutil.copy(copied / data["model"]["references"]["path"], copied.parent / "references.npz")
    data["model"]["references"]["path"] = where
    save(copied, data)
    result = verify(copied)
    assert result.exit_code == 2, result.output
    assert "not {path: a file name inside the workdir" in " ".join(result.output.split())


def test_a_references_link_out_of_the_workdir_is_exit_2(copied, no_smp):
    data = manifest(copied)
    name = data["model"]["references"]["path"]
    shutil.move(copied / name, copied.parent / name)
    (copied / name).symlink_to(copied.parent / name)
    result = verify(copied)
    assert result.exit_code == 2, result.output
    assert "outside the workdir" in " ".join(result.output.split())


def test_no_recorded_references_is_exit_2_not_a_skip(copied, no_smp):
    data = manifest(copied)
    del data["model"]["references"]
    save(copied, data)
    result = verify(copied)
    assert result.exit_code == 2, result.output
    assert "records no float64 reference outputs" in " ".join(result.output.split())


def test_inputs_without_references_are_unreferenced_exit_2(copied, no_smp, tmp_path):
    """A reduced-precision artefact judged on images that were not recorded, and an FP32 one on
    seeded inputs of another seed (through the API), cannot be judged: exit 2, nothing recorded."""
    from PIL import Image

    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.full((64, 64, 3), 77, np.uint8)).save(other / "grey.png")
    before = manifest(copied)
    result = verify(copied, "--data", str(other))
    assert result.exit_code == 2, result.output
    assert "unreferenced" in result.output and "no recorded float64 references for the real images" in \
        " ".join(result.output.split())
    assert manifest(copied)["artifacts"][1] == before["artifacts"][1]  # the FP16 one: no verdict recorded
    from unet_export.flows.verify import verify_workdir

    report = verify_workdir(copied, device="cpu", seed=1)
    assert report.exit_code == 2
    assert report.verdicts[0].status == "unreferenced" and "its seeded inputs" in report.verdicts[0].reason


def test_verify_with_smp_still_rebuilds_eager(copied):
    pytest.importorskip(SMP)
    result = verify(copied, "--data", DEMO_IMAGES)
    assert result.exit_code == 0, result.output
    assert "recorded float64 references" not in result.output


def test_a_milesial_export_records_no_references(make_checkpoint, tmp_path):
    """A model the keys name is always rebuildable: nothing recorded, the workdir as before."""
    weights = make_checkpoint("v3")
    result = runner.invoke(app, ["onnx", str(weights), "--workdir", str(tmp_path / "ex"), "--height", "32",
                                 "--width", "32", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "references" not in manifest(tmp_path / "ex")["model"]
    assert not list((tmp_path / "ex").glob("references*"))


def _references(outputs: dict) -> References:
    arrays = {"checkpoint": np.array("abc")}
    for x, y in outputs.items():
        for sample, out in zip(x, y):
            arrays[f"fp32_{sample_key(sample)}"] = out.float().numpy()
            arrays[f"fp64_{sample_key(sample)}"] = out.double().numpy()
    return References(arrays, "test.npz")


def test_the_recorded_runner_keeps_the_runner_contract(tmp_path):
    """The Runner promises (tests/runtimes/test_runner_contract.py) for RecordedRunner, and its own:
    it answers a recorded input in fp32 or float64, sample by sample, and refuses any other."""
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    refs = _references({x: y})
    path = tmp_path / "refs.npz"
    np.savez_compressed(path, **{f"{p}_{k}": a for p, table in refs.outputs.items() for k, a in table.items()},
                        checkpoint=np.array("abc"))  # fmt: skip
    for source in (refs, path):
        fp32 = RecordedRunner(source, "fp32")
        assert not fp32.is_active and fp32.references is None  # construction loads nothing
        with pytest.raises(RuntimeError, match="activate"):
            fp32.infer(x)
        with fp32 as active, RecordedRunner(source, "fp64") as fp64:
            assert active is fp32 and fp32.activate() is fp32
            out = fp32.infer(x)
            assert out.dtype == torch.float32 and out.device == fp32.device
            torch.testing.assert_close(out, y.float())
            assert torch.equal(fp64.infer(x), y)  # the exact answer, not rounded
            assert torch.equal(fp64.infer(x[1:]), y[1:])  # any batch of recorded samples
            assert isinstance(fp32.describe(), str) and fp32.describe()
            with pytest.raises(UserError, match="no recorded eager fp32 output"):
                fp32.infer(x + 1e-6)
        assert not fp32.is_active
        fp32.deactivate()
    with pytest.raises(UserError, match="changed since it was recorded"):
        RecordedRunner(path, "fp32", sha256="0" * 64).activate()
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(UserError, match="not a readable references file"):
        RecordedRunner(tmp_path / "bad.npz").activate()


def test_an_openvino_ir_reuses_the_models_references(smp_workdir, copied, monkeypatch):
    """Its gate runs the ONNX model's seeded inputs: the model's file already holds them (same
    content, same name), and verify without smp judges the IR against them too."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = manifest(copied)["model"]["references"]
    result = runner.invoke(app, ["openvino", str(smp_workdir.parent / "unet"), "--workdir", str(copied),
                                 "--height", "64", "--width", "64", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert manifest(copied)["model"]["references"] == before
    monkeypatch.setitem(sys.modules, SMP, None)
    result = verify(copied)
    assert result.exit_code == 0, result.output
    assert "openvino" in result.output and "recorded float64 references" in result.output
