"""The TensorRT code and its test double, held to the real TensorRT Python API.

tests/data/tensorrt_api.json is read from the real bindings wheels, tensorrt-cu12-bindings 10.13.0.35 for
10.x and tensorrt-cu13-bindings 11.4.0.106 for 11.x, by scripts/tensorrt_api.py (the command, the wheels'
sha256 and how each fact was read are in the file). Offline, these tests fail if
- the fake (tests/fake_tensorrt.py) has a name, kind or enum value that real version lacks, or a name the
  code does not use on that version;
- the code reads a TensorRT name that real version lacks, on the paths it takes for that version (recorded
  by running the builder and the runner on every path against the fake of that version);
- a TensorRT name written in the code is on none of those paths, so it would escape the check.
"""

import ast
import enum
import json
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from onnx import helper

from tests.conftest import REPO
from tests.fake_tensorrt import MODULE, install_fake_cuda, make_fake_tensorrt
from unet_export.errors import ArtifactError, UserError
from unet_export.runtimes.tensorrt.build import build_engine
from unet_export.runtimes.tensorrt.plan import Profile, plan_build
from unet_export.runtimes.tensorrt.runner import TensorRTRunner

ROOT = REPO
API = json.loads((ROOT / "tests" / "data" / "tensorrt_api.json").read_text())
MAJORS = ("10", "11")
SOURCES = [ROOT / "unet_export" / "runtimes" / "tensorrt" / "build.py", ROOT / "unet_export" / "runtimes" / "tensorrt" / "runner.py"]
# The names the two modules give TensorRT objects, so the source can be read without running it.
ROOTS = {"trt": MODULE, "self.trt": MODULE, "builder": "Builder", "network": "INetworkDefinition",
         "parser": "OnnxParser", "err": "ParserError", "config": "IBuilderConfig", "layer": "ILayer",
         "opt_profile": "IOptimizationProfile", "cache": "ITimingCache", "self.engine": "ICudaEngine",
         "self.context": "IExecutionContext"}  # fmt: skip
PROFILE = Profile((1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64))
BATCH8 = Profile((8, 3, 64, 64), (8, 3, 64, 64), (8, 3, 64, 64))


# --- reading the real API, the fake and the source --------------------------------------------


def real_member(api: dict, owner: str, name: str):
    """The kind of a name ("class", "method", "property", "value", "DataType.FLOAT") or None if absent."""
    if owner == MODULE:
        return api["module"].get(name)
    return api["classes"].get(owner, {}).get("members", {}).get(name)


def real_value(api: dict, owner: str, name: str):
    entry = api["classes"].get(owner, {})
    return entry.get("enum", entry.get("values", {})).get(name)


def unknown_names(api: dict, used) -> list[str]:
    """The (owner, name) reads that this real version does not have."""
    return sorted(f"{owner}.{name}" for owner, name in used if real_member(api, owner, name) is None)


def fake_surface(trt) -> dict:
    """(owner, name) -> what the fake offers: a kind as the JSON spells it, or an enum member's value."""
    surface = {}
    for name, value in vars(trt).items():
        if not name.startswith("_") or name == "__version__":
            kind = f"{type(value).__name__}.{value.name}" if isinstance(value, enum.Enum) else "value"
            surface[(MODULE, name)] = "class" if isinstance(value, type) else kind
    for cls in trt._classes:
        owner = vars(cls)["_trt_name"]
        if issubclass(cls, enum.Enum):
            surface |= {(owner, m.name): m.value for m in cls.__members__.values()}
            continue
        for name, attr in vars(cls).items():  # fake classes derive from none of each other
            if not name.startswith("_"):
                kind = "class" if isinstance(attr, type) else "property" if isinstance(attr, property) else "method"
                surface[(owner, name)] = kind
    return surface


def surface_problems(api: dict, surface: dict) -> list[str]:
    problems = []
    for (owner, name), fake in sorted(surface.items(), key=str):
        real = real_value(api, owner, name) if isinstance(fake, int) else real_member(api, owner, name)
        if real is None:
            problems.append(f"{owner}.{name}: not in TensorRT {api['version']}")
        elif real != fake:
            problems.append(f"{owner}.{name}: the fake has {fake!r}, TensorRT {api['version']} {real!r}")
    return problems


