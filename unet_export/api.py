"""The library behind `unet-export onnx|torchscript`: checkpoint in, verified artefact out.

    from unet_export.api import export_artifact
    result = export_artifact("weights.pth", "onnx", workdir="exports")
    assert result.passed, result.parity.failures()
"""

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unet_export.checkpoint import build_model, load_checkpoint
from unet_export.errors import UnetExportError, UserError
from unet_export.export import FORMATS
from unet_export.export.onnx import DEFAULT_OPSET, metadata_json
from unet_export.manifest import load_manifest, save_manifest, set_model, tool_versions, upsert_artifact, utc_now
from unet_export.models import ModelSpec, get_spec
from unet_export.runners import EagerRunner, artifact_runner
from unet_export.verify import FP32, ParityReport, check_parity, seeded_inputs

# The second parity size is deliberately not a multiple of 16 (milesial pads odd sizes).
SECOND_PARITY_SHAPE = (2, 250, 375)


@dataclass
class ExportResult:
    path: Path
    entry: dict
    parity: ParityReport
    seconds: float
    dropped: int = 0  # manifest entries of a previous checkpoint that were dropped
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.parity.passed


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def parity_shapes(spec: ModelSpec, channels: int, height: int, width: int, static: bool) -> list[tuple]:
    """The export size, plus (unless static) a batch of 2 at a size the model allows but
    that is not a multiple of 16 where the model takes any size."""
    shapes = [(1, channels, height, width)]
    if not static:
        n, h, w = SECOND_PARITY_SHAPE
        m = spec.size_multiple
        shapes.append((n, channels, max(spec.min_size, h // m * m), max(spec.min_size, w // m * m)))
    return shapes


def export_artifact(
    weights: str | Path,
    fmt: str,
    workdir: str | Path = "exports",
    *,
    model: str | None = None,
    device: str = "auto",
    height: int = 256,
    width: int = 256,
    static: bool = False,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
) -> ExportResult:
    """Export a checkpoint to ``fmt`` in ``workdir``, check it against eager, update the manifest."""
    started = time.perf_counter()
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    ckpt = load_checkpoint(weights, model)
    spec = get_spec(ckpt.architecture)
    spec.check_size(height, width)
    net = build_model(ckpt)
    dev = resolve_device(device)
    workdir = Path(workdir)
    manifest = load_manifest(workdir)  # a corrupt manifest is refused before anything is written
    channels = ckpt.config.get("n_channels", 3)
    dest = workdir / f"{Path(weights).stem}{FORMATS[fmt].suffix}"
    metadata = metadata_json(ckpt.record() | {"export_size": [height, width]})

    with _created_dir(workdir):
        io = FORMATS[fmt].write(
            net, dest, torch.rand(1, channels, height, width), metadata,
            opset=opset, dynamic=not static, min_size=spec.min_size, size_multiple=spec.size_multiple,
        )  # fmt: skip
    entry = {"format": fmt, "path": dest.name, "precision": "fp32", **io}
    inputs = seeded_inputs(parity_shapes(spec, channels, height, width, static), seed)
    parity = run_parity(entry, workdir, net, dev, inputs)
    entry |= {
        "status": "verified" if parity.passed else "failed",
        "export_size": [height, width],
        "size_rule": {"min": spec.min_size, "multiple": spec.size_multiple, "static": static},
        "bytes": dest.stat().st_size,
        "parity": parity.to_dict() | {"device": str(dev)},
        "versions": tool_versions(),
        "created": utc_now(),
    }
    dropped = set_model(manifest, ckpt.record())
    upsert_artifact(manifest, entry)
    save_manifest(workdir, manifest)
    return ExportResult(dest, entry, parity, time.perf_counter() - started, dropped)


def run_parity(entry: dict, workdir: Path, net, device, inputs) -> ParityReport:
    """Parity of one manifest entry against the eager model; a runtime crash is a failed check."""
    runner = artifact_runner(entry, workdir, device)
    try:
        with EagerRunner(net, device) as reference, runner:
            return check_parity(runner, reference, inputs, FP32)
    except UnetExportError:
        raise
    except Exception as exc:  # the artefact itself would not run: that is a verification failure
        message = " ".join(str(exc).split())[:300]
        return ParityReport(runner.name, FP32.name, cases=[], error=f"{type(exc).__name__}: {message}")


class _created_dir:
    """Create a directory for the block; remove it again if the block fails and left it empty."""

    def __init__(self, path: Path):
        self.path, self.created = path, not path.exists()

    def __enter__(self):
        self.path.mkdir(parents=True, exist_ok=True)

    def __exit__(self, exc_type, *_):
        if exc_type and self.created and not any(self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)
