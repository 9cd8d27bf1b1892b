"""The use case behind `unet-export onnx|torchscript|aoti|fp16|trt`: checkpoint in, verified
artefact out (unet_export.api re-exports it).

    from unet_export.api import export_artifact
    result = export_artifact("weights.pth", "onnx", workdir="exports")
    assert result.passed, result.parity.failures()

An nn.Module instead of a checkpoint: ``export_artifact(None, "onnx", model=net)`` (see from_module).

export_fp16_onnx and build_trt then start from the workdir's manifest.
"""

import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch
import torch.nn as nn

from unet_export.checkpoint import Checkpoint, build_model, load_checkpoint
from unet_export.device import resolve_device
from unet_export.errors import UserError
from unet_export.models import ModelChoice, get_spec, mask_threshold
from unet_export.models.sizes import SizeRule
from unet_export.parity import envelope
from unet_export.parity.gate import ParityReport, seeded_inputs, tolerance_for
from unet_export.parity.realimages import HOW, folder_record, gate_and_probes, gate_images, with_probes
from unet_export.parity.run import run_parity
from unet_export.runtimes.formats import FORMATS
from unet_export.runtimes.onnx.export import DEFAULT_OPSET, metadata_json
from unet_export.runtimes.onnx.fp16 import convert_onnx_fp16
from unet_export.runtimes.tensorrt.build import build_engine, import_tensorrt
from unet_export.runtimes.tensorrt.plan import Profile, engine_path, plan_build, resolve_profiles
from unet_export.runtimes.tensorrt.runner import gpu_identity
from unet_export.workdir import publish, references
from unet_export.workdir.lookup import manifest_checkpoint, onnx_entry
from unet_export.workdir.manifest import checked_path, load_manifest, set_model, transaction
from unet_export.workdir.publish import record_artifact

# The two-shape gate's second shape (non-square, no multiple of 16), kept in the public API; the
# gate now checks the envelope's probes (parity_shapes).
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


def parity_shapes(rule: SizeRule, channels: int, height: int, width: int, static: bool, *,
                  max_batch: int | None = None, min_size: tuple[int, int] | None = None,
                  max_size: tuple[int, int] | None = None) -> list[tuple]:  # fmt: skip
    """The shapes the FP32 gate checks: the envelope's probes (parity.envelope), the export size
    first. Static: the export size alone."""
    env = declared_envelope(rule, channels, (height, width), static, max_batch, min_size, max_size)
    return [probe.shape for probe in env.probes((height, width))]


def declared_envelope(rule: SizeRule, channels: int, export_size: tuple[int, int], static: bool,
                      max_batch: int | None, min_size: tuple[int, int] | None,
                      max_size: tuple[int, int] | None) -> envelope.Envelope:  # fmt: skip
    fixed = (1, channels, *export_size) if static else None
    return envelope.declared(rule, channels, export_size, static_shape=fixed, max_batch=max_batch, min_size=min_size,
                             max_size=max_size)  # fmt: skip


