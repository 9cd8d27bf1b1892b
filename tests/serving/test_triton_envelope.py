"""`unet-export triton` keeps to the envelope each served artefact was proven on (issue 28): a
--max-batch over its proven batch is refused (exit 2, one line naming it, nothing written); by
default max_batch_size is the proven batch when that is below 8; the Python model answers a size
outside it with a 400 naming it; `triton --check` sends only shapes inside it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from unet_export.cli.main import app
from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS
from unet_export.errors import UserError
from unet_export.models.sizes import SizeRule
from unet_export.parity.envelope import Box, Envelope
from unet_export.serving import check, triton_model
from unet_export.serving.repository import RECORD_NAME, write_repository
from unet_export.serving.validate import check_repository
from unet_export.workdir.manifest import transaction

runner = CliRunner()
ENVELOPE = "(batch 1-8, height 128-192, width 128-192)"  # the demo's default at export size 128: 1 to 1.5x it


@pytest.fixture(scope="module")
def demo_workdir(exports, tmp_path_factory):
    return exports.copy(tmp_path_factory.mktemp("triton-env") / "exports", DEMO_WEIGHTS, ("onnx",), 128, 128)


@pytest.fixture
def workdir(demo_workdir, tmp_path):
    return Path(shutil.copytree(demo_workdir, tmp_path / "exports"))


def prove(workdir: Path, boxes: tuple[Box, ...]) -> None:
    """Record another declared envelope for the ONNX model, as `onnx --max-batch/--largest` would."""
    with transaction(workdir) as manifest:
        for entry in manifest["artifacts"]:
            entry["envelope"]["declared"] = Envelope(SizeRule(), 3, boxes).to_dict()


def test_a_max_batch_over_the_proven_batch_exits_2_and_writes_nothing(workdir, tmp_path):
    repo = tmp_path / "out" / "repo"
    result = runner.invoke(app, ["triton", "-w", str(workdir), "--repo", str(repo), "--max-batch", "9"])
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: --max-batch 9 is more than demo_unet.onnx was proven at {ENVELOPE}: give "
                             "--max-batch 8 or less, or export it with --max-batch 9\n")  # fmt: skip
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="--max-batch 9 is more than demo_unet.onnx was proven at"):
        write_repository(workdir, repo, max_batch=9, formats="python")  # the Python model serves it too
    assert not repo.exists()
    write_repository(workdir, repo, max_batch=8)
    assert check_repository(repo)["demo_unet_onnx"].max_batch_size == 8


def test_by_default_max_batch_size_is_the_proven_batch_when_smaller(workdir, tmp_path):
    prove(workdir, (Box((1, 4), (16, 256), (16, 256)),))
    write_repository(workdir, tmp_path / "repo", with_pipeline=True, python_runtime="onnxruntime")
    configs = check_repository(tmp_path / "repo")
    assert {name: c.max_batch_size for name, c in configs.items() if not name.endswith(("process",))} == {
        "demo_unet_onnx": 4, "demo_unet_python": 4, "demo_unet_pipeline": 4}  # fmt: skip
    settings = json.loads(configs["demo_unet_python"].parameters["unet_export"].string_value)
    assert settings["envelope"] == {"boxes": [{"batch": [1, 4], "height": [16, 256], "width": [16, 256]}],
                                    "describe": "batch 1-4, height 16-256, width 16-256"}  # fmt: skip
    record = json.loads((tmp_path / "repo" / RECORD_NAME).read_text())
    assert record["models"]["demo_unet_onnx"]["artifact"]["envelope"]["boxes"][0]["batch"] == [1, 4]


def test_an_entry_without_an_envelope_keeps_max_batch_as_given(workdir, tmp_path):
    with transaction(workdir) as manifest:
        for entry in manifest["artifacts"]:
            entry.pop("envelope")
    write_repository(workdir, tmp_path / "repo", max_batch=16, formats="onnx")
    assert check_repository(tmp_path / "repo")["demo_unet_onnx"].max_batch_size == 16


def test_the_python_model_refuses_a_size_outside_the_envelope():
    envelope = {"boxes": [{"batch": [1, 8], "height": [16, 256], "width": [16, 256]},
                          {"batch": [1, 1], "height": [512, 512], "width": [640, 640]}],
                "describe": "batch 1-8, height 16-256, width 16-256 or batch 1, height 512, width 640"}  # fmt: skip
    for height, width in [(16, 16), (256, 256), (512, 640), (100, 37)]:
        assert triton_model.envelope_problem(height, width, envelope) is None
    assert triton_model.envelope_problem(257, 16, envelope) == (
        "257x16 is outside the proven envelope (batch 1-8, height 16-256, width 16-256 or batch 1, height 512, "
        "width 640)")  # fmt: skip
    assert triton_model.envelope_problem(512, 639, envelope) is not None


def test_the_check_sends_only_shapes_inside_the_envelope(tmp_path):
    proven = Envelope(SizeRule(), 3, (Box((1, 2), (64, 128), (64, 128)),)).to_dict()
    artifact = {"size_rule": {"min": 16, "multiple": 1, "offset": 0, "shrink": 0, "static": False},
                "envelope": proven}  # fmt: skip
    assert check.inside(artifact, 2, 64, 128) and not check.inside(artifact, 3, 64, 64)
    assert not check.inside(artifact, 1, 129, 64) and check.inside({**artifact, "envelope": None}, 9, 999, 999)
    assert check.smallest_side(artifact) == 64 and check.smallest_side({**artifact, "envelope": None}) == 16
    # an engine's profiles, the first one not the smallest: the least square side any of them holds
    profiles = Envelope(SizeRule(), 3, (Box((1, 1), (512, 512), (640, 640)), Box((1, 8), (96, 256), (80, 256))))
    assert check.smallest_side({**artifact, "envelope": profiles.to_dict()}) == 96
    images = sorted((DEMO_VAL / "imgs").iterdir())[:3]  # 128x128: inside
    Image.open(images[0]).resize((200, 100)).save(tmp_path / "wide.png")
    model = {"config": {"n_channels": 3}, "preprocess": None}
    assert check._inside_images([*images, tmp_path / "wide.png"], model, artifact) == images
    (batch,) = check._real_batch(images, model, artifact, limit=8)
    assert batch.shape == (2, 3, 128, 128)  # at most the proven batch of 2, not the limit's 3
    assert check._real_batch([tmp_path / "wide.png"], model, artifact, limit=8) == []
    assert isinstance(batch, torch.Tensor)
