"""Any nn.Module (issue 27 item 2): a hand-written model no registry entry knows (tinynet.py),
exported through `--model-factory FILE.py:CALLABLE` and `MODULE:CALLABLE` and through the Python
API (model=net), with the same gate; its size rule and classes asked of the model; a workdir's
recorded factory imported only when the user names it again (a file unchanged, by sha256)."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image
import torch
from typer.testing import CliRunner

from tests.conftest import REPO
from tests.flows import tinynet
from tests.flows.test_datasets import one_line_error
from unet_export import api
from unet_export.cli.main import app
from unet_export.errors import EagerUnavailable, UserError
from unet_export.models import external
from unet_export.workdir.manifest import load_manifest

runner = CliRunner()
FACTORY = "tests/flows/tinynet.py:make"  # relative to the repository root, where these tests run


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def trained_like(net: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm statistics, as a trained model has (the factory's are 0 and 1)."""
    generator = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.pth"
    torch.save(trained_like(tinynet.make()).state_dict(), path)
    return path


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def export(weights: Path, workdir: Path, *extra: str, factory: str = FACTORY):
    return cli("onnx", weights, "-w", workdir, "--height", 64, "--width", 64, "--device", "cpu",
               "--model-factory", factory, *extra)  # fmt: skip


@pytest.fixture(scope="module")
def exported(weights, tmp_path_factory) -> Path:
    """`unet-export onnx tiny.pth --model-factory tests/flows/tinynet.py:make`, once: copy to change it."""
    workdir = tmp_path_factory.mktemp("factory") / "exports"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        result = export(weights, workdir)
    assert result.exit_code == 0, result.output
    return workdir


def test_a_factory_model_exports_verified_and_its_config_is_recorded(exported):
    manifest = load_manifest(exported)
    (entry,) = manifest["artifacts"]
    assert entry["status"] == "verified" and entry["path"] == "tiny.onnx"
    model = manifest["model"]
    assert model["architecture"] == "factory"
    source = REPO / "tests/flows/tinynet.py"
    assert model["config"] == {
        "factory": f"{source}:make", "factory_sha256": external.sha256_file(source), "kwargs": {},
        "n_channels": 3, "n_classes": 2, "sizes": {"min": 16, "multiple": 4, "offset": 0, "shrink": 0},
        "threshold": 0.0,
    }  # fmt: skip
    # Asked of the model: two poolings make it take multiples of 4, so every probe of the envelope is one.
    assert [case["shape"] for case in entry["parity"]["cases"]] == [
        [1, 3, 64, 64], [1, 3, 96, 96], [1, 3, 96, 64], [1, 3, 64, 96], [1, 3, 68, 84], [8, 3, 64, 64]]


def test_verify_rebuilds_the_model_with_the_same_factory(exported, tmp_path):
    workdir = shutil.copytree(exported, tmp_path / "exports")
    result = cli("verify", "-w", workdir, "--device", "cpu", "--model-factory", FACTORY)
    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout


def test_a_recorded_factory_is_never_imported_unless_the_command_names_it(exported, monkeypatch):
    """The manifest is untrusted: without --model-factory nothing it names is imported or run.
    (verify turns this EagerUnavailable into a verdict against recorded references: branch i27-ref.)"""
    imported = []
    monkeypatch.setattr(external, "load_factory", lambda factory: imported.append(factory))
    with pytest.raises(EagerUnavailable, match="pass --model-factory .*tinynet.py:make to rebuild the eager model"):
        api.manifest_checkpoint(load_manifest(exported))
    assert imported == []


def test_a_changed_factory_file_is_refused(exported, tmp_path):
    changed = tmp_path / "tinynet.py"
    changed.write_text((REPO / "tests/flows/tinynet.py").read_text() + "\n# edited since the export\n")
    result = cli("verify", "-w", shutil.copytree(exported, tmp_path / "exports"), "--model-factory", f"{changed}:make")
    one_line_error(result, "has changed since the artefacts were exported (sha256")


def test_another_callable_of_the_file_is_refused(exported, tmp_path):
    result = cli("verify", "-w", shutil.copytree(exported, tmp_path / "exports"), "--model-factory",
                 "tests/flows/tinynet.py:TinyNet")  # fmt: skip
    one_line_error(result, "the artefacts' model was built by make in the file")


