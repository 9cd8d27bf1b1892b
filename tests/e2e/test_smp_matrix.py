"""segmentation_models_pytorch models through the commands (issue 27): save_pretrained folders of
five architectures with random weights and randomised BatchNorm statistics, exported to ONNX,
OpenVINO IR and TorchScript (or its refusal) behind the float64 gate at two sizes each model's rule
accepts and refused at one it does not; the issue's three ways of saving a model; predict's masks
against smp's own eager argmax; verify, evaluate, unet-bench, triton and int8 on an smp workdir;
a one-class sigmoid head decided at 0.5.

Nothing may reach the network: HF_HUB_OFFLINE=1 and every socket connect made in this process is
recorded (and refused), and each test checks that none was.

The default tier is Unet/resnet34 at 64x64 and the cheap refusals; the rest of the matrix is slow.
"""

import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

smp = pytest.importorskip("segmentation_models_pytorch")

from unet_export.cli.bench import app as bench_app  # noqa: E402
from unet_export.cli.main import app  # noqa: E402
from unet_export.data.synth import make_synth  # noqa: E402
from unet_export.fileio import sha256_file  # noqa: E402
from unet_export.flows.demo import DEMO_VAL, demo_calibration  # noqa: E402
from unet_export.flows.export import parity_shapes  # noqa: E402
from unet_export.models.sizes import SizeRule  # noqa: E402
from unet_export.workdir.manifest import load_manifest  # noqa: E402

slow = pytest.mark.slow

# architecture -> (encoder, the size rule smp 0.6.0's model states: (min, multiple)). Unet
# interpolates its skips (any size from one output stride up); DeepLabV3+ is dilated to stride 16.
MODELS = {
    "Unet": ("resnet34", (32, 1)),
    "UnetPlusPlus": ("resnet18", (32, 32)),
    "FPN": ("mobilenet_v2", (32, 32)),
    "DeepLabV3Plus": ("resnet18", (16, 16)),
    "Segformer": ("mit_b0", (32, 32)),
}
CLASSES = 2
SIZES = {arch: [(64, 64), (96, 128)] for arch in MODELS} | {"Unet": [(64, 64), (96, 128), (70, 90)]}
# a height each rule refuses, and the sizes the refusal must offer
REFUSED = {arch: (80, "use 64 or 96") for arch in MODELS} | {"Unet": (16, "use 32"), "DeepLabV3Plus": (72, "use 64 or 80")}
FORMAT_NAMES = ("onnx", "openvino", "torchscript")
# make test: every architecture to ONNX at one size, and the other two formats once; the rest is slow.
# (Segformer/mit_b0 came out of the exporter fixed at batch 1 when traced at batch 1: the ONNX writer
# now traces at batch 2, and its row here is what proves it.)
DEFAULT_TIER = {(arch, "onnx", (64, 64)) for arch in MODELS} | {("Unet", "openvino", (64, 64)),
                                                                ("FPN", "torchscript", (64, 64))}

runner = CliRunner()


