"""predict keeps to the envelope an artefact was proven on (issue 28): a --batch-size or an image
it does not hold is refused (exit 2, one line naming it) before anything runs or is written; a
tileable model runs a larger image in tiles the envelope holds; an entry without an envelope
record runs as before (the size rule alone)."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from unet_export.cli.main import app
from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS
from unet_export.inference import predictor as predictor_module
from unet_export.parity.envelope import Envelope, Box
from unet_export.models.sizes import SizeRule
from unet_export.runtimes import OnnxRuntimeRunner
from unet_export.workdir.manifest import transaction

runner = CliRunner()
IMAGE = sorted((DEMO_VAL / "imgs").iterdir())[0]
ENVELOPE = "(batch 1-8, height 128-192, width 128-192)"  # the demo's default at export size 128


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def small(exports, tmp_path_factory):
    """The demo model's ONNX model exported at 128x128: proven at batch 1-8, sides 128-192 (the
    default: the export size to 1.5x it), too small a side for a tile (192 leaves no core inside a
    halo of 128 on each side)."""
    return exports.copy(tmp_path_factory.mktemp("env") / "exports", DEMO_WEIGHTS, ("onnx",), 128, 128)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Exported at 128x128 and proven up to 512x512, batch 1-4: tiles of 512 fit it."""
    workdir = tmp_path_factory.mktemp("env512") / "exports"
    result = cli("onnx", DEMO_WEIGHTS, "-w", workdir, "--height", 128, "--width", 128, "--largest", "512x512",
                 "--max-batch", 4, "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    return workdir


@pytest.fixture
def shapes(monkeypatch):
    """Every input shape the ONNX Runtime runner is given."""
    seen = []
    original = OnnxRuntimeRunner._infer_impl

    def spy(self, x):
        seen.append(tuple(x.shape))
        return original(self, x)

    monkeypatch.setattr(OnnxRuntimeRunner, "_infer_impl", spy)
    return seen


def image(path, width, height):
    Image.open(IMAGE).convert("RGB").resize((width, height)).save(path)
    return path


def one_line_refusal(result, *parts):
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for part in parts:
        assert part in result.stderr, result.stderr


def test_a_batch_size_over_the_proven_batch_is_refused_before_anything_runs(small, tmp_path, shapes):
    out = tmp_path / "o"
    result = cli("predict", small, IMAGE, "--out", out, "--batch-size", 9, "--report", tmp_path / "r.json")
    one_line_refusal(result, "error: --batch-size 9 is more than demo_unet.onnx was proven at " + ENVELOPE,
                     "give --batch-size 8 or less")  # fmt: skip
    assert shapes == [] and not out.exists() and not (tmp_path / "r.json").exists()
    at_most = cli("predict", small, IMAGE, "--out", out, "--batch-size", 8)
    assert at_most.exit_code == 0, at_most.output


def test_the_default_batch_is_the_proven_batch_when_that_is_smaller(wide, tree_of_five, tmp_path, shapes):
    result = cli("predict", wide, tree_of_five, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert ", batch 4, local)" in result.stdout
    assert max(s[0] for s in shapes) == 4
    refused = cli("predict", wide, tree_of_five, "--out", tmp_path / "p", "--batch-size", 8)
    one_line_refusal(refused, "(batch 1-4, height 128-512, width 128-512)", "give --batch-size 4 or less",
                     "export it with --max-batch 8")  # fmt: skip
    assert not (tmp_path / "p").exists()


@pytest.fixture
def tree_of_five(tmp_path):
    folder = tmp_path / "five"
    folder.mkdir()
    for i, src in enumerate(sorted((DEMO_VAL / "imgs").iterdir())[:5]):
        shutil.copy(src, folder / f"{i}.png")
    return folder


def test_an_image_the_envelope_cannot_hold_is_refused_before_any_mask(small, tmp_path, shapes):
    """Exported at 128: proven up to 192, where no tile fits; a 300-wide image (its height inside)
    is refused, named, with the envelope, the one side to change and the export that would prove
    it, and the other images are not run."""
    big = image(tmp_path / "big.png", 300, 160)
    out = tmp_path / "o"
    for args in ((small, IMAGE, big), (small / "demo_unet.onnx", big)):
        result = cli("predict", *args, "--out", out)
        one_line_refusal(result, f"{big}: input 1x3x160x300 is outside the proven envelope {ENVELOPE}: use width 192;",
                         "export it with --largest 192x300 to prove it")  # fmt: skip
        assert shapes == [] and not out.exists()


def test_an_image_under_the_smallest_side_is_padded_up_to_it(small, tmp_path, shapes):
    """Proven from 128: a 64x48 image is not refused; it runs padded up to the smallest proven side,
    and its mask is the image's size."""
    tiny = image(tmp_path / "tiny.png", 64, 48)
    result = cli("predict", small, tiny, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert shapes == [(1, 3, 128, 128)]
    assert Image.open(tmp_path / "o" / "tiny_mask.png").size == (64, 48)


@pytest.mark.parametrize("mode", ["throughput", "latency"])
def test_a_larger_image_runs_in_tiles_the_envelope_holds(wide, tmp_path, shapes, mode):
    """Proven up to 512: a 700x600 image runs in tiles of 512 (halo included), never whole, and its
    mask is the checkpoint's untiled one; throughput mode streams the tiles (issue 29)."""
    big = image(tmp_path / "big.png", 700, 600)
    result = cli("predict", wide, big, "--out", tmp_path / "o", "--mode", mode)
    assert result.exit_code == 0, result.output
    assert len(shapes) > 1 and all(s[0] == 1 and max(s[2:]) <= 512 for s in shapes), shapes
    eager = cli("predict", DEMO_WEIGHTS, big, "--out", tmp_path / "e", "--device", "cpu")
    assert eager.exit_code == 0, eager.output
    tiled, whole = (np.asarray(Image.open(tmp_path / d / "big_mask.png")) for d in ("o", "e"))
    assert np.array_equal(tiled, whole)


def test_a_model_that_cannot_tile_is_refused_an_image_over_the_envelope(wide, tmp_path, shapes, monkeypatch):
    """A model run whole (no TILE_HALO: ResNet, DeepLabV3, the unpadded U-Net) is refused what the
    envelope does not hold, where the tileable one tiles it."""
    monkeypatch.setattr(predictor_module, "TILE_HALO", {})
    big = image(tmp_path / "big.png", 700, 600)
    result = cli("predict", wide, big, "--out", tmp_path / "o")
    one_line_refusal(result, "input 1x3x600x700 is outside the proven envelope (batch 1-4, height 128-512, "
                     "width 128-512): use height 512, width 512", "--largest 600x700")  # fmt: skip
    assert shapes == [] and not (tmp_path / "o").exists()


def test_an_entry_without_an_envelope_runs_on_the_size_rule_alone(small, tmp_path, shapes):
    """An artefact exported before envelopes were recorded: today's behaviour, any batch and size."""
    copy = tmp_path / "exports"
    shutil.copytree(small, copy)
    with transaction(copy) as manifest:
        for entry in manifest["artifacts"]:
            entry.pop("envelope")
    big = image(tmp_path / "big.png", 300, 200)
    result = cli("predict", copy, IMAGE, big, "--out", tmp_path / "o", "--batch-size", 9)
    assert result.exit_code == 0, result.output
    assert (1, 3, 200, 300) in shapes and ", batch 9, local)" in result.stdout


def test_the_ray_path_is_refused_the_same_before_ray_starts(small, tmp_path, monkeypatch):
    """predict --ray prepares as the local run does: the refusals come before a cluster is joined."""
    import unet_export.predict.ray_data as ray_data

    monkeypatch.setattr(ray_data, "run_ray", lambda *a, **k: pytest.fail("Ray was started"))
    big = image(tmp_path / "big.png", 300, 200)
    too_big = cli("predict", small, big, "--out", tmp_path / "o", "--ray")
    one_line_refusal(too_big, f"{big}: input 1x3x200x300 is outside the proven envelope {ENVELOPE}")
    batch = cli("predict", small, IMAGE, "--out", tmp_path / "o", "--ray", "--batch-size", 16)
    one_line_refusal(batch, "--batch-size 16 is more than demo_unet.onnx was proven at " + ENVELOPE)
    assert not (tmp_path / "o").exists()


def test_every_call_stays_inside_the_envelope_whatever_reaches_the_runner():
    """The last guard (fit_and_run): a batch the envelope holds only in part runs in parts; a size
    it does not hold is refused before the runner is called."""
    calls = []

    class Echo:
        def infer(self, x):
            calls.append(tuple(x.shape))
            return x[:, :1]

    rule = SizeRule()
    two_boxes = Envelope(rule, 3, (Box((1, 2), (16, 64), (16, 64)), Box((1, 1), (16, 128), (16, 128))))
    out = predictor_module.fit_and_run(Echo(), torch.zeros(5, 3, 64, 64), rule, envelope=two_boxes)
    assert out.shape == (5, 1, 64, 64) and calls == [(2, 3, 64, 64), (2, 3, 64, 64), (1, 3, 64, 64)]
    calls.clear()
    big = predictor_module.fit_and_run(Echo(), torch.zeros(2, 3, 100, 100), rule, envelope=two_boxes)
    assert big.shape == (2, 1, 100, 100) and calls == [(1, 3, 100, 100)] * 2
    with pytest.raises(Exception, match=r"input 1x3x129x100 is outside the proven envelope"):
        predictor_module.fit_and_run(Echo(), torch.zeros(1, 3, 129, 100), rule, envelope=two_boxes)
    assert calls == [(1, 3, 100, 100)] * 2