def unused(surface: dict, used) -> list[str]:
    """Fake names the code never read. An enum reached only through aliases (DataType via trt.float32) is
    not a name the code can read, so its members are not asked for."""
    named = {n if o == MODULE else f"{o}.{n}" for (o, n), kind in surface.items() if kind == "class"}
    readable = [(o, n) for (o, n), v in surface.items() if isinstance(v, str) or o in named]
    return sorted(f"{o}.{n}" for o, n in readable if (o, n) not in used)


def source_names(text: str) -> set[tuple[str, str]]:
    """(owner, name) for every attribute chain rooted at a TensorRT object (ROOTS), and every
    getattr/hasattr probe of one with a constant name."""
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Attribute):
            found |= _chain_names(_dotted(node))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
            target, name = node.args[0], node.args[1]
            if isinstance(name, ast.Constant) and (path := _dotted(target)):
                found |= _chain_names([*path, name.value])
    return {(o, n) for o, n in found if not n.startswith("_") or n == "__version__"}


def _dotted(node) -> list[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    return [node.id, *parts] if isinstance(node, ast.Name) else []


def _chain_names(path: list[str]) -> set[tuple[str, str]]:
    for size in (2, 1):  # self.engine before self
        owner = ROOTS.get(".".join(path[:size]))
        if owner and len(path) > size:
            names = set()
            for name in path[size:]:
                names.add((owner, name))
                owner = name if owner == MODULE else f"{owner}.{name}"
                if not any(owner in API["versions"][m]["classes"] for m in MAJORS):
                    break  # layer.name.startswith: past a value, the chain is no longer TensorRT's
            return names
    return set()


# --- every path of the code, run against the fake of one version ------------------------------


def exercise(version: str, root: Path) -> set[tuple[str, str]]:
    """Run the builder and the runner down each path they have on ``version``; return what they read."""
    used: set[tuple[str, str]] = set()
    model = root / "tiny.onnx"
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="node_conv2d_18")
    onnx.save(helper.make_model(helper.make_graph([conv], "g", [], [])), str(model))
    cache = root / "t.cache"

    def build(precision="fp16", layers=None, cache_bytes=None):
        if cache_bytes is not None:
            cache.write_bytes(cache_bytes)
        plan = plan_build(version, precision, layers)
        build_engine(plan, model, [PROFILE, BATCH8], root / "e.engine", timing_cache=cache, fp32_layers=layers)

    def run(plan=b"PLAN", batch=2):
        (root / "r.engine").write_bytes(plan)
        record = {"profiles": [PROFILE.to_dict(), BATCH8.to_dict()], "tensorrt_version": version,
                  "compute_capability": "9.0"}  # batch 8 runs on the second profile: a switch  # fmt: skip
        runner = TensorRTRunner(root / "r.engine", "cuda", "fp16", record=record).activate()
        runner._infer_impl(torch.randn(batch, 3, 64, 64))
        runner.deactivate()

    paths = [  # (what to run, its arguments, the fake's knobs)
        (build, {"layers": ["node_conv2d_18"]}, {}), (build, {}, {}), (build, {"precision": "fp32"}, {}),
        (build, {"cache_bytes": b"junk"}, {}), (build, {"cache_bytes": b"cache:A100"}, {}),
        (build, {}, {"timing_cache_ok": False}), (build, {}, {"build_ok": False}), (build, {}, {"profile_ok": False}),
        (build, {}, {"parse_errors": [("node_pad", "Pad", "x")]}),
        (run, {}, {}), (run, {"batch": 8}, {}), (run, {}, {"io_dtypes": ("HALF", "BF16")}),
        (run, {"plan": b"foreign"}, {}),
        (run, {}, {"context_ok": False}),
    ]  # fmt: skip
    for path, kwargs, knobs in paths:
        with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the timing-cache warnings; tests/runtimes/test_tensorrt.py checks them
            trt = make_fake_tensorrt(version, **knobs)
            mp.setitem(sys.modules, "tensorrt", trt)
            install_fake_cuda(mp)
            try:
                path(**kwargs)
            except (UserError, ArtifactError):
                pass  # the failure paths end here, by design
            used |= trt._used
    return used


@pytest.fixture(scope="module")
def used(tmp_path_factory) -> dict[str, set]:
    versions = {major: API["versions"][major]["version"] for major in MAJORS}
    return {major: exercise(version, tmp_path_factory.mktemp(f"trt{major}")) for major, version in versions.items()}


