"""`unet-export verify`: the parity gate again, for every artefact of a workdir, on this machine.

After copying the exports to a deployment host, or upgrading a runtime, the verdicts recorded at
export time say nothing about this machine. This re-runs each entry's gate (the tolerances it
was recorded with, unless overridden) on the seeded inputs at its recorded parity shapes, plus
batches of real images when given, and writes the new verdicts into the manifest under its lock.
A file whose sha256 is not the recorded one is reported as changed, never re-verified.
"""

import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from unet_export.api import manifest_checkpoint, resolve_device, run_parity
from unet_export.checkpoint import build_model
from unet_export.data.dataset import Preprocess, image_to_tensor, load_image
from unet_export.errors import IntegrityError, UserError
from unet_export.models.sizes import SizeRule
from unet_export.manifest import checked_path, load_manifest, tool_versions, transaction, utc_now
from unet_export.verify import ParityReport, seeded_inputs, tolerance_for, tolerance_from_record

IMAGES_PER_BATCH = 4


@dataclass
class Verdict:
    """One manifest entry: verified | failed (re-checked here), changed | missing (file is not the
    recorded one), unavailable (cannot run on this machine; its verdict is left as it was)."""

    format: str
    precision: str
    path: str
    status: str
    reason: str = ""
    parity: ParityReport | None = None
    sha256: str | None = None


@dataclass
class VerifyReport:
    workdir: Path
    host: dict
    inputs: str
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """2: a file changed or is missing; 1: an artefact failed parity; 0: all verified."""
        if any(v.status in ("changed", "missing") for v in self.verdicts):
            return 2
        return 1 if any(v.status == "failed" for v in self.verdicts) else 0


def verify_workdir(
    workdir: str | Path = "exports",
    *,
    data: str | Path | None = None,
    device: str = "auto",
    weights: str | Path | None = None,
    images: int = 8,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    max_class_change: float | None = None,
    min_dice: float | None = None,
) -> VerifyReport:
    """Re-run the parity gate of every artefact in ``workdir``'s manifest and record the verdicts."""
    workdir = Path(workdir)
    manifest = load_manifest(workdir)
    if manifest.get("model") is None or not manifest["artifacts"]:
        raise UserError(f"no artefacts in {workdir}/manifest.json: "
                        f"run `unet-export onnx WEIGHTS --workdir {workdir}` first")  # fmt: skip
    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    limits = dict(rtol=rtol, atol=atol, max_class_change=max_class_change, min_dice=min_dice)
    for precision in {entry["precision"] for entry in manifest["artifacts"]}:
        tolerance_for(precision, **limits)  # a bad value is refused before anything runs
    net = build_model(manifest_checkpoint(manifest, weights))
    dev = resolve_device(device)
    model = manifest["model"]
    channels = int(model["config"].get("n_channels", 3))
    real = image_batches(data, channels, Preprocess.from_dict(model.get("preprocess")), images) if data else []
    inputs = f"seeded + {sum(len(b) for b in real)} images from {data}" if data else "seeded"
    report = VerifyReport(workdir, host_record(dev), inputs)
    for entry in manifest["artifacts"]:
        report.verdicts.append(_verify_entry(entry, workdir, net, dev, real, seed, limits))
    _record(workdir, report)
    return report


def _verify_entry(entry: dict, workdir: Path, net, dev: torch.device, real: list[torch.Tensor], seed: int,
                  limits: dict) -> Verdict:  # fmt: skip
    verdict = Verdict(entry["format"], entry["precision"], entry["path"], "unavailable", sha256=entry.get("sha256"))
    try:
        checked_path(workdir, entry)
    except IntegrityError as exc:
        verdict.status = "missing" if "missing" in str(exc) else "changed"
        verdict.reason = str(exc)
        return verdict
    if reason := _cannot_run_here(entry, dev):
        verdict.reason = reason
        return verdict
    recorded = entry.get("parity") or {}
    tol = tolerance_for(entry["precision"], base=tolerance_from_record(recorded.get("limits"), entry["precision"]),
                        **limits)  # fmt: skip
    shapes = [tuple(case["shape"]) for case in recorded.get("cases", [])]
    if not shapes:  # its export-time check crashed before comparing anything: the export size, batch 1
        shapes = [(1, int(getattr(net, "n_channels", 3)), *entry["export_size"])]
    inputs = seeded_inputs(shapes, seed) + _fitted(real, entry)
    labels = ["seeded"] * len(shapes) + ["images"] * (len(inputs) - len(shapes))
    try:
        verdict.parity = run_parity(entry, workdir, net, dev, inputs, tol)
    except IntegrityError as exc:  # replaced while this ran
        verdict.status, verdict.reason = "changed", str(exc)
        return verdict
    except UserError as exc:  # no runtime for it here (not installed, unknown format): the others still run
        verdict.reason = str(exc)
        return verdict
    for case, label in zip(verdict.parity.cases, labels):
        case.label = label
    verdict.status = "verified" if verdict.parity.passed else "failed"
    return verdict


