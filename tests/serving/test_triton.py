"""`unet-export triton|serve`: the repository writer and its checks, the pipeline's numpy steps
against predict, the tritonserver fetch; then a real Triton server (the nvidia-pytriton wheel's
tritonserver, fetched and sha256-checked once into the cache) on free 127.0.0.1 ports, started and
stopped by the tests (one `unet-export serve` shared by the serve tests), bounded in time and in
requests."""

import http.client
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException
from typer.testing import CliRunner

from tests.conftest import ignoring_sigint
from unet_export.cli.main import app
from unet_export.data.dataset import image_to_tensor, Preprocess
from unet_export.flows.demo import DEMO_WEIGHTS
from unet_export.errors import UserError
from unet_export.fileio import pid_alive, sha256_file
from unet_export.workdir.manifest import load_manifest, transaction, upsert_artifact
from unet_export.models.sizes import SizeRule
from unet_export.parity.envelope import Box, Envelope
from unet_export.runtimes.base import Runner
from unet_export.serving import install, repository, triton_model
from unet_export.serving.client import infer, make_client
from unet_export.serving.repository import RECORD_NAME, write_repository
from unet_export.serving.validate import check_repository

runner = CliRunner()
MODELS = ["demo_unet_onnx", "demo_unet_pipeline", "demo_unet_postprocess", "demo_unet_preprocess", "demo_unet_python",
          "demo_unet_torchscript"]  # fmt: skip


@pytest.fixture(scope="module")
def demo_workdir(exports, tmp_path_factory):
    """The shipped demo model exported to ONNX and TorchScript at its training size, verified
    (this module's copy of the session's export)."""
    return exports.copy(tmp_path_factory.mktemp("triton") / "exports", DEMO_WEIGHTS, ("onnx", "torchscript"), 128, 128)


@pytest.fixture
def workdir(demo_workdir, tmp_path):
    """A private copy a test may change (paths in the manifest are relative)."""
    return Path(shutil.copytree(demo_workdir, tmp_path / "exports"))


@pytest.fixture(scope="module")
def written(demo_workdir, tmp_path_factory):
    """A repository with every model kind this workdir allows, written once."""
    repo = tmp_path_factory.mktemp("written") / "repo"
    write_repository(demo_workdir, repo, with_pipeline=True, python_runtime="onnxruntime", max_batch=4, instances=2)
    return repo


def _dims(tensors) -> list:
    return [(t.name, list(t.dims)) for t in tensors]


