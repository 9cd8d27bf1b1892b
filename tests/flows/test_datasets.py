"""Datasets for train and evaluate: every image/mask pair of both splits checked in one pass before
the first step, each error naming its file; 16-bit masks read exactly; mask values outside
mask_values refused. And `data synth`'s bounds and atomic writes."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from unet_export.cli.main import app
from unet_export.data.dataset import find_samples
from unet_export.data.images import load_mask
from unet_export.data.synth import make_synth
from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS
from unet_export.errors import UserError
from unet_export.flows.evaluate import evaluate
from unet_export.predict import predict
from unet_export.flows.train import TrainConfig, train

runner = CliRunner()
TINY = TrainConfig(model_config={"width": 4}, epochs=1, batch_size=2, val_fraction=0.25, device="cpu")
N = 8


def val_names(n=N, fraction=TINY.val_fraction, seed=TINY.seed):
    """The images train() holds out for validation (its seeded random_split, as milesial's)."""
    n_val = int(n * fraction)
    _, val = torch.utils.data.random_split(range(n), [n - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    return [f"synth_{i:04d}" for i in val.indices]


@pytest.fixture
def data(tmp_path):
    make_synth(tmp_path / "data", n=N, size=(48, 48), seed=1)
    return tmp_path / "data"


def one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def no_step_train(data, tmp_path, **changes):
    """train() that must fail before its first optimiser step."""
    steps = []
    cfg = TrainConfig(**{**TINY.__dict__, **changes})
    with pytest.raises(UserError) as err:
        train(data, tmp_path / "run", cfg, on_step=lambda *a: steps.append(a))
    assert not steps and not (tmp_path / "run").exists()
    assert "\n" not in str(err.value)
    return str(err.value)


# --- one pass over both splits ------------------------------------------------------------------


def test_odd_sized_image_in_the_validation_split_is_refused_before_training(data, tmp_path):
    name = val_names()[0]
    Image.open(data / "imgs" / f"{name}.png").resize((50, 48)).save(data / "imgs" / f"{name}.png")
    Image.open(data / "masks" / f"{name}_mask.png").resize((50, 48), Image.NEAREST).save(data / "masks" / f"{name}_mask.png")
    result = runner.invoke(app, ["train", str(data), "--width", "4", "--epochs", "1", "--batch-size", "2",
                                 "--val-fraction", "0.25", "-w", str(tmp_path / "run"), "--device", "cpu"])  # fmt: skip
    one_line_error(result, f"{name}.png is 48x50 after preprocessing", "--square")  # was exit 3 after epoch 1's steps
    assert not list((tmp_path / "run").glob("*.pth")) if (tmp_path / "run").exists() else True


def _break(data, name, case):
    image, mask = data / "imgs" / f"{name}.png", data / "masks" / f"{name}_mask.png"
    if case == "mask size":
        Image.new("L", (40, 48)).save(mask)
    elif case == "corrupt mask":
        mask.write_bytes(mask.read_bytes()[:60])
    elif case == "corrupt image":
        image.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "rgb mask among grey":
        Image.open(mask).convert("RGB").save(mask)
    elif case == "float mask":
        mask.unlink()
        np.save(mask.with_suffix(".npy"), np.full((48, 48), 0.5))
    elif case == "unsupported image mode":
        image.unlink()
        Image.new("CMYK", (48, 48)).save(image.with_suffix(".tif"))
    return f"{name}_mask" if "mask" in case else name


@pytest.mark.parametrize("case, fragment", [
    ("mask size", "is 40x48 but"), ("corrupt mask", "cannot read"), ("corrupt image", "cannot read image"),
    ("rgb mask among grey", "masks must all be one kind"), ("float mask", "non-integer values"),
    ("unsupported image mode", "mode CMYK is not supported"),
])  # fmt: skip
def test_every_pair_of_both_splits_is_checked_before_the_first_step(data, tmp_path, case, fragment):
    name = val_names()[-1]  # in the validation split: train used to read it only after an epoch
    where = _break(data, name, case)
    message = no_step_train(data, tmp_path)
    assert fragment in message and where in message, message


def test_value_outside_mask_values_is_refused_naming_the_file(data, tmp_path):
    name = val_names()[0]
    mask = np.asarray(Image.open(data / "masks" / f"{name}_mask.png")).copy()
    mask[:3, :3] = 50
    Image.fromarray(mask).save(data / "masks" / f"{name}_mask.png")
    message = no_step_train(data, tmp_path, mask_values=[0, 128, 255])
    assert f"{name}_mask.png: mask value 50 is not one of mask_values [0, 128, 255]" in message
    # without --mask-values the stray value is a class, but not silently: it is listed before training
    result = runner.invoke(app, ["train", str(data), "--width", "4", "--epochs", "1", "--batch-size", "2",
                                 "--val-fraction", "0.25", "-w", str(tmp_path / "run2"), "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mask values (masks holding each) 0 (8), 50 (1), 128" in result.stdout
    assert result.stdout.index("50 (1)") < result.stdout.index("epoch 1")
    cli = runner.invoke(app, ["train", str(data), "--width", "4", "--epochs", "1", "--val-fraction", "0.25",
                              "--mask-values", "0,128,255", "-w", str(tmp_path / "run3"), "--device", "cpu"])  # fmt: skip
    one_line_error(cli, "mask value 50 is not one of mask_values [0, 128, 255]", f"{name}_mask.png")


def test_resume_checks_the_data_against_the_checkpoints_mask_values(data, tmp_path):
    first = train(data, tmp_path / "run", TINY)
    name = val_names()[0]
    mask = np.asarray(Image.open(data / "masks" / f"{name}_mask.png")).copy()
    mask[0, 0] = 50
    Image.fromarray(mask).save(data / "masks" / f"{name}_mask.png")
    steps = []
    with pytest.raises(UserError, match=f"{name}_mask.png: mask value 50 is not one of mask_values"):
        train(data, tmp_path / "run", TrainConfig(**{**TINY.__dict__, "epochs": 2}), resume=first.checkpoints[-1],
              on_step=lambda *a: steps.append(a))  # fmt: skip
    assert not steps and not (tmp_path / "run" / "checkpoint_epoch2.pth").exists()


def test_evaluate_checks_every_pair_and_names_the_file(tmp_path):
    data = tmp_path / "val"
    shutil.copytree(DEMO_VAL, data)
    Image.new("L", (64, 64)).save(data / "masks" / "synth_0007_mask.png")
    result = runner.invoke(app, ["evaluate", str(DEMO_WEIGHTS), str(data), "--device", "cpu"])
    one_line_error(result, "synth_0007_mask.png is 64x64 but synth_0007.png is 128x128")


def test_grey_images_are_replicated_for_a_3_channel_model(tmp_path):
    grey, rgb = tmp_path / "grey", tmp_path / "rgb"
    for data, mode in ((grey, "L"), (rgb, "RGB")):
        shutil.copytree(DEMO_VAL, data)
        for path in (data / "imgs").iterdir():
            Image.open(path).convert("L").convert(mode).save(path)
    result = runner.invoke(app, ["evaluate", str(DEMO_WEIGHTS), str(grey), "--device", "cpu"])
    assert result.exit_code == 0, result.output  # exited 3: 1 channel into a 3-channel model
    report = evaluate(DEMO_WEIGHTS, grey, None, device="cpu")
    assert report["eager"]["dice"] == evaluate(DEMO_WEIGHTS, rgb, None, device="cpu")["eager"]["dice"]


def test_grey_dataset_trains_a_1_channel_model_and_mixed_a_3_channel_one(data, tmp_path):
    for path in (data / "imgs").iterdir():
        Image.open(path).convert("L").save(path)
    result = train(data, tmp_path / "grey", TINY)
    assert torch.load(result.checkpoints[-1], weights_only=True)["inc.double_conv.0.weight"].shape[1] == 1
    Image.open(DEMO_VAL / "imgs" / "synth_0000.png").resize((48, 48)).save(data / "imgs" / "synth_0003.png")
    result = train(data, tmp_path / "mixed", TINY)
    assert torch.load(result.checkpoints[-1], weights_only=True)["inc.double_conv.0.weight"].shape[1] == 3


# --- 16-bit masks -------------------------------------------------------------------------------


def sixteen_bit_copy(tmp_path, factor):
    data = tmp_path / f"val16x{factor}"
    shutil.copytree(DEMO_VAL, data)
    for path in (data / "masks").iterdir():
        Image.fromarray(np.asarray(Image.open(path)).astype(np.uint16) * factor).save(path)
    assert Image.open(path).mode == "I;16"
    return data


def test_16_bit_masks_are_read_exactly_in_evaluate(tmp_path):
    same = evaluate(DEMO_WEIGHTS, sixteen_bit_copy(tmp_path, 1), None, device="cpu")["eager"]["dice"]
    assert same == pytest.approx(evaluate(DEMO_WEIGHTS, DEMO_VAL, None, device="cpu")["eager"]["dice"], abs=1e-9)
    # 128 * 257 = 32896 was clipped to 255, a wrong class, and a wrong Dice with exit 0
    result = runner.invoke(app, ["evaluate", str(DEMO_WEIGHTS), str(sixteen_bit_copy(tmp_path, 257)), "--device", "cpu"])
    one_line_error(result, "_mask.png: mask value 32896 is not one of mask_values [0, 128, 255]")


def test_16_bit_masks_train_with_their_own_values(data, tmp_path):
    for path in (data / "masks").iterdir():
        Image.fromarray(np.asarray(Image.open(path)).astype(np.uint16) * 257).save(path)
    assert load_mask(path).dtype == np.uint16 and set(np.unique(load_mask(path))) <= {0, 32896, 65535}
    result = train(data, tmp_path / "run", TINY)
    assert result.mask_values == [0, 32896, 65535]  # was [[0, 0, 0], [255, 255, 255]]: two classes
    (mask,) = predict(result.checkpoints[-1], [data / "imgs" / "synth_0000.png"], tmp_path / "pred")
    with Image.open(mask) as img:
        assert img.mode == "I;16" and set(np.unique(np.asarray(img))) <= {0, 32896, 65535}
    _, samples = find_samples(data)
    assert len(samples) == N


# --- data synth ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["--size", "100000x100000"], "at most 8192 per side"), (["--size", "8193x64"], "at most 8192 per side"),
    (["--n", "100001"], "at most 100000 images"), (["--n", "0"], "at least one image"),
])  # fmt: skip
def test_synth_bounds(tmp_path, args, fragment):
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "s"), *args])  # was killed by the OOM killer
    one_line_error(result, fragment)
    assert not (tmp_path / "s").exists()


def test_synth_write_error_leaves_no_truncated_png(tmp_path, monkeypatch):
    calls = []
    real_save = Image.Image.save

    def disk_fills_up(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:  # the second image: half a PNG, then ENOSPC
            open(fp, "wb").write(b"\x89PNG\r\n\x1a\n half")
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_fills_up)
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "s"), "--n", "3", "--size", "32x32"])
    one_line_error(result, "cannot write", "synth_0001.png", "No space left on device")
    files = sorted(p.relative_to(tmp_path / "s").as_posix() for p in (tmp_path / "s").rglob("*.png"))
    assert files == ["imgs/synth_0000.png", "masks/synth_0000_mask.png"]  # complete files only, no temporaries
    for path in (tmp_path / "s").rglob("*.png"):
        Image.open(path).load()