def _cannot_run_here(entry: dict, dev: torch.device) -> str:
    if entry["format"] == "tensorrt" and dev.type != "cuda":
        return "a TensorRT engine runs on CUDA only: verify it on its GPU machine"
    if entry["format"] == "aoti" and entry.get("device", "cpu") != dev.type:
        return f"compiled for {entry.get('device')}, this check runs on {dev.type} (--device)"
    return ""


def _fitted(batches: list[torch.Tensor], entry: dict) -> list[torch.Tensor]:
    """Real-image batches at their own size when the artefact takes it, else at its export size,
    split to the batch sizes it accepts."""
    if not batches:
        return []
    height, width = entry["export_size"]
    most = IMAGES_PER_BATCH
    if entry.get("size_rule", {}).get("static"):
        most = 1  # a static artefact takes exactly its 1xCxHxW export shape
    elif "profile" in entry:  # a TensorRT engine: inside its optimisation profile
        most = min(most, entry["profile"]["max"][0])
    out = []
    for batch in batches:
        if batch.shape[-2:] != (height, width) and not _takes_size(entry, *batch.shape[-2:]):
            batch = F.interpolate(batch, (height, width), mode="bilinear", align_corners=False)
        out += list(batch.split(most))
    return out


def _takes_size(entry: dict, height: int, width: int) -> bool:
    """Whether a dynamic artefact runs images at their own size: judged at the scale the model
    was trained on, not rescaled to the export size (reduced precision on rescaled images is a
    false alarm; see bench._bench_size)."""
    rule = {k: v for k, v in entry.get("size_rule", {}).items() if k in ("min", "multiple", "offset", "shrink")}
    if entry.get("size_rule", {}).get("static") or not rule:
        return False
    if "profile" in entry:  # a TensorRT engine: inside its optimisation profile
        low, high = entry["profile"]["min"], entry["profile"]["max"]
        if not (low[2] <= height <= high[2] and low[3] <= width <= high[3]):
            return False
    sizes = SizeRule(**rule)
    return sizes.accepts(height) and sizes.accepts(width)


def image_batches(data: str | Path, channels: int, pp: Preprocess, limit: int) -> list[torch.Tensor]:
    """Up to ``limit`` images of ``data``, preprocessed as the model was trained (scale or
    pad-to-square, /255), in batches of IMAGES_PER_BATCH at the first image's size."""
    from unet_export.bench import image_paths

    tensors = []
    for path in image_paths(data)[:limit]:
        tensor = image_to_tensor(load_image(path), pp)
        if tensor.shape[0] == 1 and channels == 3:
            tensor = tensor.expand(3, -1, -1)  # grey image, colour model: as training reads it
        if tensor.shape[0] != channels:
            raise UserError(f"{path} has {tensor.shape[0]} channel(s); the model takes {channels}")
        tensors.append(tensor)
    size = tensors[0].shape[-2:]
    tensors = [t if t.shape[-2:] == size else F.interpolate(t[None], size, mode="bilinear")[0] for t in tensors]
    return list(torch.stack(tensors).split(IMAGES_PER_BATCH))


def host_record(dev: torch.device) -> dict:
    """Where a verdict was reached: machine, device and the versions of everything that ran."""
    from unet_export.bench import device_info

    return {"host": socket.gethostname(), "device": str(dev), "device_name": device_info(dev)["name"],
            "time": utc_now(),
            "versions": tool_versions("unet-export", "torch", "onnxruntime", "openvino", "tensorrt")}  # fmt: skip


def _record(workdir: Path, report: VerifyReport) -> None:
    """Write each re-checked verdict into the entry it checked, under the manifest's lock; an
    entry replaced meanwhile (another sha256) keeps the newer export's verdict."""
    checked = {(v.format, v.precision, v.path, v.sha256): v for v in report.verdicts if v.parity is not None}
    if not checked:
        return
    with transaction(workdir) as manifest:
        for entry in manifest["artifacts"]:
            verdict = checked.get((entry["format"], entry["precision"], entry["path"], entry.get("sha256")))
            if verdict is None:
                continue
            entry["status"] = verdict.status
            entry["verified_on"] = report.host | {"inputs": report.inputs,
                                                  "parity": verdict.parity.to_dict()}  # fmt: skip