def test_repository_from_the_verified_artefacts(written, demo_workdir):
    found = check_repository(written)
    assert sorted(found) == MODELS
    entries = {e["format"]: e for e in load_manifest(demo_workdir)["artifacts"]}
    onnx, ts, py = found["demo_unet_onnx"], found["demo_unet_torchscript"], found["demo_unet_python"]
    assert onnx.platform == "onnxruntime_onnx" and onnx.max_batch_size == 4
    assert _dims(onnx.input) == [("input", [3, -1, -1])] and _dims(onnx.output) == [("logits", [3, -1, -1])]
    assert [(g.count, g.kind) for g in onnx.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert onnx.dynamic_batching.max_queue_delay_microseconds > 0
    assert ts.platform == "pytorch_libtorch"
    assert _dims(ts.input) == [("INPUT__0", [3, -1, -1])] and _dims(ts.output) == [("OUTPUT__0", [3, -1, -1])]
    assert sha256_file(written / "demo_unet_onnx/1/model.onnx") == entries["onnx"]["sha256"]
    assert sha256_file(written / "demo_unet_torchscript/1/model.pt") == entries["torchscript"]["sha256"]
    assert sha256_file(written / "demo_unet_python/1/model.onnx") == entries["onnx"]["sha256"]
    assert py.backend == "python" and _dims(py.input) == [("input", [3, -1, -1])]
    assert py.HasField("dynamic_batching") and py.dynamic_batching.max_queue_delay_microseconds == 0  # no idle wait
    settings = json.loads(py.parameters["unet_export"].string_value)
    assert settings == {"role": "model", "runtime": "onnxruntime", "artifact": "model.onnx", "input": "input",
                        "output": "logits", "threads": 0, "precision_hint": "f32",
                        "size_rule": {"min": 16, "multiple": 1, "offset": 0, "shrink": 0},
                        "envelope": {"boxes": [{"batch": [1, 8], "height": [128, 192], "width": [128, 192]}],
                                     "describe": "batch 1-8, height 128-192, width 128-192"}}  # fmt: skip
    assert (written / "demo_unet_python/1/model.py").read_text() == Path(triton_model.__file__).read_text()
    record = json.loads((written / RECORD_NAME).read_text())
    assert record["models"]["demo_unet_onnx"]["artifact"]["sha256"] == entries["onnx"]["sha256"]


def test_pipeline_ensemble_chains_preprocess_model_postprocess(written):
    found = check_repository(written)
    ensemble = found["demo_unet_pipeline"]
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 4
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["demo_unet_preprocess", "demo_unet_python",
                                                                         "demo_unet_postprocess"]  # fmt: skip
    assert _dims(ensemble.input) == [("IMAGE", [-1, -1, 3])] and _dims(ensemble.output) == [("MASK", [-1, -1])]
    assert ensemble.input[0].data_type == ensemble.output[0].data_type == model_config_pb2.TYPE_UINT8
    post = json.loads(found["demo_unet_postprocess"].parameters["unet_export"].string_value)
    assert post["mask_values"] == [0, 128, 255] and post["preprocess"] == {"scale": 1.0, "square": None}
    assert post["threshold"] == 0.0  # the demo model's one output per class is a logit
    pre = json.loads(found["demo_unet_preprocess"].parameters["unet_export"].string_value)
    assert pre["smallest"] == post["smallest"] == [128, 128]  # padded up to the proven sides (128-192), as predict


def test_the_python_model_runs_the_faster_runtime_measured_here(workdir, tmp_path):
    result = write_repository(workdir, tmp_path / "repo", formats="python:fp32")
    timings = result.runtime.timings_ms
    assert set(timings) == {"demo_unet.onnx with onnxruntime", "demo_unet.onnx with openvino"}
    assert timings[f"demo_unet.onnx with {result.runtime.runtime}"] == min(timings.values())
    config = check_repository(tmp_path / "repo")["demo_unet_python"]
    assert json.loads(config.parameters["unet_export"].string_value)["runtime"] == result.runtime.runtime


EDITS = {
    "misspelled field": (lambda t: t.replace("max_batch_size", "max_batch_sise"), "not a valid Triton ModelConfig"),
    "bad enum": (lambda t: t.replace("KIND_CPU", "KIND_CPUS"), "not a valid Triton ModelConfig"),
    "name is not the folder": (lambda t: t.replace('name: "demo_unet_onnx"', 'name: "unet"'), "differs from its folder"),
    "wrong platform": (lambda t: t.replace('"onnxruntime_onnx"', '"onnx_runtime"'), "needs platform 'onnxruntime_onnx'"),
    "repeated batch dim": (lambda t: t.replace("  dims: 3\n", "  dims: -1\n  dims: 3\n", 1), "rank 4"),
    "fixed size": (lambda t: t.replace("dims: -1", "dims: 128", 1), "differ from the artefact's [3, -1, -1]"),
    "name not in the graph": (lambda t: t.replace('name: "input"', 'name: "image"'), "'image' is not in the artefact"),
    "GPU instances": (lambda t: t.replace("KIND_CPU", "KIND_GPU"), "instance_group must be KIND_CPU"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_hand_edited_config_is_refused(written, tmp_path, edit):
    repo = Path(shutil.copytree(written, tmp_path / "repo"))
    config = repo / "demo_unet_onnx/config.pbtxt"
    change, message = EDITS[edit]
    edited = change(config.read_text())
    assert edited != config.read_text()
    config.write_text(edited)
    with pytest.raises(UserError, match=re.escape(message)):
        check_repository(repo)


def test_a_changed_model_file_is_refused(written, tmp_path):
    repo = Path(shutil.copytree(written, tmp_path / "repo"))
    with open(repo / "demo_unet_python/1/model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(UserError, match="1/model.onnx changed since it was written"):
        check_repository(repo)


def _add_failed_fp16(workdir: Path) -> None:
    """A second ONNX entry recorded as failed (its file a copy, so only the verdict differs)."""
    shutil.copy(workdir / "demo_unet.onnx", workdir / "demo_unet.fp16.onnx")
    with transaction(workdir) as manifest:
        fp32 = next(e for e in manifest["artifacts"] if e["format"] == "onnx")
        upsert_artifact(manifest, fp32 | {"path": "demo_unet.fp16.onnx", "precision": "fp16", "status": "failed"})


def test_a_failed_artefact_is_never_published(workdir, tmp_path):
    _add_failed_fp16(workdir)
    result = write_repository(workdir, tmp_path / "repo", python_runtime="onnxruntime")
    assert result.skipped == ["demo_unet.fp16.onnx (onnx fp16): failed its parity check, not published"]
    assert not (tmp_path / "repo/demo_unet_onnx_fp16").exists()
    assert sorted(check_repository(tmp_path / "repo")) == ["demo_unet_onnx", "demo_unet_python", "demo_unet_torchscript"]
    assert result.runtime.entry["path"] == "demo_unet.onnx"


def _bad(args: list[str], fragment: str) -> None:
    result = runner.invoke(app, ["triton", *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and fragment in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, fragment", [
    (["--max-batch", "0"], "--max-batch 0: give 1..1024"),
    (["--max-batch", "5000"], "--max-batch 5000"),
    (["--instances", "0"], "--instances 0"),
    (["--formats", "onnx,bogus"], "unknown format 'bogus'"),
    (["--formats", "tensorrt"], "--formats tensorrt: no such artefact"),
    (["--formats", "onnx:fp16"], "demo_unet.fp16.onnx failed its parity check"),
    (["--python-runtime", "tvm"], "choose auto, onnxruntime or openvino"),
    (["--name", "my model"], "--name 'my model'"),
])  # fmt: skip
def test_bad_options_exit_2_and_write_nothing(workdir, tmp_path, args, fragment):
    _add_failed_fp16(workdir)
    repo = tmp_path / "out" / "repo"
    _bad(["-w", str(workdir), "--repo", str(repo), *args], fragment)
    assert not (tmp_path / "out").exists()


def test_no_manifest_exits_2(tmp_path):
    _bad(["-w", str(tmp_path / "empty"), "--repo", str(tmp_path / "repo")], "no manifest with a model")
    assert not (tmp_path / "repo").exists() and not (tmp_path / "empty").exists()


def test_a_repo_path_that_is_a_file_or_a_foreign_folder_is_refused(workdir, tmp_path):
    (tmp_path / "file").write_text("mine")
    _bad(["-w", str(workdir), "--repo", str(tmp_path / "file")], "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs/notes.txt").write_text("keep")
    _bad(["-w", str(workdir), "--repo", str(tmp_path / "theirs")], "that unet-export did not write")
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == ["notes.txt"]


def test_rewriting_replaces_only_our_own_repository(workdir, tmp_path):
    repo = tmp_path / "repo"
    write_repository(workdir, repo, formats="onnx")
    write_repository(workdir, repo, formats="torchscript")
    assert sorted(p.name for p in repo.iterdir()) == ["demo_unet_torchscript", RECORD_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "repo"]  # no temp or old folder left


def _engine_entry(workdir: Path, profiles: list[dict] | None = None) -> dict:
    """A TensorRT entry as `unet-export trt` records it; the file is a stand-in (no GPU here):
    the config is built from the record, never by reading the engine."""
    engine = workdir / "demo_unet.fp16.engine"
    engine.write_bytes(b"stand-in for a serialised engine")
    onnx = next(e for e in load_manifest(workdir)["artifacts"] if e["format"] == "onnx")
    entry = {k: onnx[k] for k in ("inputs", "outputs", "dynamic_axes", "export_size", "size_rule", "parity")} | {
        "format": "tensorrt", "path": engine.name, "precision": "fp16", "status": "verified",
        "bytes": engine.stat().st_size, "sha256": sha256_file(engine), "tensorrt_version": "10.13.0",
        "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
        "profile": {"min": [1, 3, 128, 128], "opt": [2, 3, 128, 128], "max": [4, 3, 128, 128]}}  # fmt: skip
    if profiles:
        entry |= {"profiles": profiles, "profile": profiles[0]}
    with transaction(workdir) as manifest:
        upsert_artifact(manifest, entry)
    return entry


def test_tensorrt_config_stays_inside_the_engine_profile(workdir, tmp_path):
    entry = _engine_entry(workdir)
    result = write_repository(workdir, tmp_path / "repo", formats="tensorrt", max_batch=8)
    config = check_repository(tmp_path / "repo")["demo_unet_tensorrt_fp16"]
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
    assert _dims(config.input) == [("input", [3, 128, 128])] and _dims(config.output) == [("logits", [3, -1, -1])]
    assert dict(config.cc_model_filenames) == {"9.0": "model.sm90.plan"}
    assert sha256_file(tmp_path / "repo/demo_unet_tensorrt_fp16/1/model.sm90.plan") == entry["sha256"]
    assert any("the engine profile's max batch; --max-batch 8 asked" in n for n in result.plans[0].notes)
    path = tmp_path / "repo/demo_unet_tensorrt_fp16/config.pbtxt"
    path.write_text(path.read_text().replace("max_batch_size: 4", "max_batch_size: 8"))
    with pytest.raises(UserError, match="max_batch_size 8 exceeds the engine profile's max batch 4"):
        check_repository(tmp_path / "repo")


def test_tensorrt_config_of_an_engine_with_several_profiles(workdir, tmp_path):
    """Batch 1 at 128..256 and batch 8 at 128x128: max_batch_size is the largest profile's max batch
    (never --max-batch beyond it), H and W free where the profiles differ, every profile offered to
    the instance group (Triton otherwise uses profile 0 alone)."""
    interactive = {"min": [1, 3, 128, 128], "opt": [1, 3, 128, 128], "max": [1, 3, 256, 256]}
    batch8 = {"min": [8, 3, 128, 128], "opt": [8, 3, 128, 128], "max": [8, 3, 128, 128]}
    _engine_entry(workdir, [interactive, batch8])
    result = write_repository(workdir, tmp_path / "repo", formats="tensorrt", max_batch=16)
    config = check_repository(tmp_path / "repo")["demo_unet_tensorrt_fp16"]
    assert config.max_batch_size == 8 and _dims(config.input) == [("input", [3, -1, -1])]
    assert [list(g.profile) for g in config.instance_group] == [["0", "1"]]
    notes = result.plans[0].notes
    assert any("the engine profile's max batch; --max-batch 16 asked" in n for n in notes)
    assert any(n.startswith("2 optimisation profiles (1x3x128x128..1x3x256x256 or 8x3x128x128..8x3x128x128)")
               for n in notes)  # fmt: skip
    one = write_repository(workdir, tmp_path / "small", formats="tensorrt", max_batch=4)
    assert check_repository(tmp_path / "small")["demo_unet_tensorrt_fp16"].max_batch_size == 4
    assert "max_batch_size 8" not in " ".join(one.plans[0].notes)


def test_openvino_ir_is_served_by_the_openvino_backend_with_its_weights(exports, tmp_path):
    """The demo workdir with its FP32 IR exported after the ONNX model and TorchScript."""
    workdir = exports.copy(tmp_path / "exports", DEMO_WEIGHTS, ("onnx", "torchscript", "openvino"), 128, 128)
    entry = next(e for e in load_manifest(workdir)["artifacts"] if e["format"] == "openvino")
    write_repository(workdir, tmp_path / "repo", formats="openvino,python:fp32", python_runtime="openvino")
    found = check_repository(tmp_path / "repo")
    config = found["demo_unet_openvino"]
    assert config.backend == "openvino" and not config.platform and config.max_batch_size == 8
    assert _dims(config.input) == [("input", [3, -1, -1])] and _dims(config.output) == [("logits", [3, -1, -1])]
    assert sha256_file(tmp_path / "repo/demo_unet_openvino/1/model.xml") == entry["sha256"]
    assert sha256_file(tmp_path / "repo/demo_unet_openvino/1/model.bin") == entry["weights"]["sha256"]
    config_path = tmp_path / "repo/demo_unet_openvino/config.pbtxt"
    config_path.write_text(config_path.read_text().replace('name: "logits"', 'name: "output"'))
    with pytest.raises(UserError, match="output 'output' is not in the artefact"):  # the IR itself was read
        check_repository(tmp_path / "repo")


class _Linear(Runner):
    """A stand-in model: a fixed 1x1 convolution to 3 classes, cropped by ``shrink`` like an
    unpadded U-Net; records what it was given."""

    name = "linear"

    def __init__(self, shrink: int = 0):
        super().__init__("cpu")
        self.shrink, self.seen = shrink, []
        self.weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))

    def _activate_impl(self) -> None:
        pass

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        y, s = torch.einsum("oc,nchw->nohw", self.weight, x), self.shrink // 2
        return y[..., s : y.shape[-2] - s, s : y.shape[-1] - s] if s else y


@pytest.mark.parametrize("pp, rule, smallest", [
    ({"scale": 1.0, "square": None}, {"min": 16, "multiple": 1, "offset": 0, "shrink": 0}, None),
    ({"scale": 0.5, "square": None}, {"min": 16, "multiple": 16, "offset": 0, "shrink": 0}, None),
    ({"scale": 1.0, "square": 96}, {"min": 16, "multiple": 32, "offset": 0, "shrink": 0}, None),
    ({"scale": 1.0, "square": None}, {"min": 188, "multiple": 16, "offset": 124, "shrink": 184}, None),
    # an envelope proven from sides larger than the image: padded up to them, as predict pads it
    ({"scale": 1.0, "square": None}, {"min": 16, "multiple": 1, "offset": 0, "shrink": 0}, [128, 144]),
    ({"scale": 1.0, "square": None}, {"min": 188, "multiple": 16, "offset": 124, "shrink": 184}, [332, 348]),
])  # fmt: skip
def test_pipeline_steps_match_predict(tmp_path, pp, rule, smallest):
    """The standalone numpy pre/postprocessing the served pipeline runs gives predict's input and mask."""
    from unet_export.predict import Predictor, predict_classes

    image = np.random.default_rng(0).integers(0, 256, (75, 130, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    model = _Linear(rule["shrink"])
    proven = smallest and Envelope(SizeRule(**rule), 3, (Box((1, 8), (smallest[0], 400), (smallest[1], 400)),))
    with model:
        predictor = Predictor(model, [0, 1, 2], Preprocess(**pp), SizeRule(**rule), envelope=proven or None)
        expected, _ = predict_classes(predictor, tmp_path / "image.png")
    settings = {"preprocess": pp, "size_rule": rule} | ({"smallest": smallest} if smallest else {})
    x, sizes = triton_model.preprocess_batch(image[None], settings)
    assert x.shape[-2:] == model.seen[0].shape[-2:] and (not smallest or list(x.shape[-2:]) == smallest)
    assert torch.allclose(torch.from_numpy(x), model.seen[0], atol=1e-6)
    assert sizes.tolist() == [[75, 130, *image_to_tensor(Image.fromarray(image), Preprocess(**pp)).shape[1:]]]
    with model:
        logits = model.infer(torch.from_numpy(x)).numpy()
    classes = triton_model.classes_of(logits[0], sizes[0], settings)
    assert classes.shape == (75, 130) and (classes != expected).mean() < 1e-3


ANY_SIZE = {"min": 1, "multiple": 1, "offset": 0, "shrink": 0}


def test_postprocess_decides_one_class_at_the_recorded_threshold():
    """A sigmoid output is class 1 above 0.5; a repository written before the threshold was
    recorded holds logits, class 1 above 0."""
    probs = np.array([[[0.2, 0.6], [0.4, 0.9]]], dtype=np.float32)
    settings, size = {"preprocess": {"scale": 1.0, "square": None}, "size_rule": ANY_SIZE}, np.array([2, 2, 2, 2])
    assert triton_model.classes_of(probs, size, settings | {"threshold": 0.5}).tolist() == [[0, 1], [0, 1]]
    assert triton_model.classes_of(probs, size, settings).tolist() == [[1, 1], [1, 1]]
    logits = np.array([[[-1.0, 0.5]], [[0.0, 2.0]]], dtype=np.float32)  # two classes: argmax, any threshold
    assert triton_model.classes_of(logits, np.array([1, 2, 1, 2]), settings | {"threshold": 0.5}).tolist() == [[1, 1]]


def test_pipeline_postprocess_records_a_sigmoid_models_threshold():
    from unet_export.serving import configs
    from unet_export.serving.ensemble import pipeline_plans
    from unet_export.serving.plan import ModelPlan

    inputs = [{"name": "input", "dtype": "FP32", "dims": [3, -1, -1]}]
    outputs = [{"name": "output", "dtype": "FP32", "dims": [1, -1, -1]}]
    model = ModelPlan("m_python", "python", configs.new_config("m_python", configs.PYTHON, 4, inputs, outputs), {},
                      {"artifact": {"size_rule": ANY_SIZE | {"static": False}}})  # fmt: skip
    config = {"n_channels": 3, "n_classes": 1, "width": 4, "transpose": False, "sigmoid": True}  # reflect-sigmoid's
    plans = pipeline_plans([model], {"model": {"config": config}}, "m", 1)
    post = next(p for p in plans if p.kind == "postprocess")
    assert json.loads(post.config.parameters["unet_export"].string_value)["threshold"] == 0.5


IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.mark.parametrize("pp", [
    {"scale": 1.0, "square": None}, {"scale": 0.5, "square": None}, {"scale": 1.0, "square": 96},
    {"scale": 1.0, "square": None, **IMAGENET, "bgr": False, "source": "smp's smp-hub/resnet34.imagenet config"},
    {"scale": 0.5, "square": None, **IMAGENET, "bgr": True}, {"scale": 1.0, "square": 96, **IMAGENET, "bgr": False},
    {"scale": 1.0, "square": None, "mean": None, "std": None, "bgr": True},
])  # fmt: skip
def test_the_served_preprocessing_is_image_to_tensor_to_the_bit(pp):
    """triton_model cannot import unet_export: its copy of the resize, /255, BGR flip and mean/std
    must give exactly the values predict feeds the model."""
    image = np.random.default_rng(1).integers(0, 256, (75, 130, 3), dtype=np.uint8)
    expected = image_to_tensor(Image.fromarray(image), Preprocess.from_dict(pp)).numpy()
    assert np.array_equal(triton_model.prepare_image(image, pp), expected)


def test_the_served_preprocessing_of_a_grey_model_is_image_to_tensor_to_the_bit():
    grey = np.random.default_rng(2).integers(0, 256, (40, 30), dtype=np.uint8)
    pp = {"scale": 1.0, "square": None, "mean": [0.45], "std": [0.226], "bgr": False}
    expected = image_to_tensor(Image.fromarray(grey, mode="L"), Preprocess.from_dict(pp), 1).numpy()
    assert np.array_equal(triton_model.prepare_image(grey[..., None], pp), expected)
    with pytest.raises(ValueError, match="have 3 values but the image has 1 channel"):  # an error response
        triton_model.prepare_image(grey[..., None], {"scale": 1.0, **IMAGENET})


def test_the_pipeline_carries_the_models_mean_std_and_refuses_ones_that_do_not_fit(workdir, tmp_path):
    record = {"scale": 1.0, "square": None, **IMAGENET, "bgr": True, "source": "where it came from"}
    with transaction(workdir) as manifest:
        manifest["model"]["preprocess"] = record
    write_repository(workdir, tmp_path / "repo", with_pipeline=True, python_runtime="onnxruntime", max_batch=2)
    found = check_repository(tmp_path / "repo")
    for step in ("demo_unet_preprocess", "demo_unet_postprocess"):
        settings = json.loads(found[step].parameters["unet_export"].string_value)
        assert settings["preprocess"] == {k: v for k, v in record.items() if k != "source"}
    with transaction(workdir) as manifest:
        manifest["model"]["preprocess"] = {"scale": 1.0, "square": None, "mean": [0.5], "std": [0.2]}
    with pytest.raises(UserError, match=r"^the manifest's preprocess mean/std have 1 values but the model takes 3 "):
        write_repository(workdir, tmp_path / "repo2", with_pipeline=True, python_runtime="onnxruntime", max_batch=2)
    assert not (tmp_path / "repo2").exists()


@pytest.mark.parametrize("size, out", [((7, 9), (16, 5)), ((128, 128), (75, 130)), ((33, 20), (33, 20))])
def test_numpy_bilinear_is_torch_interpolate(size, out):
    x = torch.rand(3, *size, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.interpolate(x[None], out, mode="bilinear")[0]
    assert torch.allclose(torch.from_numpy(triton_model.resize_bilinear(x.numpy(), *out)), expected, atol=1e-5)


@pytest.mark.parametrize("rule", [SizeRule(), SizeRule(multiple=16), SizeRule(min=188, multiple=16, offset=124, shrink=184)])
def test_numpy_size_rule_is_the_library_one(rule):
    as_dict = rule.to_dict()
    assert [triton_model.at_least(n, as_dict) for n in range(1, 700)] == [rule.at_least(n) for n in range(1, 700)]


@pytest.mark.parametrize("rule", [SizeRule(), SizeRule(multiple=16), SizeRule(min=188, multiple=16, offset=124, shrink=184)])
def test_the_served_models_size_refusal_is_the_library_ones(rule):
    as_dict = rule.to_dict()
    for height, width in [(h, 33) for h in range(0, 260)] + [(200, w) for w in range(0, 260)]:
        try:
            rule.check(height, width)
            expected = None
        except UserError as exc:
            expected = str(exc)
        assert triton_model.size_problem(height, width, as_dict) == expected


class _Stub:
    """What the 2.51 Python-backend stub does with an output tensor (python_backend
    src/pb_tensor.cc, FromDLPackCapsule): read the capsule, rename it "used_dlpack", keep the
    tensor (here: the capsule's managed tensor is never freed, as the stub frees it later)."""

    class Tensor:
        @staticmethod
        def from_dlpack(name, capsule):
            import ctypes

            get = ctypes.pythonapi.PyCapsule_GetPointer
            get.argtypes, get.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_void_p
            assert get(capsule, b"dltensor")
            _Stub.name = ctypes.c_char_p(b"used_dlpack")  # kept alive: the capsule keeps the pointer
            rename = ctypes.pythonapi.PyCapsule_SetName
            rename.argtypes = [ctypes.py_object, ctypes.c_char_p]
            rename(capsule, _Stub.name)
            return name


def test_outputs_are_handed_to_the_stub_without_an_error_per_tensor(monkeypatch):
    """Regression: numpy's capsule destructor met the stub's "used_dlpack" name and printed
    `PyCapsule_GetPointer called with incorrect name` with a traceback for every output tensor."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    for _ in range(3):
        assert triton_model.to_triton(_Stub, "logits", array) == "logits"
    assert [str(u.exc_value) for u in unraisable] == []
    assert array.tolist() == np.arange(12, dtype=np.float32).reshape(3, 4).tolist()  # untouched, still owned


def _wheel(tmp_path: Path, members: dict[str, int]) -> Path:
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, mode in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            archive.writestr(info, b"#!/bin/sh\n")
    return wheel


def test_the_wheel_is_checked_and_only_the_server_is_extracted(tmp_path):
    wheel = _wheel(tmp_path, {"pytriton/tritonserver/bin/tritonserver": 0o777, "pytriton/__init__.py": 0o644,
                              "nvidia_pytriton.libs/libx.so": 0o644})  # fmt: skip
    with pytest.raises(UserError, match="not the recorded .* refusing to run it"):
        install.verify_wheel(wheel)
    install.verify_wheel(wheel, sha256_file(wheel))
    install.extract_server(wheel, tmp_path / "out")
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["nvidia_pytriton.libs/libx.so", "pytriton/tritonserver/bin/tritonserver"]
    assert stat.S_IMODE((tmp_path / "out/pytriton/tritonserver/bin/tritonserver").stat().st_mode) == 0o755
    evil = _wheel(tmp_path, {"nvidia_pytriton.libs/../../evil": 0o644})
    with pytest.raises(UserError, match="escapes the extraction folder"):
        install.extract_server(evil, tmp_path / "out2")


def test_an_unreachable_registry_is_one_line_and_exit_2(written, tmp_path, monkeypatch):
    monkeypatch.setenv(install.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(install.BINARY_ENV, raising=False)
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for nvidia-pytriton==0.7.0")
    monkeypatch.setattr(install.subprocess, "run", lambda *a, **k: failed)
    result = runner.invoke(app, ["serve", "--repo", str(written)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "cannot fetch nvidia-pytriton 0.7.0" in result.stderr and "No matching distribution" in result.stderr
    assert "--tritonserver PATH" in result.stderr
    assert not list((tmp_path / "cache").glob("tritonserver-*"))


def test_an_existing_triton_install_is_used_as_it_is(tmp_path, monkeypatch):
    home = tmp_path / "tritonserver"
    (home / "bin").mkdir(parents=True)
    (home / "backends/python").mkdir(parents=True)
    (home / "backends/onnxruntime").mkdir()
    (home / "backends/python/triton_python_backend_stub").write_text("")
    binary = home / "bin/tritonserver"
    binary.write_text("#!/bin/sh\n")
    with pytest.raises(UserError, match="is not an executable file"):
        install.locate_tritonserver(binary)
    binary.chmod(0o755)
    monkeypatch.setenv(install.BINARY_ENV, str(binary))
    found = install.locate_tritonserver()
    assert found.backend_dir == home.resolve() / "backends" and found.backends == {"python", "onnxruntime"}


class _Exits:
    """A stand-in server process: running for ``polls`` polls, then killed by SIGABRT."""

    def __init__(self, pid: int, polls: int):
        self.pid, self.polls, self.returncode = pid, polls, None

    def poll(self):
        self.polls -= 1
        if self.polls < 0:
            self.returncode = -signal.SIGABRT
        return self.returncode


class _CrashingServer:
    """What keep_serving uses of a TritonServer; run i (pid 100 + i) lives ``polls[i]`` polls."""

    models, log_path, started_in = ["demo_unet_python"], Path("/tmp/x/tritonserver.log"), 2.0

    def __init__(self, polls: list[int]):
        self.polls, self.proc = polls, _Exits(100, polls[0])

    def exit_reason(self) -> str:
        return "killed by SIGABRT (terminate called after throwing an instance of 'std::bad_alloc')"

    def restart(self):
        pid = self.proc.pid + 1
        self.proc = _Exits(pid, self.polls[pid - 100])
        return self


def test_a_server_that_exits_is_restarted_with_a_growing_wait_that_resets_once_it_ran():
    """Quick crashes wait 0.5, 1, 2, 4, 4 s; one that served STABLE_S first waits 0.5 s again."""
    from unet_export.serving import server as server_module

    now, said = [0.0], []

    def sleep(seconds: float) -> None:
        now[0] += seconds

    def say(line: str) -> None:
        said.append(line)
        if sum("exited on its own" in line for line in said) == 7:
            raise KeyboardInterrupt  # Ctrl-C

    a_minute = int(server_module.STABLE_S / 0.5)  # polls of 0.5 s
    with pytest.raises(KeyboardInterrupt):
        server_module.keep_serving(_CrashingServer([0, 0, 0, 0, 0, a_minute, 0]), say, clock=lambda: now[0],
                                   sleep=sleep)  # fmt: skip
    exits = [line for line in said if "exited on its own" in line]
    assert exits[0] == ("tritonserver (pid 100) exited on its own: killed by SIGABRT (terminate called after "
                        "throwing an instance of 'std::bad_alloc'); restarting in 0.5 s (log: /tmp/x/tritonserver.log)")  # fmt: skip
    assert [re.search(r"restarting in (\S+) s", line).group(1) for line in exits] == ["0.5", "1", "2", "4", "4", "0.5",
                                                                                      "1"]  # fmt: skip
    assert [line for line in said if "restarted" in line] == [
        f"tritonserver restarted (pid {pid}) in 2.0 s, serving demo_unet_python" for pid in range(101, 107)]


def _fake_tritonserver(tmp_path: Path, help_text: str) -> install.TritonInstall:
    home = tmp_path / "tritonserver"
    (home / "bin").mkdir(parents=True)
    (home / "backends/python").mkdir(parents=True)
    (home / "backends/python/triton_python_backend_stub").write_text("")
    binary = home / "bin/tritonserver"
    binary.write_text(f"#!/bin/sh\ncat <<'EOF'\n{help_text}\nEOF\nexit 1\n")
    binary.chmod(0o755)
    return install.locate_tritonserver(binary)


def test_the_input_limit_is_passed_where_the_server_has_the_option(written, tmp_path):
    """tritonserver 2.51 has no option bounding a request's input; later releases have
    --http-max-input-size, which refuses the 120 GB request before allocating it."""
    from unet_export.serving.server import TritonServer, max_input_bytes

    found = check_repository(written)
    limit = max_input_bytes(found, ["demo_unet_python", "demo_unet_pipeline"])
    assert limit == 4 * 3 * 50_000_000 * 4  # max batch 4, FP32 3xHxW at the 50 MP every command allows
    assert max_input_bytes(found, ["demo_unet_postprocess"]) == 4 * (3 * 50_000_000 * 4 + 4 * 4)
    old = _fake_tritonserver(tmp_path / "old", "  --http-port <integer>\n\tThe port.")
    new = _fake_tritonserver(tmp_path / "new", "  --http-port <integer>\n  --http-max-input-size <integer>\n\tMax.")
    assert not any("max-input" in a for a in TritonServer(old, written, max_input_bytes=limit).command())
    assert f"--http-max-input-size={limit}" in TritonServer(new, written, max_input_bytes=limit).command()


# --- a real server -------------------------------------------------------------------------


# tritonserver: tests/serving/conftest.py


def test_triton_check_serves_the_repository_and_matches_eager(tritonserver, workdir, tmp_path):
    repo = tmp_path / "repo"
    args = ["triton", "-w", str(workdir), "--repo", str(repo), "--with-pipeline", "--check", "--clients", "4",
            "--requests", "10", "--python-runtime", "onnxruntime"]  # fmt: skip
    result = runner.invoke(app, args)
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "not served here demo_unet_onnx: backend 'onnxruntime' is not in this Triton build" in out
    passing = r"demo_unet_python │ (?:http|grpc) │ \S+ │ \S+ │ \S+ │ \S+ │ pass"
    # 7 inputs x 2 protocols: the envelope's 6 probes at export size 128 (sides 128-192: the export
    # size, which is also the smallest corner, the largest, tall, wide, non-square, batch 8 at the
    # smallest corner), seeded, and 1 batch of 4 real images
    assert len(re.findall(passing, out)) == 14, out
    inputs = ["1x3x128x128", "1x3x192x192", "1x3x192x128", "1x3x128x192", "1x3x129x161", "8x3x128x128", "4x3x128x128"]
    for protocol in ("http", "grpc"):
        assert re.findall(rf"demo_unet_python │ {protocol} │ (\S+) │ \S+ │ \S+ │ \S+ │ pass", out) == inputs, out
    for protocol in ("http", "grpc"):  # 8 images of 128x128, every pixel's value as predict's
        assert f"demo_unet_pipeline │ {protocol} │ 8 │ 131072 │ 0 │ 0 │ 1.000000 │ pass" in out, out
    assert "batch-size must be <= 8 for 'demo_unet_python'" in out and "then answered a valid request: pass" in out, out
    assert "40/40 answered, 0 mismatched" in out and "served models match eager" in out, out
    assert out.rstrip().endswith("served models match eager: checked 2 of 4 models (demo_unet_python, "
                                 "demo_unet_pipeline); not checked here: demo_unet_onnx (not served), "
                                 "demo_unet_torchscript (not served)"), out  # fmt: skip
    pairs = re.search(r"executions\) ((?:\d+: \d+(?:, )?)+)", out).group(1).split(", ")
    formed = dict(map(int, pair.split(": ")) for pair in pairs)
    assert sum(size * count for size, count in formed.items()) == 40, out  # every request, in the batch it rode in
    pid = int(re.search(r"pid (\d+)", out).group(1))
    assert not pid_alive(pid)


def test_triton_check_counts_what_it_really_checked(tritonserver, exports, tmp_path):
    """Issue 24: on a plain checkpoint (no training sidecar, so no real images) `--check` ended with
    "served models match eager" though 3 of 4 models were not checked. Its last line now counts."""
    weights = exports.checkpoint("weights.pth", write=lambda path: shutil.copy(DEMO_WEIGHTS, path))  # no sidecar
    exports.copy(tmp_path / "w", weights, ("onnx", "torchscript"), 128, 128)
    args = ["triton", "-w", str(tmp_path / "w"), "--repo", str(tmp_path / "repo"), "--with-pipeline", "--check",
            "--clients", "2", "--requests", "3", "--python-runtime", "onnxruntime"]  # fmt: skip
    result = runner.invoke(app, args)
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "not checked here weights_pipeline: not judged here: a pipeline is checked on real images" in out, out
    assert out.rstrip().endswith("served models match eager: checked 1 of 4 models (weights_python); not checked "
                                 "here: weights_onnx (not served), weights_torchscript (not served), weights_pipeline "
                                 "(no real images)"), out  # fmt: skip


def test_a_served_model_that_differs_from_eager_fails_the_check(tritonserver, workdir, tmp_path, monkeypatch):
    tampered = tmp_path / "model.py"
    source = Path(triton_model.__file__).read_text()
    tampered.write_text(source.replace("logits = self.run(batch)", "logits = self.run(batch) * 1.001"))
    assert tampered.read_text() != source
    monkeypatch.setattr(repository, "MODEL_SOURCE", tampered)
    args = ["triton", "-w", str(workdir), "--repo", str(tmp_path / "repo"), "--formats", "python", "--check",
            "--clients", "2", "--requests", "3", "--python-runtime", "onnxruntime"]  # fmt: skip
    result = runner.invoke(app, args)
    out = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "6/6 answered, 6 mismatched" in out


class _Serve:
    """`unet-export serve` in a child process started as `cmd &` in a script starts it (SIGINT
    ignored); a thread collects its output so a test waits for a line with a deadline."""

    def __init__(self, repo: Path):
        env = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.proc = subprocess.Popen([sys.executable, "-m", "unet_export", "serve", "--repo", str(repo)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=ignoring_sigint)  # fmt: skip
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    @property
    def output(self) -> str:
        with self.changed:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        with self.changed:
            if not self.changed.wait_for(lambda: re.search(pattern, "".join(self.lines)), timeout):
                raise AssertionError(f"no {pattern!r} within {timeout} s: {''.join(self.lines)}")
            return re.search(pattern, "".join(self.lines))

    def stop(self) -> None:
        """Ctrl-C (serve removes its server's log folder), SIGKILL if that hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def serving(tritonserver, written):
    """One `unet-export serve` of the written repository for the server tests below; the last
    of them stops it with Ctrl-C."""
    serve = _Serve(written)
    try:
        serve.wait_for("Ctrl-C stops it", timeout=180)
        serve.url = re.search(r"HTTP\s+(http://127\.0\.0\.1:\d+)/", serve.output).group(1)
        serve.grpc = re.search(r"gRPC\s+(127\.0\.0\.1:\d+)", serve.output).group(1)
        serve.log = Path(re.search(r"log\s+(\S+tritonserver\.log)", serve.output).group(1))
        yield serve
    finally:
        serve.stop()


def _infer_json(url: str, model: str, name: str, array: np.ndarray, shape: list | None = None,
                timeout: float = 60) -> tuple[int, dict]:  # fmt: skip
    """(HTTP status, JSON body) of one KServe v2 JSON request; ``shape`` may claim another shape."""
    datatype = {"float32": "FP32", "uint8": "UINT8"}[array.dtype.name]
    body = {"inputs": [{"name": name, "shape": shape or list(array.shape), "datatype": datatype,
                        "data": array.ravel().tolist()}]}  # fmt: skip
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _eager_logits(workdir: Path, x: np.ndarray) -> np.ndarray:
    from unet_export.api import manifest_checkpoint
    from unet_export.checkpoint import build_model

    net = build_model(manifest_checkpoint(load_manifest(workdir))).eval()
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def _assert_served_like_eager(url: str, demo_workdir: Path, seed: int) -> None:
    x = np.random.default_rng(seed).random((1, 3, 136, 176), dtype=np.float32)  # inside the envelope, not its probes
    status, body = _infer_json(url, "demo_unet_python", "input", x)
    assert status == 200, body
    (output,) = body["outputs"]
    served = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    expected = _eager_logits(demo_workdir, x)
    assert served.shape == expected.shape == (1, 3, 136, 176)
    np.testing.assert_allclose(served, expected, atol=1e-4, rtol=1e-4)


def test_good_requests_leave_no_traceback_in_the_server_log(serving, demo_workdir):
    """Regression: every answered request of the Python model logged `pb.Tensor.from_dlpack ...
    PyCapsule_GetPointer called with incorrect name` (the stub renames a consumed capsule
    "used_dlpack", numpy's deleter knows only the DLPack spec's "used_dltensor")."""
    for seed in range(3):
        _assert_served_like_eager(serving.url, demo_workdir, seed)
    image = np.random.default_rng(0).integers(0, 256, (1, 40, 56, 3), dtype=np.uint8)
    status, body = _infer_json(serving.url, "demo_unet_pipeline", "IMAGE", image)
    assert status == 200 and body["outputs"][0]["shape"] == [1, 40, 56], body
    assert set(body["outputs"][0]["data"]) <= {0, 128, 255}
    log = serving.log.read_text(errors="replace")
    assert "HTTPService" in log  # the log of this server, written while it served
    assert "Traceback" not in log and "PyCapsule" not in log, log[-3000:]


@pytest.mark.parametrize("shape", [[1, 3, 0, 0], [1, 3, 8, 8], [1, 3, 16, 0]])
def test_an_empty_or_too_small_input_is_a_400_naming_the_size_rule(serving, shape):
    x = np.full(shape, 0.5, dtype=np.float32)
    status, body = _infer_json(serving.url, "demo_unet_python", "input", x)
    side = "height" if shape[2] < 16 else "width"
    assert status == 400, body
    assert f"{side} {shape[2] if side == 'height' else shape[3]} does not fit this model (at least 16): use 16" in \
        body["error"], body  # fmt: skip
    client = make_client("grpc", serving.grpc)
    try:
        with pytest.raises(InferenceServerException, match="does not fit this model") as caught:
            infer(client, "grpc", "demo_unet_python", {"input": x}, ["logits"], timeout_s=30)
    finally:
        client.close()
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_an_empty_image_to_the_pipeline_is_a_400(serving):
    status, body = _infer_json(serving.url, "demo_unet_pipeline", "IMAGE", np.zeros((1, 0, 20, 3), dtype=np.uint8))
    assert status == 400 and "empty image" in body["error"], body


def test_one_hostile_request_cannot_stop_the_service(serving, demo_workdir):
    """Issue 24: shape [1,3,100000,100000] with one element made tritonserver 2.51 allocate
    120 GB and abort, and `serve` exited 2. Now: refused, or the server is restarted on the same
    ports within seconds, and the next good request is answered exactly."""
    old_pid = int(re.findall(r"pid (\d+)", serving.output)[-1])
    try:
        status, body = _infer_json(serving.url, "demo_unet_python", "input", np.ones(1, np.float32),
                                   shape=[1, 3, 100000, 100000], timeout=60)  # fmt: skip
        assert status in (400, 413), body  # a server with an input limit refuses it
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
        match = serving.wait_for(r"tritonserver restarted \(pid (\d+)\)", timeout=60)  # the 2.51 build aborts
        assert f"tritonserver (pid {old_pid}) exited on its own: killed by SIGABRT" in serving.output
        assert int(match.group(1)) != old_pid and not pid_alive(old_pid)
    assert serving.proc.poll() is None, serving.output
    _assert_served_like_eager(serving.url, demo_workdir, seed=7)


def test_serve_runs_until_ctrl_c(serving):
    """Started as `cmd &` in a script starts it (SIGINT ignored), Ctrl-C still stops it."""
    out = serving.output
    assert "not loaded demo_unet_onnx" in out and "not loaded demo_unet_torchscript" in out
    server_pid = int(re.findall(r"pid (\d+)", out)[-1])
    for model in ("demo_unet_python", "demo_unet_pipeline"):
        with urllib.request.urlopen(f"{serving.url}/v2/models/{model}/ready", timeout=10) as response:
            assert response.status == 200
    serving.proc.send_signal(signal.SIGINT)
    try:
        code = serving.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        code = f"still running 90 s after SIGINT; it printed: {serving.output}"
    assert code == 0, code
    serving.wait_for("stopping tritonserver", timeout=10)
    assert not pid_alive(server_pid)
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"{serving.url}/v2/health/live", timeout=5)


def test_the_python_model_serves_fp32_unless_asked():
    """Regression: with an INT8 IR in the workdir (as `make demo` leaves it), the Python model
    picked it as the fastest and `triton --check` failed it on seeded noise (3.9% of pixels).
    The default served model is the exact one; INT8 is chosen only with `--formats python:int8`."""
    from unet_export.serving.selection import cpu_candidates

    entries = [{"format": "onnx", "precision": "fp32", "status": "verified", "path": "m.onnx"},
               {"format": "openvino", "precision": "int8", "status": "verified", "path": "m.int8.xml"},
               {"format": "onnx", "precision": "int8", "status": "verified", "path": "m.int8.onnx"}]  # fmt: skip
    manifest = {"artifacts": entries}
    assert {e["precision"] for e, _ in cpu_candidates(manifest)} == {"fp32"}
    assert {e["path"] for e, _ in cpu_candidates(manifest, precision="int8")} >= {"m.int8.onnx"}


# Issue 15: a rough edge a new user hit, reproduced before it was fixed (was tests/test_rough_edges.py).


@pytest.fixture(scope="module")
def onnx_workdir(exports, tmp_path_factory):
    """The demo model exported to ONNX at its training size (a copy of the session's export)."""
    from unet_export.flows.demo import DEMO_WEIGHTS

    return exports.copy(tmp_path_factory.mktemp("triton") / "exports", DEMO_WEIGHTS, ("onnx",), 128, 128)


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _never_running_tritonserver(folder):
    """A tritonserver that is found (an executable beside a Python backend) but never runs."""
    binary = folder / "bin/tritonserver"
    for backend in ("python", "onnxruntime"):
        (folder / "backends" / backend).mkdir(parents=True)
    (folder / "backends/python/triton_python_backend_stub").touch()
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)
    return binary


BAD_CHECK_INPUT = [
    (["--tritonserver", "/nonexistent"], "not an executable file"),
    (["--data", "/nonexistent"], "--data /nonexistent: not a folder"),
    (["--weights", "/nonexistent.pth"], "/nonexistent.pth is gone"),
]


@pytest.mark.parametrize("bad, fragment", BAD_CHECK_INPUT)
def test_triton_check_that_cannot_start_writes_no_repository(onnx_workdir, tmp_path, monkeypatch, bad, fragment):
    monkeypatch.setenv("UNET_EXPORT_TRITONSERVER", str(_never_running_tritonserver(tmp_path / "server")))  # never fetched
    monkeypatch.chdir(tmp_path)
    made = runner.invoke(app, ["triton", "-w", str(onnx_workdir), "--repo", "old"])
    assert made.exit_code == 0, made.output
    before = _tree(tmp_path / "old")
    for repo in ("new", "old"):
        result = runner.invoke(app, ["triton", "-w", str(onnx_workdir), "--repo", repo, "--check", *bad])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert fragment in result.stderr
    assert not (tmp_path / "new").exists()
    assert _tree(tmp_path / "old") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "server"]  # no staged or old copies left
