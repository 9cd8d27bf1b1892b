"""The library behind `unet-export onnx|torchscript|trt`: checkpoint in, verified artefact out.

    from unet_export.api import export_artifact
    result = export_artifact("weights.pth", "onnx", workdir="exports")
    assert result.passed, result.parity.failures()

export_fp16_onnx and build_trt then start from the workdir's manifest.
"""

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch

from unet_export.checkpoint import Checkpoint, build_model, load_checkpoint
from unet_export.errors import UnetExportError, UserError
from unet_export.export import FORMATS
from unet_export.export.fp16 import convert_onnx_fp16
from unet_export.export.onnx import DEFAULT_OPSET, check_external_data, metadata_json
from unet_export.export.tensorrt import build_engine, import_tensorrt
from unet_export.export.tensorrt_plan import engine_path, plan_build, resolve_profile
from unet_export.fileio import claim_temp_path, ensure_free_space, sha256_file, sweep_stale_temps
from unet_export.manifest import (
    checked_path, load_manifest, make_workdir, publish, set_model, tool_versions, transaction, utc_now,
)
from unet_export.models import get_spec
from unet_export.models.sizes import SizeRule
from unet_export.realimages import HOW, folder_record, gate_images
from unet_export.runners import EagerRunner, artifact_runner
from unet_export.runners.tensorrt import gpu_identity
from unet_export.verify import (  # noqa: F401  FP16, FP32, TOLERANCES: kept importable from here
    FP16, FP32, TOLERANCES, ParityReport, Tolerance, check_parity, seeded_inputs, tolerance_for,
)

# The second parity size is deliberately not a multiple of 16 (milesial pads odd sizes).
SECOND_PARITY_SHAPE = (2, 250, 375)


@dataclass
class ExportResult:
    path: Path
    entry: dict
    parity: ParityReport
    seconds: float
    dropped: int = 0  # manifest entries of a previous checkpoint that were dropped

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


def parity_shapes(rule: SizeRule, channels: int, height: int, width: int, static: bool) -> list[tuple]:
    """The export size, plus (unless static) a batch of 2 at another size the model allows:
    250x375, not a multiple of 16, where the model takes any size."""
    shapes = [(1, channels, height, width)]
    if not static:
        n, h, w = SECOND_PARITY_SHAPE
        shapes.append((n, channels, rule.fit(h), rule.fit(w)))
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
    rtol: float | None = None,
    atol: float | None = None,
    check_staged: Callable[[Path], None] | None = None,
) -> ExportResult:
    """Export a checkpoint to ``fmt`` in ``workdir``, check it against eager, update the manifest.
    The artefact is written and verified under a temp name, then renamed and recorded in one
    locked step: an interrupted export never replaces a verified file. ``rtol``/``atol`` replace
    the FP32 gate's (verify.FP32) and are recorded with the verdict. ``check_staged`` may refuse
    the written file before anything is published (a later step's options that it cannot take)."""
    started = time.perf_counter()
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    tol = tolerance_for("fp32", rtol=rtol, atol=atol)
    ckpt = load_checkpoint(weights, model)
    rule = get_spec(ckpt.architecture).sizes(ckpt.config)
    rule.check(height, width)
    net = build_model(ckpt)
    dev = resolve_device(device)
    workdir = Path(workdir)
    revision = load_manifest(workdir).get("revision", 0)  # a corrupt manifest is refused before any write
    channels = ckpt.config.get("n_channels", 3)
    dest = workdir / f"{Path(weights).stem}{FORMATS[fmt].suffix}"
    metadata = metadata_json(ckpt.record() | {"export_size": [height, width]})

    with _created_dir(workdir), _staged(dest, _estimated_bytes(net), fmt) as staged:
        io = FORMATS[fmt].write(
            net, staged, torch.rand(1, channels, height, width), metadata,
            opset=opset, dynamic=not static, sizes=rule, device=dev,
        )  # fmt: skip
        if check_staged is not None:
            check_staged(staged)
        entry = {"format": fmt, "path": dest.name, "precision": "fp32", **io, "export_size": [height, width],
                 "size_rule": rule.to_dict() | {"static": static}}  # fmt: skip
        inputs = seeded_inputs(parity_shapes(rule, channels, height, width, static), seed)
        parity = run_parity(entry, workdir, net, dev, inputs, tol, path=staged)
        with transaction(workdir) as manifest:
            _refuse_concurrent_model(manifest, ckpt, revision, workdir)
            dropped = set_model(manifest, model_record(ckpt))
            record_artifact(workdir, manifest, entry, parity, dev, staged)
    return ExportResult(dest, entry, parity, time.perf_counter() - started, dropped)


