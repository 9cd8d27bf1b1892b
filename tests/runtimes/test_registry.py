"""Every registered model: detected from its original key layout, exported to ONNX and
TorchScript through the parity gate, and refusing sizes it cannot take with the valid ones."""

import json

import pytest
import torch

from tests.conftest import REPO
from unet_export.flows.export import parity_shapes
from unet_export.models.sizes import SizeRule
from unet_export.api import export_artifact
from unet_export.checkpoint import build_model, load_checkpoint
from unet_export.errors import UserError
from unet_export.workdir.manifest import load_manifest
from unet_export.models import MODELS, create_model, detect_model

# name -> (constructor options for a small test instance, export size)
CASES = {
    "milesial": ({"width": 8}, 64),
    "plain": ({"width": 8}, 64),
    "reflect": ({"width": 8}, 64),
    "reflect-sigmoid": ({"width": 8}, 64),
    "valid": ({"width": 8}, 188),
    "valid-pad": ({"width": 8}, 200),
    "valid-same": ({"width": 8}, 192),
    "resnet50": ({}, 64),
    "deeplabv3": ({"n_classes": 3}, 64),
}
# The input sizes each model takes, as README's model table states them (not read back from the
# code that writes the manifest): min, multiple, offset (H = offset + multiple * k), shrink.
SIZE_RULES = {
    "milesial": dict(min=16, multiple=1, offset=0, shrink=0),  # any, >= 16
    "plain": dict(min=16, multiple=16, offset=0, shrink=0),  # multiples of 16
    "reflect": dict(min=32, multiple=16, offset=0, shrink=0),
    "reflect-sigmoid": dict(min=32, multiple=16, offset=0, shrink=0),
    "valid": dict(min=188, multiple=16, offset=124, shrink=184),  # 16k + 124 (188, 204, ...), output 184 smaller
    "valid-pad": dict(min=188, multiple=1, offset=0, shrink=8),  # any, >= 188
    "valid-same": dict(min=16, multiple=16, offset=0, shrink=0),
    "resnet50": dict(min=32, multiple=32, offset=0, shrink=0),  # multiples of 32
    "deeplabv3": dict(min=32, multiple=1, offset=0, shrink=0),  # any, >= 32
}
HEAVY = {"resnet50", "deeplabv3"}  # 148M / 40M parameters, fixed widths: exported at full size (~70 s)
VARIANTS = {"reflect-sigmoid": "reflect", "valid-pad": "valid", "valid-same": "valid"}


# Families configured from outside their keys, each exported and parity-checked by its own tests
CONFIGURED = {"smp": "tests/e2e/test_smp_matrix.py", "factory": "tests/flows/test_factory.py",
              "module": "tests/flows/test_factory.py"}


def test_every_registered_model_has_export_and_parity_coverage():
    keyed = {name for name, spec in MODELS.items() if spec.configure is None}
    assert set(CASES) == keyed, "add the new model to CASES so it is exported and parity-checked"
    assert set(SIZE_RULES) == keyed, "add the new model's input sizes to SIZE_RULES"
    configured = {name for name, spec in MODELS.items() if spec.configure is not None}
    assert configured == set(CONFIGURED), "a configured family needs its own export tests, named in CONFIGURED"
    for name, tests in CONFIGURED.items():
        assert f'"{name}"' in (REPO / tests).read_text(), (name, tests)


def checkpoint(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, **CASES[name][0])
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)  # each original project saves a plain state_dict
    return path, model


@pytest.mark.parametrize("name", [n for n in CASES if n not in HEAVY])
def test_detected_from_its_original_keys(name, tmp_path):
    path, model = checkpoint(name, tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt.architecture == VARIANTS.get(name, name)  # variants need --model: same keys
    named = load_checkpoint(path, model=name)
    assert all(named.config[k] == v for k, v in MODELS[name].defaults.items())
    rebuilt = build_model(named)
    size = CASES[name][1]
    x = torch.rand(1, getattr(model, "n_channels", 3), size, size)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x))