def test_weights_that_do_not_fit_name_the_first_keys(tmp_path):
    state = {f"other.{key}": value for key, value in tinynet.make().state_dict().items()}
    torch.save(state, tmp_path / "other.pth")
    result = export(tmp_path / "other.pth", tmp_path / "exports")
    one_line_error(result, "does not fit the factory", "missing keys (stem.0.weight, stem.0.bias, stem.1.weight and",
                   "unexpected keys (other.stem.0.weight")  # fmt: skip
    assert not (tmp_path / "exports").exists()


@pytest.mark.parametrize(
    "factory, fragment",
    [
        ("tests/flows/missing.py:make", "no such file tests/flows/missing.py"),
        ("tests/flows/tinynet.py:nothing", "tinynet.py has no nothing"),
        ("tests/flows/tinynet.py:NOT_CALLABLE", "NOT_CALLABLE is not callable (int)"),
        ("tests/flows/tinynet.py:not_a_module", "returned a dict, not a torch.nn.Module"),
        ("no_such_package.mod:make", "importing no_such_package.mod failed: ModuleNotFoundError"),
        ("tinynet", "give MODULE:CALLABLE or path/to/file.py:CALLABLE"),
    ],
)
def test_a_factory_that_cannot_build_a_model_exits_2_with_one_line(weights, tmp_path, factory, fragment):
    one_line_error(export(weights, tmp_path / "exports", factory=factory), fragment)
    assert not (tmp_path / "exports").exists()


def test_factory_arguments_come_from_model_arg(tmp_path):
    torch.save(tinynet.make(classes=3, width=4).state_dict(), tmp_path / "three.pth")
    result = export(tmp_path / "three.pth", tmp_path / "exports", "--model-arg", "classes=3", "--model-arg", "width=4")
    assert result.exit_code == 0, result.output
    config = load_manifest(tmp_path / "exports")["model"]["config"]
    assert config["kwargs"] == {"classes": 3, "width": 4} and config["n_classes"] == 3


def test_the_size_flags_replace_the_probe_and_a_size_they_refuse_is_named(weights, tmp_path):
    result = export(weights, tmp_path / "exports", "--size-multiple", "8", "--min-size", "32")
    assert result.exit_code == 0, result.output
    assert load_manifest(tmp_path / "exports")["model"]["config"]["sizes"]["multiple"] == 8
    refused = cli("onnx", weights, "-w", tmp_path / "other", "--height", 62, "--width", 64, "--model-factory", FACTORY)
    one_line_error(refused, "height 62 does not fit this model (a multiple of 4, at least 16): use 60 or 64")
    assert not (tmp_path / "other").exists()


def test_size_flags_without_a_factory_are_refused(weights, tmp_path):
    result = cli("onnx", weights, "-w", tmp_path / "exports", "--min-size", "32")
    one_line_error(result, "--min-size applies to a --model-factory model")


def test_the_module_form_imports_from_the_current_folder(weights, tmp_path, monkeypatch):
    package = tmp_path / "mynets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(REPO / "tests/flows/tinynet.py", package / "tiny.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the import leaves nothing behind anyway
    result = export(weights, tmp_path / "exports", factory="mynets.tiny:make")
    assert result.exit_code == 0, result.output
    config = load_manifest(tmp_path / "exports")["model"]["config"]
    assert config["factory"] == "mynets.tiny:make" and config["factory_sha256"] is None
    assert str(tmp_path) not in sys.path
    again = cli("verify", "-w", tmp_path / "exports", "--device", "cpu", "--model-factory", "mynets.tiny:make")
    assert again.exit_code == 0, again.output
    other = cli("verify", "-w", tmp_path / "exports", "--model-factory", "mynets.tiny:TinyNet")
    one_line_error(other, "the artefacts' model was built by mynets.tiny:make")


def test_predict_with_the_factory_gives_the_masks_of_the_exported_model(weights, exported, tmp_path):
    from unet_export.flows.demo import DEMO_VAL

    # at 96x80: inside the envelope the 64x64 export proved (64-96 per side), padded up to 64 rows
    images = [tmp_path / f"{i}.png" for i in range(2)]
    for source, dest in zip(sorted((DEMO_VAL / "imgs").iterdir()), images):
        Image.open(source).convert("RGB").resize((80, 96)).save(dest)
    eager = cli("predict", weights, *images, "--out", tmp_path / "eager", "--device", "cpu", "--model-factory", FACTORY)
    assert eager.exit_code == 0 and "eager" in eager.stdout, eager.output
    onnx = cli("predict", exported, *images, "--out", tmp_path / "onnx", "--device", "cpu")
    assert onnx.exit_code == 0 and "onnxruntime" in onnx.stdout, onnx.output
    masks = sorted(p.name for p in (tmp_path / "eager").iterdir())
    assert len(masks) == 2 and masks == sorted(p.name for p in (tmp_path / "onnx").iterdir())
    for name in masks:
        assert (tmp_path / "eager" / name).read_bytes() == (tmp_path / "onnx" / name).read_bytes(), name


