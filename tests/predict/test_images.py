"""Images as predict, evaluate and train read them: channels (palette, grey, alpha, 16-bit), the
pixel limit checked from the header, inputs checked before any output, tiled inference."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from unet_export.checkpoint import build_model, load_checkpoint
from unet_export.cli.main import app
from unet_export.data.dataset import image_to_tensor, Preprocess
from unet_export.data.images import load_image
from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS, write_random_checkpoint
from unet_export.errors import UserError
from unet_export.models import MODELS
from unet_export.predict import fit_and_run, predict
from unet_export.runtimes import EagerRunner

runner = CliRunner()
DEMO_IMAGE = DEMO_VAL / "imgs" / "synth_0000.png"


def png_header_only(path, width, height, mode=0):
    """A PNG whose header claims width x height (8-bit grey) and whose data is one empty row: what
    a decompression bomb looks like to anyone who reads the header first."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


def one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def skipped_image(result, *fragments):
    """predict streams (issue 18): an image it cannot take is reported and skipped, exit 1."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "failed:" in result.stderr and "Traceback" not in result.output, result.output
    for fragment in fragments:  # the failure list is on stderr (issue 25)
        assert fragment in result.stderr, result.stderr


def demo_mask(tmp_path, image, name="out"):
    (path,) = predict(DEMO_WEIGHTS, [image], tmp_path / name)
    return np.asarray(Image.open(path))


# --- channels -----------------------------------------------------------------------------------


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    grey8 = np.asarray(Image.open(DEMO_IMAGE).convert("L"))
    Image.fromarray(grey8).save(tmp_path / "grey8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # 255 -> 65535
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    # 16-bit was clipped to 255 (99.6% of these pixels) and predicted as a white image
    assert np.array_equal(demo_mask(tmp_path, tmp_path / "grey16.png", "a"), demo_mask(tmp_path, tmp_path / "grey8.png", "b"))
    x16 = image_to_tensor(load_image(tmp_path / "grey16.png", 3), Preprocess(), 3)
    x8 = image_to_tensor(load_image(tmp_path / "grey8.png", 3), Preprocess(), 3)
    assert x16.shape == (3, 128, 128) and torch.allclose(x16, x8, atol=1e-6)


def test_16_bit_values(tmp_path):
    Image.fromarray(np.array([[0, 1, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "v.png")
    img = load_image(tmp_path / "v.png", 1)
    assert img.mode == "F" and np.allclose(np.asarray(img), [[0, 1 / 257, 128, 255]])


@pytest.mark.parametrize("mode", ["L", "P", "LA", "RGBA", "1", "P-tRNS"])
def test_grey_palette_and_alpha_images_run_on_a_3_channel_model(tmp_path, mode):
    rgb = Image.open(DEMO_IMAGE).convert("RGB")
    save = {}
    if mode.startswith("P"):
        source = rgb.quantize(64)  # a colour palette: fed as its colours, not as raw indices
        reference = source.convert("RGB")
        save = {"transparency": 0} if mode == "P-tRNS" else {}  # transparency dropped like alpha
    elif mode == "RGBA":
        source = rgb.copy()
        source.putalpha(Image.new("L", rgb.size, 40))  # alpha dropped, not composited
        reference = rgb
    else:
        source = rgb.convert(mode)
        reference = source.convert("L").convert("RGB")
    source.save(tmp_path / f"in_{mode}.png", **save)
    reference.save(tmp_path / "ref.png")
    result = runner.invoke(app, ["predict", str(DEMO_WEIGHTS), str(tmp_path / f"in_{mode}.png"), "--out", str(tmp_path / "p"),
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output  # grey and palette exited 3 before
    got = np.asarray(Image.open(tmp_path / "p" / f"in_{mode}_mask.png"))
    assert np.array_equal(got, demo_mask(tmp_path, tmp_path / "ref.png"))


def test_grey_palette_is_grey_for_a_1_channel_model(tmp_path):
    weights = write_random_checkpoint(tmp_path / "grey.pth", n_channels=1, width=8)
    grey = Image.open(DEMO_IMAGE).convert("L")
    palette = grey.convert("P")  # L -> P keeps a grey palette
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    palette.save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png", 1).mode == "L"
    assert np.array_equal(np.asarray(load_image(tmp_path / "pal.png", 1)), np.asarray(palette.convert("L")))
    assert predict(weights, [tmp_path / "pal.png"], tmp_path / "out")


def test_colour_image_for_a_1_channel_model_is_refused(tmp_path):
    weights = write_random_checkpoint(tmp_path / "grey.pth", n_channels=1, width=8)
    result = runner.invoke(app, ["predict", str(weights), str(DEMO_IMAGE), "--out", str(tmp_path / "p"), "--device", "cpu"])
    skipped_image(result, "synth_0000.png is a colour image (RGB)", "1 channel")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("mode", ["F", "CMYK"])
def test_unsupported_modes_are_refused(tmp_path, mode):
    path = tmp_path / f"im_{mode}.tif"
    Image.new(mode, (32, 32)).save(path)
    with pytest.raises(UserError, match=f"mode {mode} is not supported"):
        load_image(path, 3)


# --- pixel limit ----------------------------------------------------------------------------------


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 13400, 13400)  # 180 MP: PIL itself raised (exit 3)
    result = runner.invoke(app, ["predict", str(DEMO_WEIGHTS), str(bomb), "--out", str(tmp_path / "p"), "--device", "cpu"])
    skipped_image(result, "bomb.png", "179.6 MP", "--max-pixels")
    big = png_header_only(tmp_path / "big.png", 8000, 8000)  # 64 MP: above the 50 MP default, below PIL's error
    result = runner.invoke(app, ["predict", str(DEMO_WEIGHTS), str(big), "--out", str(tmp_path / "p"), "--device", "cpu"])
    skipped_image(result, "big.png (8000x8000) has 64 MP", "over the 50 MP limit")
    assert not (tmp_path / "p").exists()


def test_max_pixels_option(tmp_path):
    result = runner.invoke(app, ["predict", str(DEMO_WEIGHTS), str(DEMO_IMAGE), "--out", str(tmp_path / "p"),
                                 "--max-pixels", "10000", "--device", "cpu"])  # fmt: skip
    skipped_image(result, "synth_0000.png (128x128)", "over the 0.01 MP limit")
    result = runner.invoke(app, ["evaluate", str(DEMO_WEIGHTS), str(DEMO_VAL), "--max-pixels", "10000", "--device", "cpu"])
    one_line_error(result, "(128x128) has 0.0164 MP", "over the 0.01 MP limit")
    # a limit above PIL's own (89 MP warning, 179 MP error) is honoured: only ours decides
    bomb = png_header_only(tmp_path / "bomb.png", 13400, 13400)
    assert load_image(bomb, 3, max_pixels=200_000_000).size == (13400, 13400)


# --- predict: a bad input is that input's failure (issue 18: streaming predict) ----------------------


@pytest.mark.parametrize("bad", ["zero", "text", "truncated"])
def test_predict_skips_an_unreadable_image_and_exits_1(tmp_path, bad):
    good = tmp_path / "good.png"
    Image.open(DEMO_IMAGE).save(good)
    path = tmp_path / "bad.png"
    if bad == "zero":
        path.write_bytes(b"")
    elif bad == "text":
        path.write_text("not an image")
    elif bad == "truncated":  # a valid header: only decoding finds it
        data = DEMO_IMAGE.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(DEMO_WEIGHTS), str(good), str(path), "--out", str(out), "--overlay",
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "1 failed:" in result.stderr and f"{path}: cannot read image" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good_mask.png", "good_overlay.png"]


def test_predict_on_a_missing_input_writes_nothing(tmp_path):
    good = tmp_path / "good.png"
    Image.open(DEMO_IMAGE).save(good)
    result = runner.invoke(app, ["predict", str(DEMO_WEIGHTS), str(good), str(tmp_path / "gone.png"), "--out",
                                 str(tmp_path / "out"), "--device", "cpu"])  # fmt: skip
    one_line_error(result, "input not found")
    assert not (tmp_path / "out").exists()


def test_predict_writes_all_masks_and_no_temporary_files(tmp_path):
    images = sorted((DEMO_VAL / "imgs").iterdir())[:3]
    written = predict(DEMO_WEIGHTS, images, tmp_path / "out", overlay_images=True)
    assert [p.name for p in written] == [f"{p.stem}_mask.png" for p in images]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"{p.stem}_mask.png" for p in images] + [f"{p.stem}_overlay.png" for p in images])


def test_write_error_is_a_one_line_user_error(tmp_path, monkeypatch):
    real = Path.write_bytes

    def full_disk(self, data):
        real(self, data[:10])  # a partial temp file, then the disk is full
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(UserError, match="No space left on device") as err:
        predict(DEMO_WEIGHTS, [DEMO_IMAGE], tmp_path / "out")
    assert "synth_0000_mask.png" in str(err.value) and not (tmp_path / "out").exists()


# --- tiling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [pytest.param((400, 368), marks=pytest.mark.slow), (333, 290)])  # 19 s each
def test_tiled_logits_equal_untiled(size):
    """Windows of 320 (core 64, halo 128) on images that need up to 7x6 of them: the halo covers
    the demo model's receptive field (107 px), so every pixel, edges included, matches."""
    ckpt = load_checkpoint(DEMO_WEIGHTS)
    rule = MODELS["milesial"].sizes(ckpt.config)
    img = Image.open(DEMO_IMAGE).convert("RGB").resize(size[::-1], Image.BICUBIC)
    x = image_to_tensor(img, Preprocess(), 3)[None]
    with EagerRunner(build_model(ckpt)) as eager:
        whole = fit_and_run(eager, x, rule)
        tiled = fit_and_run(eager, x, rule, halo=128, tile=320)
    assert tiled.shape == whole.shape == (1, 3, *size)
    assert (tiled - whole).abs().max().item() < 1e-4
    assert torch.equal(tiled.argmax(1), whole.argmax(1))


