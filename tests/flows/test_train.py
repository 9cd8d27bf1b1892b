"""Train, evaluate, predict and the data commands, end to end on tiny synthetic sets; and the README
promises of train (issue 14): RMSprop as milesial, gradient clipping, --encoder-weights."""

import copy
import json
import math
import shutil

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook
from typer.testing import CliRunner

from unet_export.flows import train as train_module
from unet_export.checkpoint import build_model, load_checkpoint
from unet_export.cli.main import app
from unet_export.data.dataset import find_samples, Preprocess, SegmentationDataset, unique_mask_values
from unet_export.data.labelme import convert_labelme
from unet_export.data.synth import make_synth
from unet_export.flows.evaluate import evaluate, mean_dice
from unet_export.runtimes.onnx.export import read_metadata as onnx_metadata
from unet_export.runtimes.torchscript.export import read_metadata as torchscript_metadata
from unet_export.fileio import sha256_file
from unet_export.workdir.manifest import load_manifest
from unet_export.models import create_model
from unet_export.predict import predict
from unet_export.runtimes import EagerRunner
from unet_export.flows.train import TrainConfig, train

runner = CliRunner()
TINY = TrainConfig(model_config={"width": 8}, epochs=2, batch_size=2, lr=3e-3, val_fraction=0.25, device="cpu")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synth(root / "data", n=32, size=(64, 64), classes=3, seed=0)
    return root / "data"


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(synth, out, TINY), out


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The last checkpoint exported to ONNX and TorchScript, once for the module (exporting is the
    slow part), at 48x64: not the images' 64x64, so the recorded export size is the one asked for."""
    weights = trained[0].checkpoints[-1]
    workdir = tmp_path_factory.mktemp("exports")
    for fmt in ("onnx", "torchscript"):
        result = runner.invoke(app, [fmt, str(weights), "-w", str(workdir), "--height", "48", "--width", "64"])
        assert result.exit_code == 0, result.output
    return weights, workdir


@pytest.fixture(scope="module")
def few(synth, tmp_path_factory):
    """Four of the labelled images: enough for the gates, a quarter of the inference."""
    root = tmp_path_factory.mktemp("few")
    for sub in ("imgs", "masks"):
        (root / sub).mkdir()
    for i in range(4):
        shutil.copy(synth / "imgs" / f"synth_{i:04d}.png", root / "imgs")
        shutil.copy(synth / "masks" / f"synth_{i:04d}_mask.png", root / "masks")
    return root