# --- the Python API ---------------------------------------------------------------------------


def test_an_in_memory_module_exports_through_the_same_gate(tmp_path):
    net = trained_like(tinynet.TinyNet(channels=1, classes=3))
    before = {key: value.clone() for key, value in net.state_dict().items()}
    net.train()
    spec = api.InputSpec(sizes=api.SizeRule(min=32, multiple=8))  # channels: the first convolution's
    result = api.export_artifact(None, "onnx", tmp_path / "exports", model=api.from_module(net, spec), height=64,
                                 width=64, device="cpu")  # fmt: skip
    assert result.passed and result.path.name == "tinynet.onnx"
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
    model = load_manifest(tmp_path / "exports")["model"]
    assert model["architecture"] == "module" and model["config"]["class"] == "tests.flows.tinynet.TinyNet"
    assert model["config"]["sizes"]["multiple"] == 8 and model["config"]["n_classes"] == 3
    assert model["checkpoint"] == {"path": "tinynet", "sha256": external.state_digest(net.state_dict())}
    (entry,) = load_manifest(tmp_path / "exports")["artifacts"]
    assert [case["shape"][:2] for case in entry["parity"]["cases"]] == [[1, 1]] * 5 + [[8, 1]]
    assert all(case["shape"][2] % 8 == 0 and case["shape"][3] % 8 == 0 for case in entry["parity"]["cases"])
    assert api.verify_workdir(tmp_path / "exports", model=api.from_module(net, spec), device="cpu").exit_code == 0
    # Without the module the eager model cannot be rebuilt: judged against the recorded references
    alone = api.verify_workdir(tmp_path / "exports", device="cpu")
    assert alone.exit_code == 0 and [v.status for v in alone.verdicts] == ["verified"]
    assert alone.verdicts[0].reason.startswith("judged against recorded float64 references (eager not rebuilt: ")
    assert "exported from an in-memory module" in alone.verdicts[0].reason
    with pytest.raises(UserError, match="not the checkpoint the artefacts were exported from"):
        api.verify_workdir(tmp_path / "exports", model=trained_like(tinynet.TinyNet(channels=1, classes=3)))


def test_a_plain_module_takes_the_default_input_spec(tmp_path):
    result = api.export_artifact(None, "onnx", tmp_path / "exports", model=tinynet.make(), height=64, width=64,
                                 device="cpu")  # fmt: skip
    assert result.passed
    config = load_manifest(tmp_path / "exports")["model"]["config"]
    assert config["n_channels"] == 3 and config["sizes"]["multiple"] == 4 and config["n_classes"] == 2


def test_no_checkpoint_and_no_module_is_refused(tmp_path):
    with pytest.raises(UserError, match="no checkpoint given"):
        api.export_artifact(None, "onnx", tmp_path / "exports")


def test_quantize_int8_takes_a_module_and_gates_it_on_real_images(tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    from unet_export.flows.demo import DEMO_SIZE, DEMO_VAL, DEMO_WEIGHTS, demo_calibration

    demo = api.load_checkpoint(DEMO_WEIGHTS)  # a trained model, as an nn.Module the registry has no hand in
    net = api.build_model(demo)
    spec = api.InputSpec(preprocess=demo.preprocess, mask_values=demo.mask_values)
    calib = tmp_path / "calib"
    calib.mkdir()
    for path in demo_calibration():
        shutil.copy(path, calib / path.name)
    height, width = DEMO_SIZE
    results = api.quantize_int8(None, calib, tmp_path / "exports", model=api.from_module(net, spec), val=DEMO_VAL,
                                engine="onnxruntime", height=height, width=width, device="cpu")  # fmt: skip
    assert [r.path.name for r in results] == ["unet.int8.onnx"] and results[0].passed
    entry = results[-1].entry
    assert entry["precision"] == "int8" and entry["accuracy"]["passed"] and entry["accuracy"]["images"] == 12
    assert json.loads(json.dumps(load_manifest(tmp_path / "exports")["model"]["mask_values"])) == [0, 128, 255]
