"""`--fallback auto` (issue 28, part 2): on the demo model with a few extreme outliers in the input
of its last decoder layer (flows.demo.write_outlier_checkpoint), the default INT8 export fails its
real-image gate (exit 1) and the search finds a small FP32 set that passes (exit 0), naming up4.up
first; what the output, the manifest and --json record; the set re-applied with --fp32-layers by
module path and by ONNX node name; an exhausted budget is exit 1 with what was tried. Also the
search itself (flows/fallback.grow) on fake trials, and layers named both ways."""

import json
import shutil

import onnx
import pytest
from typer.testing import CliRunner

from unet_export.cli.main import app
from unet_export.flows.demo import DEMO_SIZE, DEMO_VAL, demo_calibration, OUTLIER_LAYER, write_outlier_checkpoint
from unet_export.flows.fallback import grow, Step
from unet_export.runtimes.onnx.layers import flag_name, label, select_nodes
from unet_export.workdir.manifest import load_manifest

runner = CliRunner()
HEIGHT, WIDTH = DEMO_SIZE
WRITER = "up3.conv.double_conv.4"  # the convolution (BatchNorm folded in) that writes up4.up's input


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    """(weights, calibration folder, a workdir holding its verified FP32 ONNX model): copy the workdir."""
    pytest.importorskip("onnxruntime.quantization")
    root = tmp_path_factory.mktemp("outlier")
    weights = write_outlier_checkpoint(root / "outlier_unet.pth")
    calib = root / "calib"
    calib.mkdir()
    for path in demo_calibration():
        shutil.copy(path, calib / path.name)
    out = root / "exports"
    result = runner.invoke(app, ["onnx", str(weights), "-w", str(out), "--height", str(HEIGHT), "--width", str(WIDTH),
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return weights, calib, out


def int8(outlier, tmp_path, *args):
    weights, calib, source = outlier
    out = tmp_path / "exports"
    if not out.exists():
        shutil.copytree(source, out)
    result = runner.invoke(app, ["int8", str(weights), "--calib", str(calib), "--val", str(DEMO_VAL), "-w", str(out),
                                 "--height", str(HEIGHT), "--width", str(WIDTH), "--device", "cpu", *args])  # fmt: skip
    return result, out


def entry(out, fmt="onnx"):
    return next(a for a in load_manifest(out)["artifacts"] if a["format"] == fmt and a["precision"] == "int8")


def test_default_int8_fails_and_auto_finds_the_outlier_layer_first(outlier, tmp_path):
    failed, out = int8(outlier, tmp_path, "--engine", "onnxruntime")
    assert failed.exit_code == 1, failed.output
    assert entry(out)["status"] == "failed" and entry(out)["quantization"]["worked"] is None

    found, out = int8(outlier, tmp_path, "--engine", "onnxruntime", "--fallback", "auto", "--json", str(tmp_path / "r.json"))
    assert found.exit_code == 0, found.output
    art = entry(out)
    q, search = art["quantization"], art["quantization"]["search"]
    assert art["status"] == "verified" and q["worked"] == "auto" and art["accuracy"]["passed"]
    assert search["ranked"][0]["layer"] == f"{OUTLIER_LAYER} (node_convolution_3)"  # named both ways, first
    assert search["steps"][0]["layers"] == [f"{OUTLIER_LAYER} (node_convolution_3)"]
    assert search["ranked"][0]["score"] > 0.5 > 0.05 > search["ranked"][2]["score"]  # far ahead of the ordinary layers
    assert search["base"]["class_change"] > 0.1 and not search["base"]["passed"]  # what the search started from
    assert sorted(search["found_nodes"]) == ["node_Conv_317", "node_convolution_3"] and len(search["found"]) <= 3
    assert search["flag"] == f"--fp32-layers {OUTLIER_LAYER} --fp32-layers {WRITER}"
    passing = [s for s in search["steps"] if s["passed"]]
    assert passing and all(s["class_change"] <= 1e-3 and s["dice_vs_eager"] >= 0.999 for s in passing)
    assert all(not s["passed"] for s in search["steps"] if len(s["fp32"]) == 1)  # neither layer alone is enough
    assert set(search["cost_ms"]) == set(search["found"]) and all(v is not None for v in search["cost_ms"].values())
    assert sorted(art["fp32_nodes"]) == sorted([f"{OUTLIER_LAYER} (node_convolution_3)", f"{WRITER} (node_Conv_317)"])
    assert search["seconds"] <= search["budget_s"] == 180
    stdout = found.stdout
    assert f"re-apply with: --fp32-layers {OUTLIER_LAYER} --fp32-layers {WRITER}" in stdout
    assert "step 1" in stdout and f"+{OUTLIER_LAYER} (node_convolution_3) -> 1 in FP32" in stdout
    assert "fallback auto kept 2 layer(s) in FP32" in stdout and "speed cost (CPU" in stdout
    recorded = json.loads((tmp_path / "r.json").read_text())
    int8_rows = [a for a in recorded["artifacts"] if a.get("precision") == "int8"]
    assert int8_rows and int8_rows[-1]["fallback"]["found_nodes"] == search["found_nodes"]


@pytest.mark.parametrize("names", [[OUTLIER_LAYER, WRITER], ["node_convolution_3", "node_Conv_317"]])
def test_the_set_found_reapplies_by_module_path_or_node_name(outlier, tmp_path, names):
    flags = [arg for name in names for arg in ("--fp32-layers", name)]
    result, out = int8(outlier, tmp_path, "--engine", "onnxruntime", "--fallback", "none", *flags)
    assert result.exit_code == 0, result.output
    art = entry(out)
    assert art["status"] == "verified" and "search" not in art["quantization"]
    assert sorted(art["fp32_nodes"]) == sorted([f"{OUTLIER_LAYER} (node_convolution_3)", f"{WRITER} (node_Conv_317)"])
    assert art["quantization"]["ignored_scope"] == [f"{WRITER} (node_Conv_317)", f"{OUTLIER_LAYER} (node_convolution_3)"]


def test_one_layer_alone_still_fails_and_no_fallback_is_still_accepted(outlier, tmp_path):
    result, out = int8(outlier, tmp_path, "--engine", "onnxruntime", "--no-fallback", "--fp32-layers", OUTLIER_LAYER)
    assert result.exit_code == 1, result.output
    q = entry(out)["quantization"]
    assert [a["name"] for a in q["attempts"]] == ["default"] and q["attempts"][0]["fp32_nodes"] == 1


def test_a_budget_too_small_is_exit_1_with_what_was_tried(outlier, tmp_path):
    result, out = int8(outlier, tmp_path, "--engine", "onnxruntime", "--fallback", "auto", "--fallback-budget", "0.5")
    assert result.exit_code == 1, result.output
    search = entry(out)["quantization"]["search"]
    assert search["found"] is None and len(search["steps"]) == 1 and not search["steps"][0]["passed"]
    assert entry(out)["status"] == "failed"
    assert "fallback auto found no FP32 set that passes" in result.stdout and "budget 0.5 s, 1 sets tried" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--fp32-layers", "MaxPool"], "--fp32-layers MaxPool selects no convolution of outlier_unet.onnx"),
    (["--fp32-layers", "nomatch*"], "--fp32-layers nomatch* matches no node of outlier_unet.onnx"),
    (["--fallback", "sometimes"], "sometimes"),
    (["--fallback", "auto", "--fallback-budget", "0"], "--fallback-budget must be a number of seconds > 0"),
])  # fmt: skip
def test_bad_fallback_input_is_exit_2(outlier, tmp_path, args, message):
    result, out = int8(outlier, tmp_path, "--engine", "onnxruntime", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (out / "outlier_unet.int8.onnx").exists()


def test_openvino_auto_finds_the_set_without_accuracy_control(outlier, tmp_path):
    result, out = int8(outlier, tmp_path, "--engine", "openvino", "--fallback", "auto")
    assert result.exit_code == 0, result.output
    art = entry(out, "openvino")
    q = art["quantization"]
    # first the recipes that keep no layer in FP32, each failing; the search starts from the last
    assert [a["name"] for a in q["attempts"]] == ["default", "mixed preset", "mixed preset, full bias correction"]
    assert not any(a["passed"] for a in q["attempts"]) and not q["accuracy_control"]
    assert q["preset"] == "mixed" and q["bias_correction"] == "full"
    search = q["search"]
    outlier_layer, writer = f"{OUTLIER_LAYER} (node_convolution_3)", f"{WRITER} (node_Conv_317)"
    # the outlier layer and the convolution that writes its input ranked first, and both kept;
    # how many more the envelope probes need (1 more on the reference machine: 3 in all, the
    # target) is a measured outcome: benchmarks/fallback.py and its results hold the target
    assert [r["layer"] for r in search["ranked"][:2]] == [outlier_layer, writer]
    assert search["found"] and {outlier_layer, writer} <= set(search["found"])
    assert art["status"] == "verified" and q["worked"] == "auto" and art["accuracy"]["passed"]
    assert search["seconds"] <= search["budget_s"]  # a passing set found within the budget
    passing = [s for s in search["steps"] if s["passed"]]
    assert passing and all(s["class_change"] <= 1e-3 for s in passing)
    assert sorted(search["found"]) == sorted(passing[-1]["layers"])  # the last passing set is the one kept
    # the ConvTranspose named as in ONNX, not ConvolutionBackpropData_N
    assert sorted(art["fp32_nodes"]) == sorted(search["found"])


def test_layers_are_named_both_ways_and_selected_either_way(outlier):
    graph = onnx.load(str(outlier[2] / "outlier_unet.onnx"), load_external_data=False).graph
    nodes = {n.name: n for n in graph.node}
    assert label(nodes["node_convolution_3"]) == "up4.up (node_convolution_3)"
    assert flag_name(graph, nodes["node_convolution_3"]) == "up4.up"
    assert select_nodes(graph, ["up4.up"]) == select_nodes(graph, ["node_convolution_3"]) == ["node_convolution_3"]
    convs = [n for n in select_nodes(graph, ["up4.*"]) if nodes[n].op_type in ("Conv", "ConvTranspose")]
    assert convs == ["node_convolution_3", "node_Conv_319", "node_Conv_321"]


def _fake(passing, seconds=1.0, log=None):
    """A trial that passes when the set includes all of ``passing``."""

    def trial(nodes):
        if log is not None:
            log.append(list(nodes))
        return Step(list(nodes), set(passing) <= set(nodes), seconds=seconds)

    return trial


def test_grow_takes_the_first_passing_prefix_then_drops_what_is_not_needed():
    log = []
    found, steps = grow(["a", "b", "c", "d"], _fake({"a", "c"}, log=log), budget_s=60)
    assert found == ["a", "c"]
    assert log == [["a"], ["a", "b"], ["a", "b", "c"], ["b", "c"], ["a", "c"]]  # a is needed, b is not
    assert [s.passed for s in steps] == [False, False, True, False, True]


def test_grow_stops_when_the_slowest_step_would_overrun_the_budget(monkeypatch):
    clock = iter(range(0, 1000, 10))  # each call to the clock: 10 s later
    monkeypatch.setattr("unet_export.flows.fallback.time.monotonic", lambda: next(clock))
    found, steps = grow(["a", "b", "c"], _fake({"c"}, seconds=10), budget_s=25)
    assert found is None and len(steps) == 1  # started at 0; at 10 +10 <= 25: one step; at 20 +10 > 25: stop


def test_grow_with_no_passing_set_tries_every_prefix():
    found, steps = grow(["a", "b"], _fake({"z"}), budget_s=60)
    assert found is None and [s.fp32 for s in steps] == [["a"], ["a", "b"]]


@pytest.fixture(scope="module")
def fp16_outlier(tmp_path_factory):
    """The outlier model with outliers past FP16's range (2e5) and a tiny weight on them: its FP16
    model overflows (inf x 1e-4) where FP32 barely notices."""
    root = tmp_path_factory.mktemp("fp16")
    weights = write_outlier_checkpoint(root / "outlier16.pth", peak=2e5, leak=1e-4)
    out = root / "exports"
    result = runner.invoke(app, ["onnx", str(weights), "-w", str(out), "--height", str(HEIGHT), "--width", str(WIDTH),
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return weights, out


def test_fp16_onnx_auto_finds_the_layers_and_says_the_cpu_proves_storage_only(fp16_outlier, tmp_path):
    weights, source = fp16_outlier
    out = tmp_path / "exports"
    shutil.copytree(source, out)
    args = ["onnx", str(weights), "-w", str(out), "--height", str(HEIGHT), "--width", str(WIDTH), "--device", "cpu",
            "--fp16", "--data", str(DEMO_VAL)]  # fmt: skip
    found = runner.invoke(app, [*args, "--fallback", "auto"])
    assert found.exit_code == 0, found.output
    art = next(a for a in load_manifest(out)["artifacts"] if a["precision"] == "fp16")
    search = art["fallback"]
    # the FP16 model without FP32 layers, as plain --fp16 builds it, failed the gate
    assert not search["base"]["passed"] and search["base"]["class_change"] > 1e-3
    assert art["status"] == "verified"
    assert {r["layer"] for r in search["ranked"][:3]} >= {f"{OUTLIER_LAYER} (node_convolution_3)"}
    assert sorted(search["found_nodes"]) == ["node_Conv_317", "node_convolution_3"]
    assert "node_relu_15" in art["fp32_nodes"]  # the ReLU between the two stays FP32 with them
    assert "proves the FP16 storage rounding only" in search["note"] and "proves the FP16 storage rounding only" in found.stdout
    assert "re-apply with: --fp32-layers" in found.stdout


def test_two_kept_layers_read_fp32_weights_and_pass_fp32_between_them(outlier, tmp_path):
    """onnxruntime's converter wrapped each blocked node in Casts, so the tensor between two FP32
    layers went through FP16 (inf past 65504) and their weights were stored as FP16."""
    from unet_export.runtimes.onnx.fp16 import convert_onnx_fp16

    info = convert_onnx_fp16(outlier[2] / "outlier_unet.onnx", tmp_path / "m.onnx", [WRITER, OUTLIER_LAYER])
    assert sorted(info["fp32_nodes"]) == ["node_Conv_317", "node_convolution_3", "node_relu_15"]
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    nodes = {n.name: n for n in graph.node}
    writer = {o: n for n in graph.node for o in n.output}
    assert writer[nodes["node_convolution_3"].input[0]].name == "node_relu_15"
    assert writer[nodes["node_relu_15"].input[0]].name == "node_Conv_317"
    fp32 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    for name in ("node_Conv_317", "node_convolution_3"):
        assert all(x in fp32 for x in nodes[name].input[1:]), name


def test_trt_fallback_auto_runs_the_same_search(fp16_outlier, tmp_path, monkeypatch):
    """TensorRT cannot run here and the fake one builds nothing that runs: build_trt is replaced by
    the FP16 ONNX export with the same --fp32-layers (what TensorRT >= 11 builds from), so this
    proves the plumbing (options, search, record), not an engine."""
    import unet_export.cli.export as cli

    weights, source = fp16_outlier
    out = tmp_path / "exports"
    shutil.copytree(source, out)
    seen = []

    def build_trt(workdir, *, fp32_layers=None, data=None, max_class_change=None, min_dice=None, model=None, **kw):
        seen.append(list(fp32_layers or []))
        return cli.export_fp16_onnx(workdir, fp32_layers=fp32_layers, device="cpu", data=data)

    monkeypatch.setattr(cli, "build_trt", build_trt)
    result = runner.invoke(app, ["trt", "-w", str(out), "--data", str(DEMO_VAL), "--fallback", "auto",
                                 "--fp32-layers", "outc.conv"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen[0] == ["outc.conv"] and all(s[0] == "outc.conv" for s in seen) and len(seen) >= 3
    assert "re-apply with: --fp32-layers" in result.stdout and "storage rounding only" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--fallback", "auto"], "--fallback auto searches the FP16 artefact's FP32 layers: add --fp16"),
    (["--fp16", "--fallback", "auto", "--fallback-budget", "-1"], "--fallback-budget must be a number of seconds > 0"),
])  # fmt: skip
def test_onnx_fallback_needs_fp16_and_a_budget(fp16_outlier, tmp_path, args, message):
    result = runner.invoke(app, ["onnx", str(fp16_outlier[0]), "-w", str(tmp_path / "x"), *args, "--data", str(DEMO_VAL)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x").exists()