def model_record(ckpt: Checkpoint) -> dict:
    """The manifest's model record: the checkpoint's, with its training sidecar's held-out images
    by path and sha256 (what reduced precision is judged on by verify and bench)."""
    record = ckpt.record()
    heldout = folder_record(record.get("validation"))
    return record | ({"heldout": heldout} if heldout else {})


def require_real_images(precision: str, weights: str | Path, model: str | None, data: str | Path | None) -> None:
    """Refuse, before anything is exported, a reduced-precision export of ``weights`` that would
    have no real images to be judged on (no ``data``, no held-out images in its sidecar)."""
    if data is None and folder_record(load_checkpoint(weights, model).validation) is None:
        raise UserError(f"the {precision} artefact is judged on real images only and {Path(weights).name} has no "
                        f"held-out images recorded (a training sidecar's validation set); {HOW}")  # fmt: skip


def _estimated_bytes(net: torch.nn.Module) -> int:
    """What an FP32 artefact of ``net`` takes on disk, with room for graph, metadata and manifest:
    measured .onnx/.ts/.pt2 files are 1.0-1.3x the weights."""
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    return int(weights * 1.5) + (16 << 20)


@contextmanager
def _staged(dest: Path, need_bytes: int, what: str):
    """A temp path beside ``dest`` for the artefact while it is written and verified; removed
    unless the block publishes it. Dead processes' leftovers are swept first."""
    sweep_stale_temps(dest.parent)
    ensure_free_space(dest.parent, need_bytes, f"the {what} artefact {dest.name}")
    staged = claim_temp_path(dest)
    try:
        yield staged
    except OSError as exc:  # a full disk while writing: name the artefact, not its hidden temp name
        if exc.filename == str(staged):
            exc.filename = str(dest)
        raise
    finally:
        staged.unlink(missing_ok=True)


def _refuse_concurrent_model(manifest: dict, ckpt: Checkpoint, revision: int, workdir: Path) -> None:
    """Two checkpoints exported into one workdir at once: the later one would silently drop what
    the other just recorded. Refuse instead; a re-export after the other finished still replaces."""
    model = manifest.get("model") or {}
    if model and model["checkpoint"]["sha256"] != ckpt.sha256 and manifest.get("revision", 0) != revision:
        raise UserError(f"{workdir} received artefacts of another checkpoint ({model['checkpoint']['path']}) "
                        f"while this export ran; export different checkpoints into different workdirs")  # fmt: skip


def export_fp16_onnx(workdir: str | Path = "exports", *, fp32_layers: list[str] | None = None,
                     device: str = "auto", max_class_change: float | None = None, min_dice: float | None = None,
                     data: str | Path | None = None) -> ExportResult:  # fmt: skip
    """Convert the workdir's verified FP32 ONNX model to FP16 (FP32 inputs and outputs) and check
    it against the eager model with the FP16 tolerances (``max_class_change``/``min_dice`` replace them)
    on real images: ``data``, else the held-out images the manifest records (none: exit 2)."""
    started = time.perf_counter()
    tol = tolerance_for("fp16", max_class_change=max_class_change, min_dice=min_dice)
    workdir = Path(workdir)
    manifest = load_manifest(workdir)
    source = onnx_entry(manifest, workdir)
    net = build_model(manifest_checkpoint(manifest))
    dev = resolve_device(device)
    dest = workdir / Path(source["path"]).with_suffix(".fp16.onnx").name
    entry = {"format": "onnx", "path": dest.name, "precision": "fp16", "export_size": source["export_size"],
             "size_rule": source["size_rule"]}  # fmt: skip
    inputs, entry["real_images"] = gate_images(manifest, entry, data)  # before anything is written
    with _staged(dest, _estimated_bytes(net), "FP16 ONNX") as staged:
        entry |= convert_onnx_fp16(checked_path(workdir, source), staged, fp32_layers)
        parity = run_parity(entry, workdir, net, dev, inputs, tol, path=staged)
        with transaction(workdir) as current:
            _same_model(current, manifest, workdir)
            record_artifact(workdir, current, entry, parity, dev, staged)
    return ExportResult(dest, entry, parity, time.perf_counter() - started)