def export_artifact(
    weights: str | Path | None,
    fmt: str,
    workdir: str | Path = "exports",
    *,
    model: "str | ModelChoice | nn.Module | None" = None,
    device: str = "auto",
    height: int = 256,
    width: int = 256,
    static: bool = False,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    check_staged: Callable[[Path], None] | None = None,
    max_batch: int | None = None,
    min_size: tuple[int, int] | None = None,
    max_size: tuple[int, int] | None = None,
) -> ExportResult:
    """Export a checkpoint to ``fmt`` in ``workdir``, check it against eager, update the manifest.
    The artefact is written and verified under a temp name, then renamed and recorded in one
    locked step: an interrupted export never replaces a verified file. ``rtol``/``atol`` replace
    the FP32 gate's (verify.FP32) and are recorded with the verdict. ``check_staged`` may refuse
    the written file before anything is published (a later step's options that it cannot take).
    ``model``: --model (and what configures it), or an nn.Module (``weights`` None) to export
    instead of a checkpoint, with ``from_module(net, InputSpec(...))`` saying what it takes.
    ``max_batch``/``min_size``/``max_size``: the envelope it declares and is proven on
    (parity.envelope; default batch 8, the export size to one and a half times it per side)."""
    started = time.perf_counter()
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    tol = tolerance_for("fp32", rtol=rtol, atol=atol)
    ckpt = load_checkpoint(weights, model)
    rule = get_spec(ckpt.architecture).sizes(ckpt.config)
    rule.check(height, width)
    channels = ckpt.config.get("n_channels", 3)
    declared_envelope(rule, channels, (height, width), static, max_batch, min_size, max_size)  # bad options: first
    net = build_model(ckpt)
    dev = resolve_device(device)
    workdir = Path(workdir)
    revision = load_manifest(workdir).get("revision", 0)  # a corrupt manifest is refused before any write
    dest = workdir / f"{ckpt.path.stem}{FORMATS[fmt].suffix}"
    metadata = metadata_json(ckpt.record() | {"export_size": [height, width]})

    with publish.created_dir(workdir), publish.staged(dest, publish.estimated_bytes(net), fmt) as staged:
        io = FORMATS[fmt].write(
            net, staged, torch.rand(1, channels, height, width), metadata,
            opset=opset, dynamic=not static, sizes=rule, device=dev,
        )  # fmt: skip
        if check_staged is not None:
            check_staged(staged)
        # A writer that could only trace (TorchScript) returns a fixed-shape artefact: recorded
        # and gated as --static, which verify, predict and unet-bench read from size_rule.
        static = bool(io.pop("static", False)) or static
        entry = {"format": fmt, "path": dest.name, "precision": "fp32", **io, "export_size": [height, width],
                 "size_rule": rule.to_dict() | {"static": static}}  # fmt: skip
        env = declared_envelope(rule, channels, (height, width), static, max_batch, min_size, max_size)
        probes = env.probes((height, width))
        inputs = seeded_inputs([p.shape for p in probes], seed)
        recording = references.seeded(seed)
        parity = run_parity(entry, workdir, net, dev, inputs, tol, path=staged, threshold=mask_threshold(ckpt.config),
                            capture=recording.batches, probes=[p.label for p in probes])  # fmt: skip
        entry["envelope"] = envelope.record(env, parity)
        with transaction(workdir) as manifest:
            _refuse_concurrent_model(manifest, ckpt, revision, workdir)
            dropped = set_model(manifest, model_record(ckpt))
            record_artifact(workdir, manifest, entry, parity, dev, staged, recording)
    return ExportResult(dest, entry, parity, time.perf_counter() - started, dropped)


def model_record(ckpt: Checkpoint) -> dict:
    """The manifest's model record: the checkpoint's, with its training sidecar's held-out images
    by path and sha256 (what reduced precision is judged on by verify and bench)."""
    record = ckpt.record()
    heldout = folder_record(record.get("validation"))
    return record | ({"heldout": heldout} if heldout else {})


def require_real_images(precision: str, weights: str | Path | None, model, data: str | Path | None) -> None:
    """Refuse, before anything is exported, a reduced-precision export of ``weights`` that would
    have no real images to be judged on (no ``data``, no held-out images in its sidecar)."""
    if data is None and folder_record((ckpt := load_checkpoint(weights, model)).validation) is None:
        raise UserError(f"the {precision} artefact is judged on real images only and {ckpt.path.name} has no "
                        f"held-out images recorded (a training sidecar's validation set); {HOW}")  # fmt: skip


def _refuse_concurrent_model(manifest: dict, ckpt: Checkpoint, revision: int, workdir: Path) -> None:
    """Two checkpoints exported into one workdir at once: the later one would silently drop what
    the other just recorded. Refuse instead; a re-export after the other finished still replaces."""
    model = manifest.get("model") or {}
    if model and model["checkpoint"]["sha256"] != ckpt.sha256 and manifest.get("revision", 0) != revision:
        raise UserError(f"{workdir} received artefacts of another checkpoint ({model['checkpoint']['path']}) "
                        f"while this export ran; export different checkpoints into different workdirs")  # fmt: skip


