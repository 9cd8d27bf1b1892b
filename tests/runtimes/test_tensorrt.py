"""TensorRT: everything that needs no TensorRT runs here (profiles, version dispatch, FP16 ONNX
and its parity, manifest records, error messages); the real-engine tests carry the `tensorrt`
marker and run only where `import tensorrt` and CUDA work."""

import shutil
import sys
import types

import onnx
import pytest
import torch
from typer.testing import CliRunner

from unet_export.api import build_trt, export_artifact, export_fp16_onnx
from unet_export.cli.main import app
from unet_export.flows.demo import DEMO_VAL, write_random_checkpoint
from unet_export.errors import UserError
from unet_export.runtimes.tensorrt.plan import (
    Profile,
    check_engine_compat,
    engine_path,
    parse_shape,
    parser_error_message,
    plan_build,
    resolve_profile,
    resolve_profiles,
)
from unet_export.workdir.manifest import load_manifest

runner = CliRunner()
ONNX_ENTRY = {"inputs": [{"name": "input", "shape": ["batch", 3, "height", "width"]}], "export_size": [256, 320],
              "size_rule": {"min": 16, "multiple": 1, "static": False}}  # fmt: skip


def confident_checkpoint(path, seed=0):
    """Random weights with a scaled output layer: logits far from ties, as a trained model's are,
    so FP16 rounding is judged on decisions that mean something."""
    ckpt = write_random_checkpoint(path, seed=seed, width=8)
    state = torch.load(ckpt, weights_only=True)
    state["outc.conv.weight"] *= 50
    torch.save(state, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    weights = confident_checkpoint(root / "unet.pth")
    assert export_artifact(weights, "onnx", root / "exports", device="cpu", height=64, width=96).passed
    return root / "exports"


# --- profiles -------------------------------------------------------------------------------


def test_parse_shape_and_its_errors():
    assert parse_shape("8x3x256x256", "--opt-shape") == (8, 3, 256, 256)
    for bad in ("8x3x256", "8x3xAx256", "0x3x256x256"):
        with pytest.raises(UserError, match="NxCxHxW"):
            parse_shape(bad, "--opt-shape")


def probes(profiles: list[Profile], entry: dict = ONNX_ENTRY) -> list[tuple]:
    """(label, shape) of each shape the engine's gate checks: its envelope's probes."""
    from unet_export.flows.export import engine_envelope

    return [(p.label, p.shape) for p in engine_envelope(entry, profiles).probes(tuple(entry["export_size"]))]


def test_default_profile_comes_from_the_manifest():
    profile = resolve_profile(ONNX_ENTRY)
    assert profile == Profile((1, 3, 256, 320), (8, 3, 256, 320), (16, 3, 256, 320))
    # The size is fixed: every corner is the export size; the batch runs 1 and 16 (image by image too).
    assert probes([profile]) == [("export size", (1, 3, 256, 320)), ("largest batch", (16, 3, 256, 320))]
    assert profile.contains((4, 3, 256, 320)) and not profile.contains((32, 3, 256, 320))


def test_user_shapes_override_and_widen_the_defaults():
    profile = resolve_profile(ONNX_ENTRY, max_text="32x3x512x640")
    assert profile.min == (1, 3, 256, 320) and profile.max == (32, 3, 512, 640) and profile.opt == (8, 3, 256, 320)
    profile = resolve_profile(ONNX_ENTRY, min_text="1x3x128x128", opt_text="4x3x512x512", max_text="8x3x1024x1024")
    assert probes([profile]) == [  # the profile's corners and edges, not the opt size and one more
        ("export size", (1, 3, 256, 320)), ("largest", (1, 3, 1024, 1024)), ("tall", (1, 3, 1024, 128)),
        ("wide", (1, 3, 128, 1024)), ("non-square", (1, 3, 129, 577)), ("largest batch", (8, 3, 128, 128))]  # fmt: skip


INTERACTIVE, BATCH8 = "1x3x256x256:1x3x256x256:1x3x512x512", "8x3x640x960:8x3x640x960:8x3x640x960"


def test_several_profiles_each_validated_and_each_proven():
    chosen = resolve_profiles(ONNX_ENTRY, [INTERACTIVE, BATCH8])
    assert chosen == [Profile((1, 3, 256, 256), (1, 3, 256, 256), (1, 3, 512, 512)),
                      Profile((8, 3, 640, 960), (8, 3, 640, 960), (8, 3, 640, 960))]  # fmt: skip
    # Each profile's box is probed; the export size 256x320 falls in the first.
    assert probes(chosen) == [
        ("export size", (1, 3, 256, 320)), ("largest", (1, 3, 512, 512)), ("tall", (1, 3, 512, 256)),
        ("wide", (1, 3, 256, 512)), ("non-square", (1, 3, 257, 385)), ("largest batch", (1, 3, 256, 256)),
        ("export size", (8, 3, 640, 960))]  # fmt: skip
    assert resolve_profiles(ONNX_ENTRY) == [resolve_profile(ONNX_ENTRY)]  # no --profile: the one-profile form
    assert resolve_profiles(ONNX_ENTRY, None, max_text="32x3x512x640")[0].max == (32, 3, 512, 640)


@pytest.mark.parametrize(
    "profiles, kwargs, fragment",
    [
        ([INTERACTIVE], {"max_text": "4x3x256x256"}, "drop --min-shape/--opt-shape/--max-shape"),
        (["1x3x256x256:8x3x256x256"], {}, "is not MIN:OPT:MAX"),
        (["1x3x256:1x3x256x256:1x3x256x256"], {}, "NxCxHxW"),
        ([INTERACTIVE, "1x1x64x64:1x1x64x64:1x1x64x64"], {}, r"--profile '1x1x64x64.*': min has 1 channels"),
        (["1x3x8x64:1x3x64x64:1x3x64x64"], {}, r"min height 8 breaks the model's size rule"),
        (["8x3x64x64:1x3x64x64:8x3x64x64"], {}, "min <= opt <= max"),
        ([BATCH8, BATCH8], {}, "is given twice"),
    ],
)  # fmt: skip
def test_bad_profile_options_are_user_errors(profiles, kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        resolve_profiles(ONNX_ENTRY, profiles, **kwargs)


def test_a_static_model_takes_only_its_shape_as_a_profile():
    static = ONNX_ENTRY | {"inputs": [{"name": "input", "shape": [1, 3, 64, 64]}], "size_rule": {"static": True}}
    assert resolve_profiles(static, ["1x3x64x64:1x3x64x64:1x3x64x64"]) == [resolve_profile(static)]
    for other in ("1x3x64x64:1x3x64x64:2x3x64x64", "2x3x64x64:2x3x64x64:2x3x64x64"):
        with pytest.raises(UserError, match="--static"):
            resolve_profiles(static, [other])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(min_text="1x1x256x320"), "channels"),
        (dict(min_text="8x3x256x320", max_text="4x3x256x320"), "min <= opt <= max"),
        (dict(max_text="16x3x8x320"), "size rule"),
    ],
)
def test_bad_profiles_are_user_errors(kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        resolve_profile(ONNX_ENTRY, **kwargs)


def test_static_onnx_gets_a_fixed_profile():
    static = ONNX_ENTRY | {"inputs": [{"name": "input", "shape": [1, 3, 64, 64]}], "size_rule": {"static": True}}
    assert resolve_profile(static) == Profile((1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 64, 64))
    with pytest.raises(UserError, match="--static"):
        resolve_profile(static, max_text="4x3x64x64")


# --- version dispatch, names, compatibility, messages -----------------------------------------


@pytest.mark.parametrize("version", ["10.3.0", "10.12.0.36", "8.6.1"])
def test_tensorrt_10_builds_fp16_with_the_builder_flag(version):
    plan = plan_build(version, "fp16", ["outc*"])
    assert plan.source == "fp32-onnx" and plan.fp16_flag and not plan.strongly_typed and plan.pin_fp32_layers


@pytest.mark.parametrize("version", ["11.0.0.12", "11.4.1"])
def test_tensorrt_11_builds_fp16_from_an_fp16_onnx_model(version):
    plan = plan_build(version, "fp16", ["outc*"])
    assert plan.source == "fp16-onnx" and not plan.fp16_flag and plan.strongly_typed and not plan.pin_fp32_layers


def test_fp32_engines_are_strongly_typed_from_the_fp32_model():
    for version in ("10.3.0", "11.0.0"):
        plan = plan_build(version, "fp32")
        assert (plan.source, plan.fp16_flag, plan.strongly_typed) == ("fp32-onnx", False, True)
        assert plan.strongly_typed_flag == version.startswith("10.")  # 11.x: always on, the flag is deprecated
    with pytest.raises(UserError, match="fp16 or fp32"):
        plan_build("10.3.0", "int8")


def test_engine_path(tmp_path):
    assert engine_path(tmp_path, "weights.onnx", "fp16") == tmp_path / "weights.fp16.engine"
    assert engine_path(tmp_path, "weights.fp16.onnx", "fp16") == tmp_path / "weights.fp16.engine"


def test_engine_from_another_version_or_gpu_is_refused_with_rebuild_hint():
    entry = {"path": "w.fp16.engine", "tensorrt_version": "10.3.0", "gpu": "NVIDIA A100", "compute_capability": "8.0"}
    check_engine_compat(entry, "10.3.0", "NVIDIA A100-SXM4-80GB", "8.0")
    for version, capability in (("10.8.0", "8.0"), ("10.3.0", "9.0")):
        with pytest.raises(UserError, match="rebuild it with `unet-export trt`"):
            check_engine_compat(entry, version, "NVIDIA H100", capability)


def test_parser_rejection_names_the_node_and_explains_reflect_padding():
    errors = [{"node": 7, "node_name": "node_pad_3", "operator": "Pad",
               "desc": "Assertion failed: mode == \"constant\" && value == 0.f"}, {"node": 9, "desc": "x"}]  # fmt: skip
    message = parser_error_message("reflect.onnx", errors)
    assert "node node_pad_3 (Pad) of reflect.onnx" in message and "reflect padding" in message
    assert "(+1 more errors)" in message and "\n" not in message
    assert "without saying why" in parser_error_message("m.onnx", [])


# --- FP16 ONNX (runs here through ONNX Runtime's CPU provider) --------------------------------


def test_fp16_onnx_is_verified_with_fp16_tolerances(workdir):
    result = export_fp16_onnx(workdir, device="cpu", data=DEMO_VAL)
    assert result.path.name == "unet.fp16.onnx"
    model = onnx.load(str(result.path))
    elem = onnx.TensorProto
    assert model.graph.input[0].type.tensor_type.elem_type == elem.FLOAT  # FP32 I/O kept
    assert model.graph.output[0].type.tensor_type.elem_type == elem.FLOAT
    assert any(init.data_type == elem.FLOAT16 for init in model.graph.initializer)
    assert result.parity.tolerance == "fp16" and result.passed, result.parity.failures()
    # real images only: at their own size, then cropped or mirrored to each probe of the envelope
    assert [(c.probe, c.shape) for c in result.parity.cases][0] == ("gate images", [8, 3, 128, 128])
    env = result.entry["envelope"]
    assert env["proven"] and [c["probe"] for c in env["checked"]] == [
        "gate images", "largest", "tall", "wide", "non-square", "largest batch"]
    assert len(result.entry["real_images"]["images"]) == 8
    for case in result.parity.cases:
        assert case.argmax_disagreement <= 1e-3 and case.dice_vs_eager >= 0.999
        assert case.max_abs_err > 0  # really converted: FP16 rounding shows
    entries = {(a["format"], a["precision"]): a for a in load_manifest(workdir)["artifacts"]}
    assert entries[("onnx", "fp16")]["status"] == "verified" and entries[("onnx", "fp32")]["status"] == "verified"


def test_fp32_layers_stay_fp32_in_the_fp16_model(workdir):
    result = export_fp16_onnx(workdir, fp32_layers=["outc*", "ConvTranspose"], device="cpu", data=DEMO_VAL)
    model = onnx.load(str(result.path))
    kept = set(result.entry["fp32_nodes"])
    assert kept and all(n.op_type in ("Conv", "ConvTranspose") for n in model.graph.node if n.name in kept)
    fp32_weights = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    casts_to_fp32 = {o for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT
                     for o in n.output}  # fmt: skip
    for node in (n for n in model.graph.node if n.name in kept):
        assert all(x in fp32_weights or x in casts_to_fp32 for x in node.input if x), node.name
    converted = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in kept][0]
    assert not all(x in fp32_weights or x in casts_to_fp32 for x in converted.input if x)
    with pytest.raises(UserError, match="matches no node"):
        export_fp16_onnx(workdir, fp32_layers=["no-such-layer*"], device="cpu", data=DEMO_VAL)