def test_synth_is_deterministic_and_uses_spread_mask_values(tmp_path):
    a, b = make_synth(tmp_path / "a", n=3, size=(48, 64), seed=5), make_synth(tmp_path / "b", n=3, size=(48, 64), seed=5)
    for name in ("imgs/synth_0002.png", "masks/synth_0002_mask.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.mask_values == [0, 128, 255] and Image.open(tmp_path / "a/imgs/synth_0000.png").size == (64, 48)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "a/masks/synth_0000_mask.png")))) <= {0, 128, 255}


def test_two_epochs_lower_the_loss_and_raise_dice(synth, trained):
    result, _ = trained
    losses = [h["train_loss"] for h in result.history]
    dices = [h["val_dice"] for h in result.history]
    assert losses[1] < losses[0] and dices[1] > dices[0]
    _, samples = find_samples(synth)
    data = SegmentationDataset(samples, result.mask_values, Preprocess())
    torch.manual_seed(TINY.seed)  # the initialisation train() started from
    before = create_model("milesial", n_channels=3, n_classes=3, width=8)
    after = build_model(load_checkpoint(result.checkpoints[-1]))
    with EagerRunner(before) as r0, EagerRunner(after) as r1:
        assert mean_dice(r1, data, 3) > mean_dice(r0, data, 3) + 0.2


def test_checkpoints_are_milesial_format_with_sidecar(trained, synth):
    result, out = trained
    assert [p.name for p in result.checkpoints] == ["checkpoint_epoch1.pth", "checkpoint_epoch2.pth"]
    state = torch.load(result.checkpoints[-1], weights_only=True)
    assert state["mask_values"] == [0, 128, 255] and "outc.conv.weight" in state and "up1.up.weight" in state
    sidecar = json.loads(result.checkpoints[-1].with_suffix(".json").read_text())
    assert sidecar["epoch"] == 2 and len(sidecar["metrics"]) == 2 and sidecar["config"]["width"] == 8
    assert sidecar["data"]["layout"] == "milesial" and len(sidecar["data"]["sha256"]) == 64
    assert sidecar["data"]["train"] == 24 and sidecar["data"]["val"] == 8
    assert sidecar["preprocess"] == {"scale": 1.0, "square": None}


def test_resume_restores_weights_optimiser_and_scheduler(trained, synth, tmp_path, monkeypatch):
    """The first resumed epoch starts from the checkpoint's weights and its .state.pt: Adam's
    moments and step counts, the learning rate, and ReduceLROnPlateau's epoch count and best Dice
    (a fresh start has none of them); then it continues the epoch numbering."""
    result, out = trained
    last = result.checkpoints[-1]
    saved_weights = torch.load(last, weights_only=True)
    saved = torch.load(last.with_suffix(".state.pt"), weights_only=True)
    schedulers, at_start = [], {}

    class Scheduler(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            schedulers.append(self)

    def first_epoch(model, train_set, optimizer, *args):
        if not at_start:  # what the resumed run starts its first step from
            at_start.update(weights=copy.deepcopy(model.state_dict()), optimizer=copy.deepcopy(optimizer.state_dict()),
                            scheduler=copy.deepcopy(schedulers[-1].state_dict()))  # fmt: skip
        return real_epoch(model, train_set, optimizer, *args)

    real_epoch = train_module._train_epoch
    monkeypatch.setattr(train_module, "_train_epoch", first_epoch)
    monkeypatch.setattr(torch.optim.lr_scheduler, "ReduceLROnPlateau", Scheduler)
    resumed = train(synth, tmp_path, TrainConfig(**{**TINY.__dict__, "epochs": 3}), resume=last)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3] and resumed.checkpoints[0].name == "checkpoint_epoch3.pth"

    for name, tensor in at_start["weights"].items():
        assert torch.equal(tensor, saved_weights[name]), name
    optimizer = at_start["optimizer"]
    assert optimizer["param_groups"][0]["lr"] == saved["optimizer"]["param_groups"][0]["lr"] == TINY.lr
    assert len(optimizer["state"]) == len(saved["optimizer"]["state"]) > 0
    for index, state in saved["optimizer"]["state"].items():
        assert state["step"].item() == 2 * 12  # two epochs of 12 steps (24 training images, batches of 2)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer["state"][index][key], state[key]), (index, key)
    scheduler = at_start["scheduler"]
    assert scheduler["last_epoch"] == saved["scheduler"]["last_epoch"] == 2
    assert scheduler["best"] == saved["scheduler"]["best"] > 0  # a fresh scheduler's best is -inf
    assert scheduler["num_bad_epochs"] == saved["scheduler"]["num_bad_epochs"]


def test_voc_layout_from_labelme_with_square_preprocessing(tmp_path):
    (tmp_path / "json").mkdir()
    for i in range(4):
        Image.new("RGB", (80, 60), (i * 40, 90, 160)).save(tmp_path / "json" / f"im{i}.png")
        doc = {"imagePath": f"im{i}.png", "imageHeight": 60, "imageWidth": 80, "shapes": [
            {"label": "box", "shape_type": "rectangle", "points": [[10 + i, 10], [40, 50]]},
            {"label": "dot", "shape_type": "circle", "points": [[60, 30], [66, 30]]}]}  # fmt: skip
        (tmp_path / "json" / f"im{i}.json").write_text(json.dumps(doc))
    convert_labelme(tmp_path / "json", tmp_path / "voc", ["background", "box", "dot"])
    layout, samples = find_samples(tmp_path / "voc")
    assert layout == "voc" and unique_mask_values(samples) == [0, 1, 2]
    cfg = TrainConfig(model_config={"width": 4}, epochs=1, batch_size=2, square=64, val_fraction=0.25, device="cpu")
    result = train(tmp_path / "voc", tmp_path / "run", cfg)
    assert json.loads(result.checkpoints[0].with_suffix(".json").read_text())["preprocess"]["square"] == 64
    masks = predict(result.checkpoints[0], [samples[0].image], tmp_path / "pred")
    assert Image.open(masks[0]).size == (80, 60)  # back to the original size after pad-to-square


def test_evaluate_eager_and_artefacts_with_gate(exported, synth, few, tmp_path):
    weights, workdir = exported
    report = evaluate(weights, synth, workdir, device="cpu")
    assert 0.3 < report["eager"]["dice"] < 1 and report["images"] == 32
    rows = {row["format"]: row for row in report["artifacts"]}
    assert set(rows) == {"onnx", "torchscript"}
    for row in rows.values():
        assert row["delta_vs_eager"] == pytest.approx(0, abs=1e-6)
    out_json = tmp_path / "eval.json"
    ok = runner.invoke(app, ["evaluate", str(weights), str(few), "-w", str(workdir), "--json", str(out_json),
                             "--max-delta", "0.001"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    data = json.loads(out_json.read_text())
    assert set(data) >= {"eager", "artifacts"} and {"format", "precision", "dice", "delta_vs_eager"} <= set(data["artifacts"][0])
    failed = runner.invoke(app, ["evaluate", str(weights), str(few), "-w", str(workdir), "--min-dice", "0.999"])
    assert failed.exit_code == 1 and "gate failed" in failed.stdout


def test_evaluate_scores_only_the_artefacts_of_the_same_checkpoint(exported, trained, few, tmp_path):
    """The workdir holds epoch 2's artefacts: evaluating epoch 1 scores none of them; the same
    checkpoint copied elsewhere (same sha256, another path) scores both."""
    weights, workdir = exported
    epoch1 = trained[0].checkpoints[0]
    assert sha256_file(epoch1) != sha256_file(weights)
    report = evaluate(epoch1, few, workdir, device="cpu")
    assert report["artifacts"] == [] and report["images"] == 4
    copied = tmp_path / "renamed.pth"
    shutil.copy(weights, copied)
    scored = evaluate(copied, few, workdir, device="cpu")["artifacts"]
    assert {row["format"] for row in scored} == {"onnx", "torchscript"}


def _background_everywhere(path):
    """Edit the ONNX model's last bias so that it predicts background everywhere (its metadata stays)."""
    model = onnx.load(str(path))
    bias = next(t for t in model.graph.initializer if t.name.startswith("outc") and t.name.endswith("bias"))
    values = np.full(onnx.numpy_helper.to_array(bias).shape, -50.0, np.float32)
    values[0] = 50.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(path))


def test_max_delta_fails_an_artefact_further_below_eager_and_passes_at_the_delta(exported, few, tmp_path):
    """An artefact whose file was swapped after its hash was recorded (only Dice can catch that):
    --max-delta Y fails it (exit 1, naming it) when its Dice is more than Y below eager's, and
    passes it when it is exactly Y below; the good TorchScript artefact is never named."""
    weights, source = exported
    workdir = tmp_path / "exports"
    shutil.copytree(source, workdir)
    onnx_path = workdir / f"{weights.stem}.onnx"
    _background_everywhere(onnx_path)
    manifest = json.loads((workdir / "manifest.json").read_text())
    entry = next(a for a in manifest["artifacts"] if a["format"] == "onnx")
    entry |= {"sha256": sha256_file(onnx_path), "bytes": onnx_path.stat().st_size}
    (workdir / "manifest.json").write_text(json.dumps(manifest))
    args = ["evaluate", str(weights), str(few), "-w", str(workdir)]
    plain = runner.invoke(app, args + ["--json", str(tmp_path / "dice.json")])
    assert plain.exit_code == 0, plain.output
    rows = {row["format"]: row for row in json.loads((tmp_path / "dice.json").read_text())["artifacts"]}
    below = -rows["onnx"]["delta_vs_eager"]
    assert below > 0.1 and rows["torchscript"]["delta_vs_eager"] == pytest.approx(0, abs=1e-9)
    at = runner.invoke(app, args + ["--max-delta", repr(below)])
    assert at.exit_code == 0, at.output
    over = runner.invoke(app, args + ["--max-delta", repr(math.nextafter(below, 0))])
    assert over.exit_code == 1, over.output
    failures = [line for line in over.stdout.splitlines() if "gate failed" in line]
    assert len(failures) == 1 and "onnx fp32" in failures[0] and "--max-delta" in failures[0]


def test_predict_from_checkpoint_onnx_and_torchscript_agree(exported, synth, tmp_path):
    weights, workdir = exported
    image = synth / "imgs" / "synth_0000.png"
    cli = runner.invoke(app, ["predict", str(weights), str(image), "--out", str(tmp_path / "a"), "--overlay"])
    assert cli.exit_code == 0, cli.output
    predict(workdir / f"{weights.stem}.onnx", [image], tmp_path / "b")
    ts = workdir / f"{weights.stem}.ts"
    from_ts = runner.invoke(app, ["predict", str(ts), str(image), "--out", str(tmp_path / "c")])
    assert from_ts.exit_code == 0, from_ts.output
    a, b, c = (np.asarray(Image.open(tmp_path / d / "synth_0000_mask.png")) for d in "abc")
    assert a.shape == (64, 64) and set(np.unique(a)) <= {0, 128, 255} and len(np.unique(a)) >= 2
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert (tmp_path / "a" / "synth_0000_overlay.png").is_file()


def test_export_size_is_recorded_in_the_manifest_and_the_artefacts(exported):
    weights, workdir = exported
    assert {a["format"]: a["export_size"] for a in load_manifest(workdir)["artifacts"]} == {
        "onnx": [48, 64], "torchscript": [48, 64]}  # fmt: skip
    assert json.loads(onnx_metadata(workdir / f"{weights.stem}.onnx")["export_size"]) == [48, 64]
    assert torchscript_metadata(workdir / f"{weights.stem}.ts")["export_size"] == [48, 64]


def _bad_dataset(tmp_path, case):
    data = tmp_path / "bad"
    make_synth(data, n=4, size=(48, 48), seed=1)
    if case == "empty folder":
        for p in (data / "imgs").iterdir():
            p.unlink()
    elif case == "image without mask":
        (data / "masks" / "synth_0001_mask.png").unlink()
    elif case == "mask size mismatch":
        Image.new("L", (40, 48)).save(data / "masks" / "synth_0002_mask.png")
    elif case == "unreadable image":
        (data / "imgs" / "synth_0003.png").write_bytes(b"not a png")
    elif case == "unknown mask value":
        Image.fromarray(np.full((48, 48), 50, np.uint8)).save(data / "masks" / "synth_0000_mask.png")
    return data


@pytest.mark.parametrize(
    "case, fragment",
    [("empty folder", "holds no images"), ("image without mask", "has no mask"),
     ("mask size mismatch", "a mask must match its image"), ("unreadable image", "cannot read image"),
     ("unknown mask value", "mask value 50 is not one of mask_values")],  # fmt: skip
)
def test_bad_data_exits_2_with_one_line(trained, tmp_path, case, fragment):
    data = _bad_dataset(tmp_path, case)
    if case == "unknown mask value":  # the model's classes are fixed: 50 is not among them
        args = ["evaluate", str(trained[0].checkpoints[-1]), str(data), "-w", str(tmp_path / "none")]
    else:
        args = ["train", str(data), "--width", "4", "--epochs", "1", "-w", str(tmp_path / "run")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and result.stderr.count("\n") == 1


def test_data_synth_cli(tmp_path):
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "s"), "--n", "2", "--size", "40x56", "--classes", "4"])
    assert result.exit_code == 0 and "mask values [0, 85, 170, 255]" in result.stdout
    assert Image.open(tmp_path / "s" / "imgs" / "synth_0001.png").size == (56, 40)
    bad = runner.invoke(app, ["data", "synth", str(tmp_path / "t"), "--classes", "9"])
    assert bad.exit_code == 2 and "--classes 9" in bad.stderr