# --- no network ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def connects():
    """Every connect made in this process while the module runs (each one also refused)."""
    made = []
    real = socket.socket.connect

    def refused(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            made.append(address)
            raise OSError(f"test_smp_matrix: no network ({address})")
        return real(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refused)
        yield made


@pytest.fixture(autouse=True)
def offline(connects):
    yield
    assert connects == [], f"something tried the network: {connects}"


# --- models --------------------------------------------------------------------------------------


def randomised(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights (smp's init) and BatchNorm statistics far from (0, 1), as a trained model's are."""
    g = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=g) - 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) * 1.5 + 0.5)
    return net.eval()


def smp_model(arch: str, encoder: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomised(smp.create_model(arch, encoder_name=encoder, encoder_weights=None, **kw), seed)


@pytest.fixture(scope="module")
def pretrained(connects, tmp_path_factory) -> dict[str, Path]:
    """arch -> its save_pretrained folder (config.json + model.safetensors)."""
    root = tmp_path_factory.mktemp("smp")
    dirs = {}
    for arch, (encoder, _) in MODELS.items():
        smp_model(arch, encoder, classes=CLASSES).save_pretrained(root / arch)
        dirs[arch] = root / arch
    return dirs


def cli(*args, app=app):
    return runner.invoke(app, [str(a) for a in args])


def entry_of(workdir: Path, fmt: str) -> dict | None:
    return next((e for e in load_manifest(workdir)["artifacts"] if e["format"] == fmt and e["precision"] == "fp32"),
                None)  # fmt: skip


def files(workdir: Path) -> dict[str, str]:
    return {str(p.relative_to(workdir)): sha256_file(p) for p in sorted(workdir.rglob("*")) if p.is_file()}


@dataclass
class Run:
    workdir: Path
    exit_code: int
    output: str


class Exports:
    """Each (arch, formats, size) exported once per module; a format is exported into a copy of the
    workdir of the formats before it, as a user exporting one after the other gets (openvino
    converts the verified ONNX model)."""

    def __init__(self, root: Path, dirs: dict):
        self.root, self.dirs, self.runs = root, dirs, {}

    def run(self, arch: str, formats: tuple, height: int, width: int, *flags: str) -> Run:
        """``flags``: more export options (e.g. --largest), given to each format."""
        key = (arch, formats, height, width, flags)
        if key not in self.runs:
            before = self.run(arch, formats[:-1], height, width, *flags).workdir if len(formats) > 1 else None
            workdir = self.root / f"w{len(self.runs)}"  # named after the run before it is added
            if before:
                shutil.copytree(before, workdir)
            result = cli(formats[-1], self.dirs[arch], "-w", workdir, "--height", height, "--width", width,
                         "--device", "cpu", *flags)  # fmt: skip
            self.runs[key] = Run(workdir, result.exit_code, result.output)
        return self.runs[key]


@pytest.fixture(scope="module")
def exports(pretrained, tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("smp-exports"), pretrained)


def chain(fmt: str) -> tuple:
    return ("onnx", "openvino") if fmt == "openvino" else (fmt,)


# --- the matrix ----------------------------------------------------------------------------------


def _cases():
    for arch in MODELS:
        for fmt in FORMAT_NAMES:
            if (arch, fmt) == ("UnetPlusPlus", "torchscript"):
                continue  # its own test: scripted, traced or refused
            for size in SIZES[arch]:
                marks = [] if (arch, fmt, size) in DEFAULT_TIER else [slow]
                yield pytest.param(arch, fmt, size, id=f"{arch}-{fmt}-{size[0]}x{size[1]}", marks=marks)


@pytest.mark.parametrize("arch, fmt, size", list(_cases()))
def test_export_passes_the_float64_gate(exports, pretrained, arch, fmt, size):
    height, width = size
    run = exports.run(arch, chain(fmt), height, width)
    assert run.exit_code == 0, run.output
    entry = entry_of(run.workdir, fmt)
    assert entry["status"] == "verified" and entry["parity"]["passed"]
    assert entry["export_size"] == [height, width]
    encoder, (least, multiple) = MODELS[arch]
    rule = SizeRule(min=least, multiple=multiple)
    assert entry["size_rule"] == rule.to_dict() | {"static": False}
    cases = entry["parity"]["cases"]  # the envelope's probes on the model's own size rule
    assert [tuple(c["shape"]) for c in cases] == parity_shapes(rule, 3, height, width, False)
    assert all(h % multiple == 0 and w % multiple == 0 for *_, h, w in (c["shape"] for c in cases))
    assert all(c["reference"] == "float64" and c["passed"] for c in cases)
    assert sha256_file(run.workdir / entry["path"]) == entry["sha256"]
    model = load_manifest(run.workdir)["model"]
    assert model["architecture"] == "smp" and model["config"]["arch"] == arch
    assert model["config"]["init"]["encoder_name"] == encoder and model["config"]["init"]["encoder_weights"] is None
    assert model["config"]["sizes"] == rule.to_dict() and model["config"]["n_classes"] == CLASSES
    assert model["checkpoint"]["path"] == str(pretrained[arch].resolve())


def test_unetplusplus_torchscript_is_traced_at_the_export_size_and_says_so(pretrained, tmp_path):
    """smp marks UnetPlusPlus unscriptable: the export traces it at the export size, a static
    model gated at that one shape, and says why; never a dynamic model that is not."""
    workdir = tmp_path / "exports"
    result = cli("torchscript", pretrained["UnetPlusPlus"], "-w", workdir, "--height", 64, "--width", 64,
                 "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "torch.jit.script failed (" in result.output and "traced at 1x3x64x64" in result.output
    entry = entry_of(workdir, "torchscript")
    assert entry["status"] == "verified" and entry["size_rule"]["static"] is True
    assert entry["traced"].startswith("RuntimeError: ") and [c["shape"] for c in entry["parity"]["cases"]] == [[1, 3, 64, 64]]


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("arch", MODELS)
def test_a_size_the_model_refuses_publishes_nothing(exports, pretrained, tmp_path, arch, fmt):
    """Refused before anything is written, naming the nearest accepted sizes; a workdir holding a
    verified export is left byte for byte as it was. (openvino's --height/--width size the ONNX
    model it exports first, so it is asked in an empty workdir: a verified ONNX model there would
    be converted at its own size.)"""
    workdir = tmp_path / "exports"
    if fmt != "openvino":
        shutil.copytree(exports.run("Unet", ("onnx",), 64, 64).workdir, workdir)
    before = files(workdir) if workdir.exists() else None
    height, advice = REFUSED[arch]
    result = cli(fmt, pretrained[arch], "-w", workdir, "--height", height, "--width", 64, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert f"height {height}" in result.output and advice in result.output
    assert (files(workdir) if workdir.exists() else None) == before


# --- the three ways of saving a model ----------------------------------------------------


@pytest.fixture(scope="module")
def unet2(connects) -> torch.nn.Module:
    """smp.Unet('resnet34', classes=2) as the issue saves it."""
    return smp_model("Unet", "resnet34", seed=3, classes=2)


FLAGS = ("--arch", "Unet", "--encoder", "resnet34")


def _save_state(net, path):
    torch.save(net.state_dict(), path)


def _save_wrapped(net, path):
    torch.save({"model_state_dict": net.state_dict(), "epoch": 3}, path)


def _save_safetensors(net, path):
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(path))


SAVED = {"state_dict.pth": _save_state, "wrapped.pth": _save_wrapped, "state_dict.safetensors": _save_safetensors}


@pytest.mark.parametrize("name", SAVED)
def test_a_state_dict_with_arch_and_encoder_exports(unet2, tmp_path, name):
    """The weights reach the artefact: its logits are the saved model's (static 64x64, one case:
    how the file is read is what is tested here, the dynamic gate is the matrix's)."""
    ort = pytest.importorskip("onnxruntime")
    weights, workdir = tmp_path / name, tmp_path / "exports"
    SAVED[name](unet2, weights)
    result = cli("onnx", weights, *FLAGS, "-w", workdir, "--height", 64, "--width", 64, "--static", "--device", "cpu")
    assert result.exit_code == 0, result.output
    entry, model = entry_of(workdir, "onnx"), load_manifest(workdir)["model"]
    assert entry["status"] == "verified"
    assert model["config"]["arch"] == "Unet" and model["config"]["n_classes"] == 2
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = unet2(x).numpy()
    session = ort.InferenceSession(str(workdir / entry["path"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * max(1.0, float(np.abs(expected).max())))


def test_a_pickled_smp_model_is_told_to_save_pretrained(unet2, tmp_path):
    weights = tmp_path / "model.pth"
    torch.save(unet2, weights)
    result = cli("onnx", weights, "-w", tmp_path / "exports", "--height", 64, "--width", 64, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "save_pretrained" in result.output
    assert not (tmp_path / "exports").exists()


@pytest.mark.parametrize("flags, missing", [((), "pass --arch ARCH --encoder NAME"), (("--arch", "Unet"), "--encoder"),
                                            (("--encoder", "resnet34"), "--arch")])  # fmt: skip
def test_a_bare_state_dict_names_the_missing_flags(unet2, tmp_path, flags, missing):
    weights = tmp_path / "weights.pth"
    _save_state(unet2, weights)
    result = cli("onnx", weights, *flags, "-w", tmp_path / "exports", "--height", 64, "--width", 64)
    assert result.exit_code == 2, result.output
    assert missing in " ".join(result.output.split())
    assert not (tmp_path / "exports").exists()


# --- predict against smp's own eager model ---------------------------------------------------------


def eager_logits(net, image: np.ndarray, preprocess: dict, dtype=torch.float32) -> np.ndarray:
    """smp's documented route: preprocess_input(image in 0..1, mean, std), then the model."""
    from segmentation_models_pytorch.encoders._preprocessing import preprocess_input

    x = preprocess_input(image, mean=preprocess["mean"], std=preprocess["std"], input_range=[0, 1],
                         input_space="BGR" if preprocess.get("bgr") else "RGB")  # fmt: skip
    tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None])).to(dtype)
    with torch.no_grad():
        return net.to(dtype)(tensor)[0].numpy()


def test_predict_masks_from_onnx_equal_smps_eager_argmax(exports, pretrained, tmp_path):
    """On three of the demo's real-looking images (128x128, a size the ONNX model was not exported
    at: exported at 64x64 and proven up to 128x128, the default envelope being 64-96), with the
    mean/std the manifest recorded. A pixel may differ only where float64 itself puts the two
    classes within float32 noise of each other (a tie); none does here."""
    run = exports.run("Unet", ("onnx",), 64, 64, "--largest", "128x128")
    assert run.exit_code == 0, run.output
    workdir = run.workdir
    record = load_manifest(workdir)["model"]
    images = sorted((DEMO_VAL / "imgs").glob("*.png"))[:3]
    result = cli("predict", workdir / "Unet.onnx", *images, "--out", tmp_path / "masks")
    assert result.exit_code == 0, result.output
    net = smp.from_pretrained(str(pretrained["Unet"])).eval()
    for path in images:
        image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
        expected = eager_logits(net, image.astype(np.float32), record["preprocess"]).argmax(0)
        got = np.asarray(Image.open(tmp_path / "masks" / f"{path.stem}_mask.png"))
        assert got.shape == expected.shape
        exact = eager_logits(net, image, record["preprocess"], torch.float64)
        margin = np.abs(exact[1] - exact[0])
        ties = margin <= 1e-5 * max(1.0, float(np.abs(exact).max()))
        assert not np.any((got != expected) & ~ties), f"{path.name}: {np.sum(got != expected)} pixels differ"
        assert np.array_equal(got, expected), f"{path.name}: {np.sum(got != expected)} float64-tie pixels differ"
        assert 0 < expected.mean() < 1  # both classes present: a constant mask would prove nothing


def test_one_class_sigmoid_head_is_decided_at_one_half(connects, tmp_path):
    """smp.Unet(classes=1, activation='sigmoid') outputs probabilities: the manifest records
    threshold 0.5 and predict's mask is eager prob > 0.5 (at logit 0 every pixel would be class 1)."""
    net = smp_model("Unet", "resnet18", seed=5, classes=1, activation="sigmoid")
    net.save_pretrained(tmp_path / "sigmoid")
    workdir = tmp_path / "exports"
    result = cli("onnx", tmp_path / "sigmoid", "-w", workdir, "--height", 64, "--width", 64, "--static",
                 "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = load_manifest(workdir)["model"]
    assert record["config"]["threshold"] == 0.5 and record["config"]["init"]["activation"] == "sigmoid"
    crop = np.asarray(Image.open(sorted((DEMO_VAL / "imgs").glob("*.png"))[0]).convert("RGB"))[:64, :64]
    Image.fromarray(crop).save(tmp_path / "crop.png")
    result = cli("predict", workdir / "sigmoid.onnx", tmp_path / "crop.png", "--out", tmp_path / "masks")
    assert result.exit_code == 0, result.output
    prob = eager_logits(net, crop.astype(np.float32) / 255, record["preprocess"])[0]
    expected = (prob > 0.5).astype(np.uint8)
    assert 0 < expected.mean() < 1 and np.all((prob >= 0) & (prob <= 1))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "masks" / "crop_mask.png")), expected)


# --- the other commands on an smp workdir ----------------------------------------------------------


@pytest.fixture
def unet_workdir(exports, tmp_path) -> Path:
    """A private copy of the Unet/resnet34 ONNX workdir (64x64, dynamic)."""
    return Path(shutil.copytree(exports.run("Unet", ("onnx",), 64, 64).workdir, tmp_path / "exports"))


def test_verify_rebuilds_the_smp_model_and_passes(unet_workdir):
    result = cli("verify", "-w", unet_workdir)
    assert result.exit_code == 0, result.output
    assert "Unet.onnx" in result.output


def test_evaluate_scores_eager_and_the_artefact(pretrained, unet_workdir, tmp_path):
    make_synth(tmp_path / "data", n=3, size=(64, 96), classes=2)  # masks 0/255
    report = tmp_path / "evaluate.json"
    result = cli("evaluate", pretrained["Unet"], tmp_path / "data", "-w", unet_workdir, "--mask-values", "0,255",
                 "--device", "cpu", "--json", report)  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    assert doc["images"] == 3 and 0 < doc["eager"]["dice"] <= 1
    [onnx] = doc["artifacts"]
    assert onnx["path"] == "Unet.onnx" and onnx["status"] == "ok" and 0 < onnx["dice"] <= 1
    assert abs(onnx["delta_vs_eager"]) < 1e-6  # the verified artefact decides every pixel as eager does


@slow
def test_bench_runs_the_gated_rows(unet_workdir):
    result = cli("-w", unet_workdir, "--batch", 2, "--min-time", 0.2, "--warmup", 1, "--device", "cpu", app=bench_app)
    assert result.exit_code == 0, result.output


def test_triton_repository_for_an_smp_workdir(unet_workdir, tmp_path):
    from unet_export.serving.validate import check_repository

    repo = tmp_path / "repo"
    result = cli("triton", "-w", unet_workdir, "--repo", repo, "--with-pipeline", "--python-runtime", "onnxruntime")
    assert result.exit_code == 0, result.output
    found = check_repository(repo)
    assert "Unet_onnx" in found and "Unet_pipeline" in found, sorted(found)


@slow
def test_int8_is_gated_on_real_images(pretrained, tmp_path):
    """Calibrated and judged on the demo's real images (no masks: class change and Dice vs eager):
    passing or failing, the verdict is a real one."""
    pytest.importorskip("nncf")
    calib = tmp_path / "calib"
    calib.mkdir()
    for path in demo_calibration():
        shutil.copy(path, calib / path.name)
    workdir, report = tmp_path / "exports", tmp_path / "int8.json"
    result = cli("int8", pretrained["Unet"], "--calib", calib, "-w", workdir, "--height", 64, "--width", 64,
                 "--device", "cpu", "--json", report)  # fmt: skip
    assert result.exit_code in (0, 1), result.output
    int8 = [e for e in load_manifest(workdir)["artifacts"] if e["precision"] == "int8"]
    assert {e["format"] for e in int8} == {"openvino", "onnx"}
    for entry in int8:  # judged on the calibration images themselves (128x128), not on 64x64 noise
        gate = entry["real_images"]["images"]
        assert gate and all(Path(image["path"]).parent == calib for image in gate)
        assert all(sha256_file(image["path"]) == image["sha256"] for image in gate)
        assert [case["shape"] for case in entry["parity"]["cases"]] == [[len(gate), 3, 128, 128]]
        assert entry["status"] == ("verified" if entry["parity"]["passed"] else "failed")
    assert result.exit_code == (0 if all(e["parity"]["passed"] for e in int8) else 1)
    assert json.loads(report.read_text())["exit_code"] == result.exit_code