def test_onnx_fp16_cli_writes_both_artefacts(tmp_path):
    weights = confident_checkpoint(tmp_path / "w.pth")
    out = tmp_path / "exports"
    result = runner.invoke(app, ["onnx", str(weights), "-w", str(out), "--fp16", "--height", "64", "--width", "64",
                                 "--data", str(DEMO_VAL)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "onnx fp16" in result.stdout and "fp16 tolerance" in result.stdout
    assert sorted(p.name for p in out.glob("*.onnx")) == ["w.fp16.onnx", "w.onnx"]
    bad = runner.invoke(app, ["onnx", str(weights), "-w", str(out), "--fp32-layers", "outc*"])
    assert bad.exit_code == 2 and "add --fp16" in bad.stderr


def test_fp16_without_real_images_is_refused_before_anything_is_written(tmp_path, workdir):
    """Issue 24: FP16 was judged on seeded noise. A checkpoint with no held-out images and no
    --data cannot have its FP16 model proven: exit 2, one line, not even the FP32 model written."""
    weights = confident_checkpoint(tmp_path / "w.pth")
    out = tmp_path / "exports"
    result = runner.invoke(app, ["onnx", str(weights), "-w", str(out), "--fp16", "--height", "64", "--width", "64"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the fp16 artefact is judged on real images only" in lines[0] and "--data DIR" in lines[0]
    assert not out.exists()
    before = sorted(p.name for p in workdir.iterdir())
    with pytest.raises(UserError, match="judged on real images only and none are recorded or given"):
        export_fp16_onnx(workdir, device="cpu")
    assert sorted(p.name for p in workdir.iterdir()) == before


# --- `unet-export trt` without TensorRT or without a GPU ----------------------------------------


def test_trt_without_tensorrt_exits_2_with_the_install_line(workdir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = runner.invoke(app, ["trt", "--fp16", "-w", str(workdir)])
    assert result.exit_code == 2
    assert result.stderr.strip() == 'error: TensorRT is not installed: on a machine with an NVIDIA GPU, pip install "unet-export[trt]"'
    assert not list(workdir.glob("*.engine"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_trt_without_gpu_exits_2(workdir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    result = runner.invoke(app, ["trt", "-w", str(workdir)])
    assert result.exit_code == 2 and "needs an NVIDIA GPU" in result.stderr


def test_trt_needs_an_exported_onnx_model(tmp_path, workdir):
    result = runner.invoke(app, ["trt", "-w", str(tmp_path)])
    assert result.exit_code == 2 and "run `unet-export onnx" in result.stderr
    result = runner.invoke(app, ["trt", "-w", str(workdir), "--onnx", str(tmp_path / "other.onnx")])
    assert result.exit_code == 2 and "is not an ONNX model exported into" in result.stderr
    result = runner.invoke(app, ["trt", "-w", str(workdir), "--max-shape", "4x3x64"])
    assert result.exit_code == 2 and "NxCxHxW" in result.stderr


def test_trt_profile_option_is_parsed_and_never_mixed_with_the_one_profile_form(workdir):
    two = ["--profile", "1x3x64x96:1x3x64x96:2x3x128x192", "--profile", "8x3x64x64:8x3x64x64:8x3x64x64"]
    result = runner.invoke(app, ["trt", "-w", str(workdir), *two, "--max-shape", "4x3x64x96"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--profile gives whole profiles: drop --min-shape/--opt-shape/--max-shape" in result.stderr
    for bad, fragment in (("1x3x64x96:2x3x64x96", "is not MIN:OPT:MAX"),
                          ("1x3x64x96:1x3x64x96:2x3x64x8", "max width 8 breaks the model's size rule")):  # fmt: skip
        result = runner.invoke(app, ["trt", "-w", str(workdir), "--profile", bad])
        assert result.exit_code == 2 and fragment in result.stderr, result.output
    # Valid profiles get as far as TensorRT, which this machine lacks (the same one line as without --profile).
    result = runner.invoke(app, ["trt", "-w", str(workdir), *two])
    assert result.exit_code == 2 and ("TensorRT" in result.stderr or "tensorrt" in result.stderr), result.output


# --- real engines: only where TensorRT and a GPU exist ------------------------------------------



@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.tensorrt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU")
def test_real_engine_build_parity_and_manifest(workdir, precision):
    pytest.importorskip("tensorrt")
    result = build_trt(workdir, precision=precision, max_shape="4x3x128x128")
    assert result.passed, result.parity.failures()
    entry = result.entry
    assert entry["format"] == "tensorrt" and entry["path"] == f"unet.{precision}.engine"
    assert entry["gpu"] == torch.cuda.get_device_name() and entry["profile"]["max"] == [4, 3, 128, 128]
    assert (workdir / "timing.cache").stat().st_size > 0


@pytest.mark.tensorrt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU")
def test_real_engine_refuses_a_record_from_another_version(workdir):
    pytest.importorskip("tensorrt")
    from unet_export.runtimes import TensorRTRunner

    result = build_trt(workdir, precision="fp16")
    record = result.entry | {"tensorrt_version": "0.0.0"}
    with pytest.raises(UserError, match="rebuild"):
        TensorRTRunner(result.path, "cuda", "fp16", record=record).activate()


# --- the builder's decisions, against a test double of TensorRT's API ---------------------------
# tests/fake_tensorrt.py has, per major version, only the names the real bindings have there (with their
# enum values; tests/runtimes/test_tensorrt_api.py checks that), so a 10.x-only call on an 11.x path fails here.

TRT10, TRT11 = "10.13.0.35", "11.4.0.106"


@pytest.fixture
def fake_trt(monkeypatch):
    from tests.fake_tensorrt import make_fake_tensorrt

    def install(**kwargs):
        trt = make_fake_tensorrt(**kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    return install


def _build(workdir, tmp_path, version, precision="fp16", fp32_layers=None, profiles=None):
    from unet_export.runtimes.tensorrt.build import build_engine

    source = workdir / "unet.onnx"
    plan = plan_build(version, precision, fp32_layers)
    chosen = resolve_profiles(load_manifest(workdir)["artifacts"][0], profiles)
    return build_engine(plan, source, chosen, tmp_path / "e.engine", timing_cache=tmp_path / "t.cache",
                        fp32_layers=fp32_layers)  # fmt: skip


def test_builder_on_tensorrt_10_sets_fp16_and_pins_fp32_layers(workdir, tmp_path, fake_trt):
    trt = fake_trt(version=TRT10)
    info = _build(workdir, tmp_path, TRT10, fp32_layers=["outc*"])
    config, network = trt._built["config"], trt._built["network"]
    assert network._flags == 0  # weakly typed, so the FP16 flag takes effect
    assert config._flags == {trt.BuilderFlag.FP16, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS}
    pinned = [layer.name for layer in network._layers if layer._precision == trt.float32]
    assert pinned == ["node_conv2d_18"] and info["fp32_layers_pinned"] == 1  # outc.conv's node
    assert network._layers[1]._output_types == {0: trt.float32}
    assert config._profiles[0]._shapes["input"] == ((1, 3, 64, 96), (8, 3, 64, 96), (16, 3, 64, 96))
    assert (tmp_path / "e.engine").read_bytes() == b"PLAN" and (tmp_path / "t.cache").read_bytes() == b"cache:H100"


@pytest.mark.parametrize("version", [TRT10, TRT11])
def test_builder_adds_every_profile_in_order(workdir, tmp_path, fake_trt, version):
    trt = fake_trt(version=version)
    _build(workdir, tmp_path, version, profiles=["1x3x64x96:1x3x64x96:2x3x128x192", "8x3x64x64:8x3x64x64:8x3x64x64"])
    shapes = [profile._shapes for profile in trt._built["config"]._profiles]
    assert shapes == [{"input": ((1, 3, 64, 96), (1, 3, 64, 96), (2, 3, 128, 192))},
                      {"input": ((8, 3, 64, 64), (8, 3, 64, 64), (8, 3, 64, 64))}]  # fmt: skip
    fake_trt(version=version, profile_ok=False)
    with pytest.raises(UserError, match=r"TensorRT refused the optimisation profile min 1x3x64x96 opt 1x3x64x96 max"):
        _build(workdir, tmp_path / "x", version, profiles=["1x3x64x96:1x3x64x96:2x3x128x192"])
    assert not (tmp_path / "x").exists()


def test_builder_on_tensorrt_11_is_strongly_typed_without_any_flag(workdir, tmp_path, fake_trt):
    trt = fake_trt(version=TRT11)
    info = _build(workdir, tmp_path, TRT11)
    # 11.x is always strongly typed; its STRONGLY_TYPED is 0 and deprecated, so no creation flag is set.
    assert trt._built["network"]._flags == 0 and trt._built["config"]._flags == set()
    assert info["tensorrt_version"] == TRT11 and (tmp_path / "e.engine").read_bytes() == b"PLAN"


@pytest.mark.parametrize("version, flags", [(TRT10, 1 << 1), (TRT11, 0)])
def test_fp32_engine_is_strongly_typed_and_turns_tf32_off(workdir, tmp_path, fake_trt, version, flags):
    trt = fake_trt(version=version)
    _build(workdir, tmp_path, version, precision="fp32")
    assert trt._built["network"]._flags == flags  # 10.x: 1 << STRONGLY_TYPED (1)
    assert trt._built["config"]._cleared == {trt.BuilderFlag.TF32} and not trt._built["config"]._flags


def test_parser_rejection_and_failed_build_are_clear_and_leave_nothing(workdir, tmp_path, fake_trt):
    from unet_export.errors import ArtifactError

    fake_trt(parse_errors=[("node_pad", "Pad", "Assertion failed: mode == constant")])
    with pytest.raises(ArtifactError, match=r"rejected node node_pad \(Pad\).*reflect padding"):
        _build(workdir, tmp_path, TRT10)
    fake_trt(build_ok=False)
    with pytest.raises(ArtifactError, match="out of workspace memory"):
        _build(workdir, tmp_path, TRT10)
    assert not list(tmp_path.iterdir())


PROFILES = ["1x3x64x96:1x3x64x96:2x3x96x128", "4x3x64x64:4x3x64x64:4x3x64x64"]
PROBES = [("export size", (1, 3, 64, 96)), ("largest", (1, 3, 96, 128)), ("tall", (1, 3, 96, 96)),
          ("wide", (1, 3, 64, 128)), ("non-square", (1, 3, 65, 113)), ("largest batch", (2, 3, 64, 96)),
          ("export size", (4, 3, 64, 64))]  # fmt: skip


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_engine_with_two_profiles_is_proven_on_each_and_records_its_envelope(workdir, tmp_path, fake_trt,
                                                                                monkeypatch, precision):  # fmt: skip
    """build_trt with two --profile: both go into the build, the gate runs every probe of both boxes
    (FP32 seeded; FP16 on the real images, then on them cropped to each probe), and the entry records
    "profiles", "profile" (the first) and the envelope. The fake runs nothing, so the gate here runs
    the eager model against itself on the CPU: what is checked is which inputs reach it and what is
    recorded, not TensorRT's numbers (a GPU run is the only proof of those)."""
    import unet_export.flows.export as api
    from tests.fake_tensorrt import install_fake_cuda
    from unet_export.parity.gate import check_parity
    from unet_export.runtimes import EagerRunner

    exports = tmp_path / "exports"
    shutil.copytree(workdir, exports)
    trt = fake_trt(version=TRT10)
    install_fake_cuda(monkeypatch)
    seen = []

    def eager_gate(entry, workdir, net, device, inputs, tol, path=None, *, threshold=0.0, capture=None, probes=None):
        seen.append(([tuple(x.shape) for x in inputs], probes))
        with EagerRunner(net, "cpu") as runner, EagerRunner(net, "cpu") as reference:
            return check_parity(runner, reference, inputs, tol, threshold=threshold, capture=capture, probes=probes)

    monkeypatch.setattr(api, "run_parity", eager_gate)
    result = build_trt(exports, precision=precision, profiles=PROFILES, data=DEMO_VAL)
    assert result.passed, result.parity.failures()
    shapes = [profile._shapes["input"] for profile in trt._built["config"]._profiles]
    assert shapes == [((1, 3, 64, 96), (1, 3, 64, 96), (2, 3, 96, 128)), ((4, 3, 64, 64),) * 3]
    (inputs, labels), = seen
    # FP16: the real images at their own size, then at every probe but the first (the export size)
    real = len(inputs) - len(PROBES) + 1 if precision == "fp16" else 0
    expected = PROBES[1:] if precision == "fp16" else PROBES
    assert [(label, shape[0] if label == "largest batch" else 1, shape[2:]) for label, shape in zip(labels, inputs)][real:] \
        == [(label, shape[0] if label == "largest batch" else 1, shape[2:]) for label, shape in expected]
    assert labels[:real] == ["gate images"] * real and (precision == "fp32" or real >= 1)
    entry = load_manifest(exports)["artifacts"][-1]
    assert entry["format"] == "tensorrt" and entry["status"] == "verified"
    assert entry["profiles"] == [Profile(*(parse_shape(s, "") for s in p.split(":"))).to_dict() for p in PROFILES]
    assert entry["profile"] == entry["profiles"][0]
    record = entry["envelope"]
    assert record["proven"] and [b["batch"] for b in record["declared"]["boxes"]] == [[1, 2], [4, 4]]
    checked = [(c["probe"], tuple(c["shape"])) for c in record["checked"]]
    if precision == "fp32":
        assert checked == PROBES
    else:  # the real images first, then the probes but the export size (batch 1 probes take more images)
        assert [c for c, _ in checked] == ["gate images"] * real + [label for label, _ in PROBES[1:]]
    assert all(c["passed"] for c in record["checked"])
    assert all(c["alone"]["passed"] for c in record["checked"] if c["shape"][0] > 1)  # batch invariance
    assert any(c["shape"][0] > 1 for c in record["checked"])
    assert record["refused"] and all("outside the proven envelope" in r["message"] for r in record["refused"])


def test_real_images_fit_the_engines_profiles_and_are_cropped_to_each_probe():
    from unet_export.flows.export import engine_envelope
    from unet_export.parity.realimages import fitted, place, probe_images, takes_size

    profiles = [Profile((1, 3, 64, 64), (1, 3, 64, 64), (2, 3, 128, 128)), Profile(*[(4, 3, 96, 160)] * 3)]
    entry = ONNX_ENTRY | {"profiles": [p.to_dict() for p in profiles]}
    assert takes_size(entry, 128, 128) and takes_size(entry, 96, 160) and not takes_size(entry, 96, 200)
    images = torch.arange(5 * 3 * 96 * 160, dtype=torch.float32).reshape(5, 3, 96, 160)
    # 96x160: held by the second profile alone, so batches of its 4; 200 wide: no profile, so the first's opt size.
    assert [tuple(b.shape) for b in fitted([images], entry)] == [(4, 3, 96, 160), (1, 3, 96, 160)]
    assert [tuple(b.shape) for b in fitted([images[:3, :, :, :150]], entry | {"export_size": [256, 320]})] == [
        (2, 3, 64, 64), (1, 3, 64, 64)]  # the export size is in no profile: the first profile's opt  # fmt: skip
    crop, mirrored = place(images[:1], 64, 64), place(images[:1], 128, 320)
    assert torch.equal(crop[0], images[0, :, 16:80, 48:112])  # a centre crop at the image's own scale
    # 160 -> 319 -> 320 wide (reflect takes at most the side - 1 at a time): the image at 79:239
    assert mirrored.shape == (1, 3, 128, 320) and torch.equal(mirrored[..., 16:112, 79:239], images[:1])
    assert torch.equal(mirrored[0, :, 16:112, 78], images[0, :, :, 1])  # mirrored about the edge, not scaled
    env = engine_envelope(ONNX_ENTRY, profiles)
    inputs, labels = probe_images([images[:2], images[2:]], env, (64, 64))
    assert [(label, tuple(x.shape)) for label, x in zip(labels, inputs)] == [
        (p.label, p.shape) for p in env.probes((64, 64))[1:]]  # every probe but the export size, real images each


# --- the timing cache: a bad file costs build time, never the build ------------------------------


def test_timing_cache_is_reused_when_it_matches(workdir, tmp_path, fake_trt, recwarn):
    (tmp_path / "t.cache").write_bytes(b"cache:H100")
    trt = fake_trt(version=TRT11)
    _build(workdir, tmp_path, TRT11)
    assert trt._built["config"]._cache_calls == [("create", b"cache:H100"), ("set", "H100")]
    assert not [w for w in recwarn if "timing cache" in str(w.message)]


def test_cli_build_leaves_a_timing_cache_the_next_build_reads_and_sets_the_workspace(workdir, tmp_path, fake_trt,
                                                                                      monkeypatch):  # fmt: skip
    """`unet-export trt` twice on one workdir: the first build has no cache file, starts a fresh cache
    and leaves it in DIR/timing.cache; the second build reads that file back. --workspace GiB is the
    builder's workspace pool limit. (The fake builds nothing a GPU could verify: each run stops
    right after the build, which is where the cache is saved.)"""
    import unet_export.flows.export as api

    exports = tmp_path / "exports"
    shutil.copytree(workdir, exports)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def stop(*args, **kwargs):
        raise RuntimeError("stopped after the build")

    monkeypatch.setattr(api, "_engine_entry", stop)
    configs = []
    for workspace in ("2.5", "1"):
        trt = fake_trt(version=TRT10)
        result = runner.invoke(app, ["trt", "-w", str(exports), "--workspace", workspace, "--data", str(DEMO_VAL)])
        assert result.exit_code == 3 and "stopped after the build" in result.stderr, result.output
        configs.append(trt._built["config"])
    first, second = configs
    assert first._cache_calls == [("create", b""), ("set", "H100")]  # no file yet: a fresh cache
    assert second._cache_calls == [("create", b"cache:H100"), ("set", "H100")]  # the first build's file
    assert (exports / "timing.cache").read_bytes() == b"cache:H100"
    assert first._pool == (trt.MemoryPoolType.WORKSPACE, int(2.5 * 2**30))
    assert second._pool == (trt.MemoryPoolType.WORKSPACE, 2**30)


@pytest.mark.parametrize("version", [TRT10, TRT11])
def test_an_fp16_engine_without_real_images_is_refused_before_the_build(workdir, tmp_path, fake_trt, monkeypatch, version):
    """Issue 24: the FP16 engine was judged on seeded noise. With no held-out images recorded and no
    --data it cannot be proven: exit 2 before TensorRT builds anything; --fp32 still builds."""
    exports = tmp_path / "exports"
    shutil.copytree(workdir, exports)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    trt = fake_trt(version=version)
    before = sorted(p.name for p in exports.iterdir())
    result = runner.invoke(app, ["trt", "--fp16", "-w", str(exports)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: the fp16 artefact is judged on real images only and none are recorded")
    assert len(result.stderr.strip().splitlines()) == 1 and "--data DIR" in result.stderr
    assert trt._built == {} and sorted(p.name for p in exports.iterdir()) == before


@pytest.mark.parametrize("version", [TRT10, TRT11])
@pytest.mark.parametrize(
    "content, problem",
    [(b"\x00garbage", "is not a timing cache TensorRT can read"),  # create_timing_cache returns None
     (b"cache:A100", "is from another GPU or TensorRT version")],  # set_timing_cache returns False
)  # fmt: skip
def test_bad_timing_cache_is_replaced_with_a_warning(workdir, tmp_path, fake_trt, version, content, problem):
    (tmp_path / "t.cache").write_bytes(content)
    trt = fake_trt(version=version)
    with pytest.warns(UserWarning, match=f"timing cache .*t.cache {problem}: building with a fresh one"):
        _build(workdir, tmp_path, version)
    assert trt._built["config"]._cache_calls[-2:] == [("create", b""), ("set", "H100")]
    assert (tmp_path / "e.engine").read_bytes() == b"PLAN"
    assert (tmp_path / "t.cache").read_bytes() == b"cache:H100"  # the fresh cache replaced the bad file


def test_build_goes_on_without_a_timing_cache_when_none_can_be_made(workdir, tmp_path, fake_trt):
    from unet_export.runtimes.tensorrt.build import _save_timing_cache

    trt = fake_trt(timing_cache_ok=False)
    with pytest.warns(UserWarning, match="could not create a timing cache: building without one"):
        _build(workdir, tmp_path, TRT10)
    assert (tmp_path / "e.engine").read_bytes() == b"PLAN" and not (tmp_path / "t.cache").exists()
    config = trt.Builder(None).create_builder_config()
    _save_timing_cache(config, tmp_path / "t.cache")  # get_timing_cache() is None: nothing to write
    assert not (tmp_path / "t.cache").exists()


# --- the runner, against the same double and a stand-in for torch.cuda ---------------------------

RECORD = {"path": "e.engine", "tensorrt_version": None, "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
          "profile": {"min": [1, 3, 64, 96], "opt": [8, 3, 64, 96], "max": [16, 3, 64, 96]}}  # fmt: skip


@pytest.fixture
def engine_runner(tmp_path, fake_trt, monkeypatch):
    """A runner on an engine file, activated against the fake (version and knobs as given)."""
    from tests.fake_tensorrt import install_fake_cuda
    from unet_export.runtimes.tensorrt.runner import TensorRTRunner

    def make(version=TRT10, plan=b"PLAN", record=None, **kwargs):
        trt = fake_trt(version=version, **kwargs)
        cuda = install_fake_cuda(monkeypatch)
        (tmp_path / "e.engine").write_bytes(plan)
        record = RECORD | (record or {}) | {"tensorrt_version": version}
        runner = TensorRTRunner(tmp_path / "e.engine", "cuda", "fp16", record=record)
        return runner, trt, cuda

    return make


@pytest.mark.parametrize("version", [TRT10, TRT11])
def test_runner_enqueues_on_its_own_stream_between_two_waits(engine_runner, version):
    runner, trt, cuda = engine_runner(version)
    runner.activate()
    x = torch.randn(2, 3, 64, 96)
    out = runner._infer_impl(x)  # no GPU here: the tensors stay on the CPU
    context, (stream,) = trt._built["context"], cuda.created
    assert out.shape == (2, 2, 64, 96) and out.dtype == torch.float32
    assert context._shapes == {"input": (2, 3, 64, 96)}
    assert context._addresses == {"input": x.data_ptr(), "output": out.data_ptr()}
    assert context._streams == [stream.cuda_stream] and stream.cuda_stream != 0  # not the legacy default stream
    assert stream.waited_on == [cuda.default] and cuda.default.waited_on == [stream]
    runner.deactivate()
    assert stream.synchronized == 1 and runner.context is None


def test_runner_converts_to_the_engine_dtypes(engine_runner):
    runner, _, _ = engine_runner(io_dtypes=("HALF", "HALF"))
    out = runner.activate()._infer_impl(torch.randn(1, 3, 64, 96))
    assert out.dtype == torch.float32 and out.shape == (1, 2, 64, 96)


def test_runner_without_an_execution_context_says_so(engine_runner):
    runner, _, _ = engine_runner(TRT11, context_ok=False)
    with pytest.raises(UserError, match="could not create an execution context for e.engine"):
        runner.activate()


def test_runner_refuses_a_foreign_engine_and_shapes_outside_the_profile(engine_runner):
    runner, _, _ = engine_runner(plan=b"\x00not a plan")
    with pytest.raises(UserError, match=r"cannot load e.engine \(engine plan file is incompatible.*rebuild it"):
        runner.activate()
    runner, _, _ = engine_runner()
    runner.activate()
    with pytest.raises(UserError, match=r"input 32x3x64x96 is outside the engine's profiles \(batch 1-16, height 64, "
                                        r"width 96\): rebuild it with a --profile that holds it"):  # fmt: skip
        runner._infer_impl(torch.randn(32, 3, 64, 96))


TWO_PROFILES = {"profiles": [{"min": [1, 3, 64, 96], "opt": [1, 3, 64, 96], "max": [2, 3, 128, 192]},
                             {"min": [8, 3, 64, 64], "opt": [8, 3, 64, 64], "max": [8, 3, 64, 64]}]}  # fmt: skip


@pytest.mark.parametrize("version", [TRT10, TRT11])
def test_runner_runs_each_input_on_the_first_profile_that_holds_it(engine_runner, version):
    runner, trt, cuda = engine_runner(version, record=TWO_PROFILES)
    runner.activate()
    context, (stream,) = trt._built["context"], cuda.created
    inputs = [((1, 3, 64, 96), 0), ((2, 3, 128, 192), 0), ((8, 3, 64, 64), 1), ((8, 3, 64, 64), 1), ((1, 3, 96, 96), 0)]
    for shape, profile in inputs:
        x = torch.randn(*shape)
        assert runner.profile_for(tuple(x.shape)) == profile
        assert runner._infer_impl(x).shape == (x.shape[0], 2, *x.shape[2:])
        assert runner.active == profile and context._shapes["input"] == tuple(x.shape)
    # A switch only where the profile changes, queued on the runner's own stream (not the legacy default).
    assert context._switches == [(1, stream.cuda_stream), (0, stream.cuda_stream)]
    for shape in ((4, 3, 64, 64), (1, 3, 64, 64), (8, 3, 64, 96)):  # between the boxes: no profile holds it
        with pytest.raises(UserError, match=r"outside the engine's profiles \(batch 1-2, height 64-128, width 96-192 "
                                            r"or batch 8, height 64, width 64\)"):  # fmt: skip
            runner._infer_impl(torch.randn(*shape))
    assert context._switches == [(1, stream.cuda_stream), (0, stream.cuda_stream)]  # refused before any call
    runner.deactivate()
    # An entry recorded before "profiles" existed: its one "profile"; no record: TensorRT's profile 0 and checks.
    legacy = type(runner)(runner.path, "cuda", "fp16", record=RECORD)
    assert [p.max for p in legacy.profiles] == [(16, 3, 64, 96)]
    assert type(runner)(runner.path, "cuda", "fp16").profile_for((5, 3, 7, 7)) == 0