def export_fp16_onnx(workdir: str | Path = "exports", *, fp32_layers: list[str] | None = None,
                     device: str = "auto", max_class_change: float | None = None, min_dice: float | None = None,
                     data: str | Path | None = None, model=None) -> ExportResult:  # fmt: skip
    """Convert the workdir's verified FP32 ONNX model to FP16 (FP32 inputs and outputs) and check
    it against the eager model with the FP16 tolerances (``max_class_change``/``min_dice`` replace them)
    on real images: ``data``, else the held-out images the manifest records (none: exit 2).
    ``model``: the factory (or nn.Module) that rebuilds a factory's (module's) eager model."""
    started = time.perf_counter()
    tol = tolerance_for("fp16", max_class_change=max_class_change, min_dice=min_dice)
    workdir = Path(workdir)
    manifest = load_manifest(workdir)
    source = onnx_entry(manifest, workdir)
    net = build_model(manifest_checkpoint(manifest, model=model))
    dev = resolve_device(device)
    dest = workdir / Path(source["path"]).with_suffix(".fp16.onnx").name
    entry = {"format": "onnx", "path": dest.name, "precision": "fp16", "export_size": source["export_size"],
             "size_rule": source["size_rule"]}  # fmt: skip
    gate, entry["real_images"] = gate_images(manifest, entry, data)  # before anything is written
    inputs, probes, env = with_probes(gate, inherit_envelope(entry, source))
    recording = references.images(entry["real_images"])
    with publish.staged(dest, publish.estimated_bytes(net), "FP16 ONNX") as staged:
        entry |= convert_onnx_fp16(checked_path(workdir, source), staged, fp32_layers)
        parity = run_parity(entry, workdir, net, dev, inputs, tol, path=staged, probes=probes,
                            threshold=mask_threshold(manifest["model"]["config"]), capture=recording.batches)
        keep_named(recording, len(gate))
        record_envelope(entry, env, parity)
        with transaction(workdir) as current:
            publish.same_model(current, manifest, workdir)
            record_artifact(workdir, current, entry, parity, dev, staged, recording)
    return ExportResult(dest, entry, parity, time.perf_counter() - started)


def inherit_envelope(entry: dict, source: dict) -> dict:
    """A converted artefact (FP16 ONNX, an IR, INT8) declares what its source declared: the
    envelope it is then proven on itself. A source exported before envelopes: none."""
    if (source.get("envelope") or {}).get("declared"):
        entry["envelope"] = {"declared": source["envelope"]["declared"]}
    return entry


def keep_named(recording: references.Recording, images: int) -> None:
    """Keep the recorded eager outputs of the first ``images`` batches, the real images the
    recording names in order (the probes' crops are not theirs: verify re-judges those where
    the model can be rebuilt)."""
    if recording.source.get("source") == "images":
        del recording.batches[images:]


def record_envelope(entry: dict, env: "envelope.Envelope | None", parity: ParityReport) -> None:
    if env is not None:
        entry["envelope"] = envelope.record(env, parity)