def test_shipped_demo_model_reaches_its_stated_dice():
    from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS

    report = evaluate(DEMO_WEIGHTS, DEMO_VAL, None, device="cpu")
    assert report["images"] == 24 and report["eager"]["dice"] >= 0.95
    sidecar = json.loads(DEMO_WEIGHTS.with_suffix(".json").read_text())
    assert sidecar["config"] == {"n_channels": 3, "n_classes": 3, "width": 16, "bilinear": False}
    assert DEMO_WEIGHTS.stat().st_size < 10e6  # a few MB, shipped inside the package


# --- README promises of `unet-export train` that had no test able to fail (issue 14; these were
# tests/test_promises_bench.py): RMSprop as milesial, gradient clipping, --encoder-weights.


@pytest.fixture
def tiny_data(tmp_path):
    make_synth(tmp_path / "data", n=4, size=(32, 32), classes=3, seed=3)
    return tmp_path / "data"


def test_rmsprop_is_milesials_and_every_step_clips_at_1(tiny_data, tmp_path, monkeypatch):
    """`--optimizer rmsprop` builds RMSprop with milesial's settings (REFERENCE: lr 1e-5,
    weight_decay 1e-8, momentum 0.999), and every step clips the whole model's gradients to norm
    1.0 after backward and before the optimiser step."""
    events, real_clip = [], torch.nn.utils.clip_grad_norm_

    def clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        assert all(p.grad is not None for p in parameters), "clipped before backward"
        total = real_clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters])).item()
        events.append(("clip", max_norm, len(parameters), float(total), after))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: events.append(("step", type(opt).__name__)))
    try:
        result = runner.invoke(app, ["train", str(tiny_data), "--width", "4", "--epochs", "1", "--batch-size", "2",
                                  "--val-fraction", "0.25", "--optimizer", "rmsprop", "--lr", "1e-5",
                                  "-w", str(tmp_path / "run"), "--device", "cpu"])  # fmt: skip
    finally:
        hook.remove()
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "run" / "checkpoint_epoch1.state.pt", weights_only=True)["optimizer"]
    group = state["param_groups"][0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (1e-5, 0.999, 1e-8)
    assert (group["alpha"], group["eps"], group["centered"]) == (0.99, 1e-8, False)  # torch's defaults, as milesial
    assert {"square_avg", "momentum_buffer"} <= set(state["state"][0])  # RMSprop's state, not Adam's exp_avg
    n_params = len(list(create_model("milesial", n_channels=3, n_classes=3, width=4).parameters()))
    assert [e[0] for e in events] == ["clip", "step"] * 2  # 3 training images, batches of 2
    for clipped, step in zip(events[::2], events[1::2]):
        assert clipped[1] == 1.0 and clipped[2] == n_params and step[1] == "RMSprop"
        assert clipped[4] <= 1.0 + 1e-4 and (clipped[3] <= 1.0 or clipped[4] == pytest.approx(1.0, rel=1e-4))
    assert any(clipped[3] > 1.0 for clipped in events[::2])  # the clip did cut (norms 2.1 and 1.8 here)


def _resnet50_state_file(path):
    """A torchvision ResNet-50 state_dict in which tensor i holds the value i everywhere (stored as
    one expanded element, so the file is a few KB)."""
    from torchvision.models import resnet50

    shapes = {k: (v.shape, v.dtype) for k, v in resnet50(weights=None).state_dict().items()}
    state = {k: torch.tensor(i, dtype=dtype).expand(shape) for i, (k, (shape, dtype)) in enumerate(shapes.items())}
    torch.save(state, path)
    return {k: i for i, k in enumerate(shapes)}


def test_encoder_weights_start_the_resnet50_encoder_from_the_local_file(tmp_path):
    """Every encoder tensor of the U-Net (conv1/bn1 -> input_block, layerN -> down_blocks) is the
    file's; the file's fc head is not used."""
    values = _resnet50_state_file(tmp_path / "resnet50.pth")
    model = create_model("resnet50", n_classes=2, encoder_weights=str(tmp_path / "resnet50.pth"))
    prefix = {"conv1": "input_block.0", "bn1": "input_block.1",
              **{f"layer{i}": f"down_blocks.{i - 1}" for i in range(1, 5)}}  # fmt: skip
    ours = model.state_dict()
    checked = 0
    for key, value in values.items():
        head, rest = key.split(".", 1)
        if head == "fc":
            continue  # the classifier head is not part of the U-Net
        tensor = ours[f"{prefix[head]}.{rest}"]
        assert (tensor == value).all(), key
        checked += 1
    assert checked == len(values) - 2


def test_bad_encoder_weights_are_exit_2_before_training(tmp_path, tiny_data):
    """Offline, from the CLI: a file that is not a ResNet-50 state_dict, or no file, is exit 2 in
    one line and nothing is written; the option means nothing to another model."""
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")  # a shape mismatch: was exit 3
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")  # not a dict: was exit 3
    not_resnet = "is not a torchvision ResNet-50 state_dict"
    for weights, fragment in (("other.pth", not_resnet), ("tensor.pth", not_resnet), ("missing.pth", "cannot load")):
        result = runner.invoke(app, ["train", str(tiny_data), "--model", "resnet50", "--encoder-weights",
                                  str(tmp_path / weights), "--epochs", "1", "-w", str(tmp_path / "run"),
                                  "--device", "cpu"])  # fmt: skip
        assert result.exit_code == 2, result.output
        assert f"--encoder-weights {tmp_path / weights}" in result.stderr and fragment in result.stderr
        assert result.stderr.count("\n") == 1 and not (tmp_path / "run").exists()
    result = runner.invoke(app, ["train", str(tiny_data), "--encoder-weights", str(tmp_path / "other.pth")])
    assert result.exit_code == 2 and "--encoder-weights does not apply to --model milesial" in result.stderr


# Issue 15: a rough edge a new user hit, reproduced before it was fixed (was tests/test_rough_edges.py).


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


def test_train_says_amp_does_nothing_on_the_cpu(tmp_path):
    from unet_export.data.synth import make_synth

    make_synth(tmp_path / "data", n=4, size=(32, 32), classes=2, seed=0)
    args = ["train", str(tmp_path / "data"), "--width", "8", "--epochs", "1", "--batch-size", "2", "--device", "cpu",
            "-w", str(tmp_path / "runs"), "--val-fraction", "0.25"]  # fmt: skip
    result = runner.invoke(app, args + ["--amp"])
    assert result.exit_code == 0, result.output
    assert "--amp: mixed precision runs on CUDA only; training in FP32 on the CPU" in result.stdout
    assert "nan" not in result.stdout


# Issue 25 (helper i25a): a closed pipe, --version, counts in the singular, failures on stderr
# (was tests/test_rough_edges.py).


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
