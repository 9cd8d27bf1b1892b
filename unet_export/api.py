"""The library behind `unet-export onnx|torchscript`: checkpoint in, verified artefact out.

    from unet_export.api import export_artifact
    result = export_artifact("weights.pth", "onnx", workdir="exports")
    assert result.passed, result.parity.failures()
"""

import functools
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from unet_export.checkpoint import build_model, load_checkpoint
from unet_export.errors import UnetExportError, UserError
from unet_export.export import FORMATS
from unet_export.export.onnx import DEFAULT_OPSET, metadata_json
from unet_export.manifest import load_manifest, save_manifest, set_model, tool_versions, upsert_artifact, utc_now
from unet_export.models import ModelSpec, get_spec
from unet_export.bench import BenchConfig, run_benchmark
from unet_export.runners import BACKENDS, BackendContext, EagerRunner, artifact_runner
from unet_export.runners.onnxruntime import physical_cores
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


@dataclass
class BenchReport:
    device: dict
    versions: dict
    config: dict
    rows: list

    def to_dict(self) -> dict:
        return {"device": self.device, "versions": self.versions, "config": self.config,
                "results": [row.to_dict() for row in self.rows]}  # fmt: skip


def benchmark(
    workdir: str | Path = "exports",
    *,
    batch: int = 8,
    height: int | None = None,
    width: int | None = None,
    backends: list[str] | None = None,
    device: str = "auto",
    weights: str | Path | None = None,
    compile_mode: str = "default",
    on_row=None,
    **timing,
) -> BenchReport:
    """Parity-gate and time every backend on the workdir's model; ``timing`` goes to BenchConfig."""
    workdir = Path(workdir)
    manifest = load_manifest(workdir)
    if manifest.get("model") is None:
        raise UserError(f"no manifest with a model in {workdir}: run `unet-export onnx WEIGHTS --workdir {workdir}` first")
    ckpt = _bench_checkpoint(manifest["model"], weights)
    spec = get_spec(ckpt.architecture)
    height, width = _bench_size(manifest, height, width)
    spec.check_size(height, width)
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    names = _backend_names(backends)
    net, dev = build_model(ckpt), resolve_device(device)
    cfg = BenchConfig(batch=batch, height=height, width=width, **timing)
    channels = ckpt.config.get("n_channels", 3)
    ctx = BackendContext(net, workdir, manifest, dev, (batch, channels, height, width), compile_mode)
    makers = {name: functools.partial(BACKENDS[name], ctx) for name in names}
    rows = run_benchmark(makers, EagerRunner(net, dev), cfg, channels, on_row)
    config = asdict(cfg) | {"backends": names, "compile_mode": compile_mode, "workdir": str(workdir),
                            "model": manifest["model"]}  # fmt: skip
    return BenchReport(device_info(dev), tool_versions("torch", "onnx", "onnxruntime", "openvino", "unet-export"), config, rows)


def _bench_checkpoint(record: dict, weights):
    path = Path(weights or record["checkpoint"]["path"])
    if not path.exists():
        raise UserError(f"the manifest's checkpoint {path} is gone; pass it with --weights PATH")
    ckpt = load_checkpoint(path, record["architecture"])
    if ckpt.sha256 != record["checkpoint"]["sha256"]:
        raise UserError(f"{path} is not the checkpoint the artefacts were exported from (sha256 differs); export again")
    return ckpt


def _bench_size(manifest: dict, height, width) -> tuple[int, int]:
    sizes = [a["export_size"] for a in manifest["artifacts"] if "export_size" in a]
    default = sizes[0] if sizes else (256, 256)
    return height or default[0], width or default[1]


def _backend_names(backends: list[str] | None) -> list[str]:
    names = list(backends or BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise UserError(f"unknown backend(s) {', '.join(unknown)}; choose from: {', '.join(BACKENDS)}")
    return ["eager"] + [n for n in names if n != "eager"]  # the baseline always runs, first


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}
    return {"type": "cpu", "name": _cpu_name(), "cores": physical_cores(), "torch_threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