def _export_cases():
    """Every model x format. `make test` runs every architecture, the ResNet-50 and DeepLabV3
    ones only in `make test-all` (15-60 s each, run in float64 for the gate) and the variants
    (same architecture, another config) through TorchScript only."""
    for name in CASES:
        for fmt in ("onnx", "torchscript"):
            # the unpadded U-Net's ONNX export (33 s) too: its TorchScript export stays in make test
            heavy = name in HEAVY or (name in VARIANTS and fmt == "onnx") or (name, fmt) == ("valid", "onnx")
            yield pytest.param(name, fmt, marks=[pytest.mark.slow] if heavy else [], id=f"{name}-{fmt}")


@pytest.mark.parametrize("name, fmt", list(_export_cases()))
def test_export_with_parity(name, fmt, tmp_path):
    path, model = checkpoint(name, tmp_path)
    size = CASES[name][1]
    result = export_artifact(path, fmt, tmp_path / "out", model=name, device="cpu", height=size, width=size)
    assert result.passed, result.parity.failures()
    entry = result.entry
    # the envelope's probes (a traced TorchScript model: its one shape), all passed and recorded
    expected = parity_shapes(SizeRule(**SIZE_RULES[name]), entry["inputs"][0]["shape"][1], size, size,
                             entry["size_rule"]["static"])  # fmt: skip
    assert [tuple(c.shape) for c in result.parity.cases] == expected
    assert entry["envelope"]["proven"] and len(entry["envelope"]["checked"]) == len(expected)
    manifest = load_manifest(tmp_path / "out")
    assert manifest["model"]["architecture"] == name
    assert manifest["artifacts"][0]["size_rule"] == SIZE_RULES[name] | {"static": False}


def test_valid_crop_gives_the_papers_sizes_and_refuses_others():
    model = create_model("valid", n_channels=1, n_classes=2, width=4)
    with torch.no_grad():
        assert model(torch.rand(1, 1, 572, 572)).shape == (1, 2, 388, 388)
    with pytest.raises(ValueError, match=r"124 \+ 16k"):
        model(torch.rand(1, 1, 200, 200))
    with pytest.raises(UserError, match="use 188 or 204"):
        MODELS["valid"].sizes({"concat": 0}).check(200, 572)
    with pytest.raises(UserError, match="use 96 or 128"):
        MODELS["resnet50"].sizes({}).check(100, 64)


def test_deeplabv3_loads_a_torchvision_state_dict_with_or_without_aux_classifier(tmp_path):
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    original = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4, aux_loss=True).eval()
    torch.save(original.state_dict(), tmp_path / "tv.pth")
    ckpt = load_checkpoint(tmp_path / "tv.pth")
    assert (ckpt.architecture, ckpt.config) == ("deeplabv3", {"n_classes": 4, "aux_loss": True})
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(build_model(ckpt)(x), original(x)["out"])
    # without aux_classifier (saved from aux_loss=False, or stripped): it loads, every weight as saved
    without_aux = {k: v for k, v in original.state_dict().items() if not k.startswith("aux_classifier.")}
    torch.save(without_aux, tmp_path / "no_aux.pth")
    ckpt = load_checkpoint(tmp_path / "no_aux.pth")
    assert (ckpt.architecture, ckpt.config) == ("deeplabv3", {"n_classes": 4, "aux_loss": False})
    model = build_model(ckpt)
    loaded = model.state_dict()
    assert loaded.keys() == without_aux.keys() and all(torch.equal(loaded[k], v) for k, v in without_aux.items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x)["out"])