def _same_model(current: dict, read: dict, workdir: Path) -> None:
    """An artefact derived from the workdir's model is recorded only if that is still the model."""
    if (current.get("model") or {}).get("checkpoint") != (read.get("model") or {}).get("checkpoint"):
        raise UserError(f"the model in {workdir} was replaced by another export while this one ran; run it again")


def run_parity(entry: dict, workdir: Path, net, device, inputs, tol: Tolerance, path: Path | None = None) -> ParityReport:
    """Parity of one manifest entry (its file at ``path`` if given, e.g. before it is published)
    against the eager model, judged by the eager model in float64 (check_parity runs it on the
    CPU); a runtime crash is a failed check."""
    runner = artifact_runner(entry, workdir, device, path=path)
    try:
        with EagerRunner(net, device) as reference, runner:
            return check_parity(runner, reference, inputs, tol)
    except UnetExportError:
        raise
    except Exception as exc:  # the artefact itself would not run: that is a verification failure
        message = " ".join(str(exc).split())[:300]
        error = f"{type(exc).__name__}: {message}"
        return ParityReport(runner.name, tol.name, cases=[], error=error, limits=tol.to_dict())


def record_artifact(workdir: Path, manifest: dict, entry: dict, parity: ParityReport, device, staged: Path) -> None:
    """Inside a manifest transaction: complete the entry with its verdict, provenance, size and
    sha256 (of the very file that was checked), and publish ``staged`` under the entry's name."""
    entry |= {
        "status": "verified" if parity.passed else "failed",
        "bytes": staged.stat().st_size,
        "sha256": sha256_file(staged),
        "parity": parity.to_dict() | {"device": str(device)},
        "versions": tool_versions(),
        "created": utc_now(),
    }
    publish(workdir, manifest, entry, staged)


def manifest_checkpoint(manifest: dict, weights: str | Path | None = None) -> Checkpoint:
    """The checkpoint the workdir's artefacts were exported from (``weights`` if it has moved)."""
    record = manifest.get("model")
    if record is None:
        raise UserError("the workdir has no manifest with a model: run `unet-export onnx WEIGHTS` first")
    path = Path(weights or record["checkpoint"]["path"])
    if not path.exists():
        raise UserError(f"the manifest's checkpoint {path} is gone; pass it with --weights PATH")
    ckpt = load_checkpoint(path, record["architecture"])
    if ckpt.sha256 != record["checkpoint"]["sha256"]:
        raise UserError(f"{path} is not the checkpoint the artefacts were exported from (sha256 differs); export again")
    return ckpt


def onnx_entry(manifest: dict, workdir: Path, path: str | Path | None = None) -> dict:
    """The FP32 ONNX entry of the manifest (or the one at ``path``), which must have verified."""
    for entry in manifest["artifacts"]:
        if entry["format"] == "onnx" and entry["precision"] == "fp32":
            if path is None or Path(path).resolve() == (workdir / entry["path"]).resolve():
                if entry["status"] != "verified":
                    raise UserError(f"{entry['path']} failed its parity check; fix and re-export it first")
                check_external_data(checked_path(workdir, entry))  # the converters read what it names
                return entry
    where = f"{path} is not an ONNX model exported into {workdir}" if path else f"no FP32 ONNX model in {workdir}"
    raise UserError(f"{where}: run `unet-export onnx WEIGHTS --workdir {workdir}` first")