def test_too_small_a_halo_shows_at_tile_edges():
    """The check above is not vacuous: a halo under the receptive field changes the logits."""
    from unet_export.predict import run_tiled

    model = build_model(load_checkpoint(DEMO_WEIGHTS))
    x = image_to_tensor(Image.open(DEMO_IMAGE).convert("RGB").resize((400, 400)), Preprocess(), 3)[None]
    with EagerRunner(model) as eager:
        diff = (run_tiled(eager, x, 160, 16) - eager.infer(x)).abs().max().item()
    assert diff > 1e-2


def test_large_image_is_tiled_in_predict(tmp_path, monkeypatch):
    """An image over TILE in either side runs in windows no larger than TILE x TILE."""
    import unet_export.inference.predictor as predict_module

    seen = []
    original = EagerRunner._infer_impl

    def spy(self, x):
        seen.append(tuple(x.shape[-2:]))
        return original(self, x)

    monkeypatch.setattr(EagerRunner, "_infer_impl", spy)
    monkeypatch.setattr(predict_module, "TILE", 320)
    Image.open(DEMO_IMAGE).convert("RGB").resize((500, 200)).save(tmp_path / "wide.png")
    (mask,) = predict(DEMO_WEIGHTS, [tmp_path / "wide.png"], tmp_path / "out")
    assert Image.open(mask).size == (500, 200)
    assert len(seen) > 1 and max(w for _, w in seen) <= 320