def test_resnet50_encoder_starts_from_local_torchvision_weights(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(1)
    encoder = resnet50(weights=None)
    torch.save(encoder.state_dict(), tmp_path / "resnet50.pth")
    model = create_model("resnet50", n_classes=2, encoder_weights=str(tmp_path / "resnet50.pth"))
    assert torch.equal(model.input_block[0].weight, encoder.conv1.weight)
    assert torch.equal(model.down_blocks[3][2].conv3.weight, encoder.layer4[2].conv3.weight)
    assert detect_model(model.state_dict()) == ("resnet50", {"n_classes": 2})
    with pytest.raises(UserError, match="not a torchvision ResNet-50"):
        torch.save({"conv1.weight": encoder.conv1.weight}, tmp_path / "partial.pth")
        create_model("resnet50", encoder_weights=str(tmp_path / "partial.pth"))


# valid at 150x210 (26 s) in make test-all; valid-same covers the unpadded U-Net in make test
@pytest.mark.parametrize("name, size", [pytest.param("valid", (150, 210), marks=pytest.mark.slow), ("reflect", (70, 90)),
                                        ("valid-same", (100, 37))])  # fmt: skip
def test_predict_pads_images_to_a_size_the_model_takes(name, size, tmp_path):
    from PIL import Image

    from unet_export.predict import fit_and_run
    from unet_export.runtimes import EagerRunner

    path, model = checkpoint(name, tmp_path)
    rule = MODELS[name].sizes(load_checkpoint(path, model=name).config)
    x = torch.rand(1, model.n_channels, *size)
    with EagerRunner(model) as runner:
        logits = fit_and_run(runner, x, rule)
    assert logits.shape[-2:] == size
    if name == "valid":  # the output pixel under the image's (0, 0) sees the mirrored margin around it
        padded = torch.nn.functional.pad(x, [92, 92, 92, 92], mode="reflect")[..., : 188 + 16 * 0, : 188]
        with torch.no_grad():
            assert torch.allclose(model(padded)[..., 0, 0], logits[..., 0, 0], atol=1e-5)
    Image.new("RGB" if model.n_channels == 3 else "L", size[::-1]).save(tmp_path / "im.png")
    from unet_export.predict import predict

    if name == "valid":
        (mask,) = predict_named(path, name, tmp_path)
    else:
        (mask,) = predict(path, [tmp_path / "im.png"], tmp_path / "pred", model=name)
    assert Image.open(mask).size == size[::-1]


def predict_named(path, name, tmp_path):
    from unet_export.predict import predict

    export_artifact(path, "onnx", tmp_path / "exp", model=name, device="cpu", height=188, width=188)
    return predict(tmp_path / "exp" / f"{name}.onnx", [tmp_path / "im.png"], tmp_path / "pred")


@pytest.mark.parametrize("name, size", [("plain", 64), ("reflect", 64), ("valid", 188)])
def test_train_other_models(name, size, tmp_path):
    from typer.testing import CliRunner

    from unet_export.cli.main import app
    from unet_export.data.synth import make_synth

    make_synth(tmp_path / "data", n=6, size=(size, size), seed=0)
    args = ["train", str(tmp_path / "data"), "--model", name, "--width", "4", "--epochs", "1", "--batch-size", "2",
            "--val-fraction", "0.34", "-w", str(tmp_path / "run"), "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint_epoch1.pth", model=name)
    assert ckpt.architecture == name and ckpt.mask_values == [0, 128, 255]
    if name == "valid":  # 200 is not 16k + 124: refused with the sizes that fit
        make_synth(tmp_path / "odd", n=4, size=(200, 200), seed=0)
        bad = CliRunner().invoke(app, [*args[:1], str(tmp_path / "odd"), *args[2:]])
        assert bad.exit_code == 2 and "--square 204" in bad.stderr


def test_resume_keeps_a_variant_the_keys_cannot_tell(tmp_path):
    from unet_export.data.synth import make_synth
    from unet_export.flows.train import TrainConfig, train

    make_synth(tmp_path / "data", n=6, size=(64, 64), seed=0)
    cfg = TrainConfig(model="reflect-sigmoid", model_config={"width": 4}, epochs=1, batch_size=2, val_fraction=0.34,
                      device="cpu")  # fmt: skip
    first = train(tmp_path / "data", tmp_path / "run", cfg)
    resumed = train(tmp_path / "data", tmp_path / "run", TrainConfig(**{**cfg.__dict__, "model": "milesial", "epochs": 2}),
                    resume=first.checkpoints[-1])  # fmt: skip
    sidecar = json.loads(resumed.checkpoints[-1].with_suffix(".json").read_text())
    assert sidecar["model"] == "reflect-sigmoid"
    model = build_model(load_checkpoint(resumed.checkpoints[-1], sidecar["model"]))
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert 0 <= out.min() and out.max() <= 1  # still the sigmoid variant