def build_trt(
    workdir: str | Path = "exports",
    *,
    precision: str = "fp16",
    onnx: str | Path | None = None,
    min_shape: str | None = None,
    opt_shape: str | None = None,
    max_shape: str | None = None,
    profiles: list[str] | None = None,
    workspace_gib: float = 4.0,
    timing_cache: str | Path | None = None,
    fp32_layers: list[str] | None = None,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    max_class_change: float | None = None,
    min_dice: float | None = None,
    data: str | Path | None = None,
    model=None,
) -> ExportResult:
    """Build a TensorRT engine from the workdir's ONNX model and check it against eager CUDA
    (judged by float64); the tolerance options replace those of the engine's precision. FP32 is
    judged on seeded inputs; FP16 on real images (``data``, else the manifest's held-out images).
    ``profiles``: the engine's optimisation profiles, each 'MIN:OPT:MAX' (NxCxHxW each), instead of
    the one profile of ``min_shape``/``opt_shape``/``max_shape``; the gate checks every profile at
    its corners and edges (the envelope, parity.envelope) and the entry records its proof.
    ``model``: the factory (or nn.Module) that rebuilds a factory's (module's) eager model."""
    started = time.perf_counter()
    tol = tolerance_for(precision, rtol=rtol, atol=atol, max_class_change=max_class_change, min_dice=min_dice)
    workdir = Path(workdir)
    manifest = load_manifest(workdir)
    source = onnx_entry(manifest, workdir, onnx)
    chosen = resolve_profiles(source, profiles, min_shape, opt_shape, max_shape)
    env = engine_envelope(source, chosen)
    net = build_model(manifest_checkpoint(manifest, model=model))
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise UserError("TensorRT needs an NVIDIA GPU and torch sees no CUDA device here; "
                        "build the engine on the GPU machine that will run it")  # fmt: skip
    real, record = [], None
    if precision != "fp32":  # before the build: an FP16 engine with no real images to judge it is refused
        gate = {"precision": precision, "export_size": source["export_size"], "size_rule": source["size_rule"],
                **profile_records(chosen)}  # fmt: skip
        real, record = gate_images(manifest, gate, data)
    plan = plan_build(trt.__version__, precision, fp32_layers)
    onnx_path = workdir / source["path"]
    if plan.source == "fp16-onnx":  # TensorRT >= 11: FP16 comes from the model's types
        onnx_path = export_fp16_onnx(workdir, fp32_layers=fp32_layers, device="cuda", data=data, model=model,
                                     max_class_change=max_class_change, min_dice=min_dice).path  # fmt: skip
    dest = engine_path(workdir, source["path"], precision)
    cache = Path(timing_cache) if timing_cache else workdir / "timing.cache"
    with publish.staged(dest, publish.estimated_bytes(net), "TensorRT engine") as staged:
        info = build_engine(plan, onnx_path, chosen, staged, workspace_gib=workspace_gib, timing_cache=cache,
                            fp32_layers=fp32_layers)  # fmt: skip
        entry = _engine_entry(dest, precision, onnx_path, info, plan, chosen, source, fp32_layers, cache)
        dev = torch.device("cuda")
        # FP16: the real images as they come, then cropped or mirrored to every probe; FP32: seeded probes.
        if real:
            inputs, labels = gate_and_probes(real, env, tuple(source["export_size"]))
        else:
            probes = env.probes(tuple(source["export_size"]))
            inputs, labels = seeded_inputs([p.shape for p in probes], seed), [p.label for p in probes]
        if record:
            entry["real_images"] = record
        recording = references.images(record) if real else references.seeded(seed)
        parity = run_parity(entry, workdir, net, dev, inputs, tol, path=staged,
                            threshold=mask_threshold(manifest["model"]["config"]), capture=recording.batches,
                            probes=labels)  # fmt: skip
        keep_named(recording, len(real))
        entry["envelope"] = envelope.record(env, parity)
        with transaction(workdir) as current:
            publish.same_model(current, manifest, workdir)
            record_artifact(workdir, current, entry, parity, dev, staged, recording)
    return ExportResult(dest, entry, parity, time.perf_counter() - started)


def engine_envelope(source: dict, profiles: list[Profile]) -> envelope.Envelope:
    """What an engine built from the ONNX entry ``source`` declares: one box per profile."""
    rule = SizeRule.from_record(source["size_rule"])
    channels = int(source["inputs"][0]["shape"][1])
    return envelope.declared(rule, channels, tuple(source["export_size"]), profiles=[p.to_dict() for p in profiles])


def profile_records(profiles: list[Profile]) -> dict:
    """An engine entry's "profiles" (in the engine's order) and "profile", the first, which readers
    written before there could be several still read."""
    return {"profile": profiles[0].to_dict(), "profiles": [p.to_dict() for p in profiles]}


def _engine_entry(dest, precision, onnx_path, info, plan, profiles, source, fp32_layers, cache) -> dict:
    gpu, capability = gpu_identity(torch.device("cuda"))
    return {"format": "tensorrt", "path": dest.name, "precision": precision, "source_onnx": onnx_path.name,
            **info, "gpu": gpu, "compute_capability": capability, **profile_records(profiles),
            "build": {"fp16_flag": plan.fp16_flag, "strongly_typed": plan.strongly_typed,
                      "fp32_layers": fp32_layers or [], "timing_cache": str(cache)},
            "inputs": source["inputs"], "outputs": source["outputs"], "dynamic_axes": source["dynamic_axes"],
            "export_size": source["export_size"], "size_rule": source["size_rule"]}  # fmt: skip
