"""Checkpoints saved the way milesial/Pytorch-UNet's releases and train.py save them, and the
exports every module shares.

A reduced width (8 instead of 64) keeps the suite fast; the keys are the same and the
full-size model has its own tests. Exporting takes seconds and copying a workdir milliseconds: a
workdir a test needs is exported once per session (``exports``) and each test gets its own copy.
"""

import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from unet_export.flows.demo import random_milesial

# REFERENCE.md 1: the published releases, and what train.py writes.
VARIANTS = {
    "v1": dict(config=dict(n_classes=1, bilinear=True, conv_bias=True), mask_values=None),
    "v2": dict(config=dict(n_classes=2, bilinear=True, conv_bias=True), mask_values=None),
    "v3": dict(config=dict(n_classes=2, bilinear=False, conv_bias=False), mask_values=None),
    "v4": dict(config=dict(n_classes=3, bilinear=False, conv_bias=False), mask_values=[0, 127, 255]),
    "v4-rgb": dict(config=dict(n_classes=2, bilinear=False, conv_bias=False), mask_values=[[0, 0, 0], [255, 0, 0]]),
}
SMALL_WIDTH = 8
REPO = Path(__file__).resolve().parent.parent  # the repository root, wherever a test file sits under tests/


def milesial_state_dict(variant: str, width: int = SMALL_WIDTH, seed: int = 0) -> dict:
    spec = VARIANTS[variant]
    state = random_milesial(seed, n_channels=3, width=width, **spec["config"]).state_dict()
    if spec["mask_values"] is not None:  # train.py: state_dict['mask_values'] = dataset.mask_values
        state["mask_values"] = spec["mask_values"]
    return state


@pytest.fixture
def wrong_torchscript(monkeypatch):
    """The torchscript writer swapped for one that scripts another model (width 8, other weights):
    an export that must fail its parity gate."""
    from unet_export.runtimes.formats import FORMATS

    real = FORMATS["torchscript"]

    def wrong(model, dest, sample, metadata, **kw):
        other = type(model)(**{k: getattr(model, k) for k in ("n_channels", "n_classes", "bilinear")}, width=8)
        other.load_state_dict(milesial_state_dict("v3", seed=1))
        return real.write(other.eval(), dest, sample, metadata, **kw)

    monkeypatch.setitem(FORMATS, "torchscript", real.__class__(wrong, real.suffix))


@pytest.fixture
def make_checkpoint(tmp_path):
    def make(variant: str = "v3", name: str | None = None, width: int = SMALL_WIDTH, wrap: str | None = None):
        state = milesial_state_dict(variant, width)
        path = tmp_path / (name or f"unet_{variant}.pth")
        torch.save({wrap: state} if wrap else state, path)
        return path

    return make


def ignoring_sigint() -> None:
    """Popen's preexec_fn for a child started as a launcher starts a background command (`cmd &`
    in a script, some CI runners): SIGINT ignored, so Python installs no Ctrl-C handler of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- exports made once per session ---------------------------------------------------------------


@dataclass
class Export:
    """One ``unet-export FORMAT WEIGHTS -w WORKDIR --json JSON`` run: the workdir it left (the
    session's original: copy it before changing anything), its stdout and its --json document."""

    workdir: Path
    stdout: str
    json: Path


@dataclass
class ExportCache:
    """Workdirs exported once per session, each keyed by checkpoint, formats and size.

    ``formats`` are exported in order, each by the CLI command of its name (onnx, torchscript, aoti,
    openvino), into a copy of the workdir of the formats before it: ("onnx", "torchscript") is the
    ("onnx",) workdir plus a real `unet-export torchscript` run in it, as a user exporting one format
    after the other gets. So modules that want different sets still share the exports they have in
    common."""

    root: Path
    runs: dict = field(default_factory=dict)

    def checkpoint(self, name: str, variant: str = "v3", seed: int = 0, write=None) -> Path:
        """``name`` in the cache, saved once: ``milesial_state_dict(variant, seed=seed)`` unless ``write(path)``
        writes it."""
        path = self.root / "weights" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path) if write else torch.save(milesial_state_dict(variant, seed=seed), path)
        return path

    def run(self, weights: Path, formats: tuple[str, ...], height: int, width: int) -> Export:
        """The run that exported the last of ``formats`` (and, before it, the rest), made once."""
        from typer.testing import CliRunner

        from unet_export.cli.main import app

        key = (str(weights), tuple(formats), height, width)
        if key not in self.runs:
            before = self.run(weights, formats[:-1], height, width).workdir if len(formats) > 1 else None
            dest = self.root / f"w{len(self.runs)}"
            workdir = dest / "exports"
            if before:
                shutil.copytree(before, workdir)
            args = [formats[-1], str(weights), "-w", str(workdir), "--height", str(height), "--width", str(width),
                    "--device", "cpu", "--json", str(dest / f"{formats[-1]}.json")]  # fmt: skip
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
            self.runs[key] = Export(workdir, result.stdout, dest / f"{formats[-1]}.json")
        return self.runs[key]

    def copy(self, dest: Path, weights: Path, formats: tuple[str, ...], height: int, width: int) -> Path:
        """A copy at ``dest`` of the workdir with ``formats`` exported, that a test may change."""
        return Path(shutil.copytree(self.run(weights, formats, height, width).workdir, dest))


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> ExportCache:
    return ExportCache(tmp_path_factory.mktemp("exports-cache"))


@dataclass
class Int8Run:
    """`unet-export int8` of the shipped demo model: the workdir it left (the session's original:
    copy it before changing anything), its stdout and the folder of calibration images it read."""

    workdir: Path
    stdout: str
    calib: Path


@pytest.fixture(scope="session")
def int8_demo(tmp_path_factory) -> Int8Run:
    """The demo model quantized once per session (NNCF and ONNX Runtime; the slowest export the suite
    makes): calibrated on copies of the demo's calibration images (the last 12 of demo_val; --val is
    the whole of demo_val and the copies must still be recognised, by content, and left out of it)."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from typer.testing import CliRunner

    from unet_export.cli.main import app
    from unet_export.flows.demo import DEMO_SIZE, DEMO_VAL, DEMO_WEIGHTS, demo_calibration

    calib = tmp_path_factory.mktemp("calib")
    for path in demo_calibration():
        shutil.copy(path, calib / path.name)
    out = tmp_path_factory.mktemp("int8") / "exports"
    height, width = DEMO_SIZE
    result = CliRunner().invoke(app, ["int8", str(DEMO_WEIGHTS), "--calib", str(calib), "--val", str(DEMO_VAL),
                                      "-w", str(out), "--height", str(height), "--width", str(width),
                                      "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return Int8Run(out, result.stdout, calib)