# --- the checks ---------------------------------------------------------------------------------


def test_the_data_comes_from_the_real_wheels():
    assert "scripts/tensorrt_api.py" in API["generated_by"]
    for major, dist in (("10", "tensorrt_cu12_bindings-10.13.0.35-"), ("11", "tensorrt_cu13_bindings-11.4.0.106-")):
        data = API["versions"][major]
        assert data["wheel"].startswith(dist) and len(data["sha256"]) == 64
        assert all(not check["problems"] for check in data["checks"].values()), data["checks"]
    assert API["versions"]["10"]["checks"]["pyi"]["enum_values_compared"] > 300  # the stubs agreed on each


def test_the_facts_the_code_depends_on():
    """REFERENCE.md section 8, as the data has it: what changed between 10.x and 11.x."""
    v10, v11 = (API["versions"][m] for m in MAJORS)
    assert real_value(v10, "NetworkDefinitionCreationFlag", "STRONGLY_TYPED") == 1
    assert real_value(v11, "NetworkDefinitionCreationFlag", "STRONGLY_TYPED") == 0
    assert real_value(v11, "NetworkDefinitionCreationFlag", "PREFER_JIT_PYTHON_PLUGINS") == 1
    assert real_member(v10, "NetworkDefinitionCreationFlag", "EXPLICIT_BATCH")
    for owner, name in (("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH"), ("BuilderFlag", "FP16"),
                        ("BuilderFlag", "OBEY_PRECISION_CONSTRAINTS"), ("ILayer", "precision"),
                        ("ILayer", "set_output_type"), (MODULE, "IInt8Calibrator")):  # fmt: skip
        assert real_member(v10, owner, name) and real_member(v11, owner, name) is None, (owner, name)
    for api in (v10, v11):
        assert real_member(api, "OnnxParser", "num_errors") == "property"
        assert real_member(api, "ParserError", "node_name") == "method"
        assert real_member(api, "ICudaEngine", "num_io_tensors") == "property"


@pytest.mark.parametrize("major", MAJORS)
def test_the_fake_offers_only_the_real_api(major):
    api = API["versions"][major]
    assert surface_problems(api, fake_surface(make_fake_tensorrt(api["version"]))) == []


@pytest.mark.parametrize("major", MAJORS)
def test_the_code_reads_only_the_real_api(major, used):
    assert unknown_names(API["versions"][major], used[major]) == []


@pytest.mark.parametrize("major", MAJORS)
def test_the_fake_offers_nothing_the_code_does_not_use(major, used):
    api = API["versions"][major]
    assert unused(fake_surface(make_fake_tensorrt(api["version"])), used[major]) == []


def test_every_tensorrt_name_in_the_code_is_on_a_checked_path(used):
    written = set().union(*(source_names(path.read_text()) for path in SOURCES))
    assert written, "the source reader found no TensorRT names"
    assert sorted(written - used["10"] - used["11"]) == []


def test_the_checks_can_fail():
    """The 10.x-only API on an 11.x path, a wrong enum value, an unused fake name, an unexercised name."""
    v10, v11 = (API["versions"][m] for m in MAJORS)
    removed = {("BuilderFlag", "FP16"), ("ILayer", "precision"), ("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH")}
    assert unknown_names(v11, removed) == sorted(f"{o}.{n}" for o, n in removed)
    assert unknown_names(v10, removed) == []
    surface = fake_surface(make_fake_tensorrt(v11["version"]))
    wrong = surface | {("BuilderFlag", "FP16"): 0, ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"): 1}
    assert surface_problems(v11, wrong) == [
        "BuilderFlag.FP16: not in TensorRT 11.4.0.106",
        "NetworkDefinitionCreationFlag.STRONGLY_TYPED: the fake has 1, TensorRT 11.4.0.106 0",
    ]
    assert unused(surface, set()) and "BuilderFlag.TF32" in unused(surface, set())
    snippet = "def f(trt, config):\n    config.set_flag(trt.BuilderFlag.INT8)\n    hasattr(trt.BuilderFlag, 'FP8')\n"
    assert source_names(snippet) == {(MODULE, "BuilderFlag"), ("BuilderFlag", "INT8"), ("BuilderFlag", "FP8"),
                                     ("IBuilderConfig", "set_flag")}  # fmt: skip