class _created_dir:
    """Create a directory for the block; remove it again if the block fails and left it empty."""

    def __init__(self, path: Path):
        self.path, self.created = path, not path.exists()

    def __enter__(self):
        make_workdir(self.path)

    def __exit__(self, exc_type, *_):
        if exc_type and self.created and not any(self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)


def build_trt(
    workdir: str | Path = "exports",
    *,
    precision: str = "fp16",
    onnx: str | Path | None = None,
    min_shape: str | None = None,
    opt_shape: str | None = None,
    max_shape: str | None = None,
    workspace_gib: float = 4.0,
    timing_cache: str | Path | None = None,
    fp32_layers: list[str] | None = None,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    max_class_change: float | None = None,
    min_dice: float | None = None,
    data: str | Path | None = None,
) -> ExportResult:
    """Build a TensorRT engine from the workdir's ONNX model and check it against eager CUDA
    (judged by float64); the tolerance options replace those of the engine's precision. FP32 is
    judged on seeded inputs; FP16 on real images (``data``, else the manifest's held-out images)."""
    started = time.perf_counter()
    tol = tolerance_for(precision, rtol=rtol, atol=atol, max_class_change=max_class_change, min_dice=min_dice)
    workdir = Path(workdir)
    manifest = load_manifest(workdir)
    source = onnx_entry(manifest, workdir, onnx)
    profile = resolve_profile(source, min_shape, opt_shape, max_shape)
    net = build_model(manifest_checkpoint(manifest))
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise UserError("TensorRT needs an NVIDIA GPU and torch sees no CUDA device here; "
                        "build the engine on the GPU machine that will run it")  # fmt: skip
    real, record = [], None
    if precision != "fp32":  # before the build: an FP16 engine with no real images to judge it is refused
        gate = {"precision": precision, "export_size": source["export_size"], "size_rule": source["size_rule"],
                "profile": profile.to_dict()}  # fmt: skip
        real, record = gate_images(manifest, gate, data)
    plan = plan_build(trt.__version__, precision, fp32_layers)
    onnx_path = workdir / source["path"]
    if plan.source == "fp16-onnx":  # TensorRT >= 11: FP16 comes from the model's types
        onnx_path = export_fp16_onnx(workdir, fp32_layers=fp32_layers, device="cuda", data=data,
                                     max_class_change=max_class_change, min_dice=min_dice).path  # fmt: skip
    dest = engine_path(workdir, source["path"], precision)
    cache = Path(timing_cache) if timing_cache else workdir / "timing.cache"
    with _staged(dest, _estimated_bytes(net), "TensorRT engine") as staged:
        info = build_engine(plan, onnx_path, profile, staged, workspace_gib=workspace_gib, timing_cache=cache,
                            fp32_layers=fp32_layers)  # fmt: skip
        entry = _engine_entry(dest, precision, onnx_path, info, plan, profile, source, fp32_layers, cache)
        dev = torch.device("cuda")
        inputs = real or seeded_inputs(profile.parity_shapes(), seed)
        if record:
            entry["real_images"] = record
        parity = run_parity(entry, workdir, net, dev, inputs, tol, path=staged)
        with transaction(workdir) as current:
            _same_model(current, manifest, workdir)
            record_artifact(workdir, current, entry, parity, dev, staged)
    return ExportResult(dest, entry, parity, time.perf_counter() - started)


def _engine_entry(dest, precision, onnx_path, info, plan, profile, source, fp32_layers, cache) -> dict:
    gpu, capability = gpu_identity(torch.device("cuda"))
    return {"format": "tensorrt", "path": dest.name, "precision": precision, "source_onnx": onnx_path.name,
            **info, "gpu": gpu, "compute_capability": capability, "profile": profile.to_dict(),
            "build": {"fp16_flag": plan.fp16_flag, "strongly_typed": plan.strongly_typed,
                      "fp32_layers": fp32_layers or [], "timing_cache": str(cache)},
            "inputs": source["inputs"], "outputs": source["outputs"], "dynamic_axes": source["dynamic_axes"],
            "export_size": source["export_size"], "size_rule": source["size_rule"]}  # fmt: skip
