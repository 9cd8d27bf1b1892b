"""`unet-export verify`: the parity gate again, for every artefact of a workdir, on this machine.

After copying the exports to a deployment host, or upgrading a runtime, the verdicts recorded at
export time say nothing about this machine. This re-runs each entry's gate (the tolerances it
was recorded with, unless overridden) and writes the new verdicts into the manifest under its
lock. FP32 is judged on the seeded inputs at its recorded parity shapes plus real images;
FP16/BF16/INT8 on real images only (realimages.py): --data, else the images recorded in the
manifest. Without any, a reduced-precision artefact is "not judged here" and keeps its verdict.
Every file's sha256 is checked before any parity runs: a changed one stops the run (exit 2).
"""

import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unet_export.checkpoint import build_model
from unet_export.data.dataset import Preprocess
from unet_export.device import device_info, resolve_device
from unet_export.errors import EagerUnavailable, IntegrityError, UserError
from unet_export.models import mask_threshold
from unet_export.parity import envelope
from unet_export.parity.gate import GATE_IMAGES, ParityReport, seeded_inputs, tolerance_for, tolerance_from_record
from unet_export.parity.realimages import (
    IMAGES,
    fitted,
    image_batches,
    judged_on_images_only,
    not_judged,
    gate_and_probes,
    real_images_for,
)
from unet_export.parity.run import run_parity
from unet_export.runtimes.recorded import References
from unet_export.workdir.lookup import manifest_checkpoint
from unet_export.workdir.manifest import checked_path, load_manifest, tool_versions, transaction, utc_now
from unet_export.workdir.references import recorded_references


@dataclass
class Verdict:
    """One manifest entry: verified | failed (re-checked here), changed | missing (file is not the
    recorded one), unavailable (cannot run on this machine), not_judged (reduced precision
    without real images) or unreferenced (the eager model cannot be rebuilt here and no recorded
    references hold its inputs); those last three leave the recorded verdict as it was."""

    format: str
    precision: str
    path: str
    status: str
    reason: str = ""
    parity: ParityReport | None = None
    sha256: str | None = None
    envelope: dict | None = None  # the envelope re-proven here (parity.envelope.record)


@dataclass
class VerifyReport:
    workdir: Path
    host: dict
    inputs: str
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """2: a file changed or is missing, or an artefact cannot be judged (no eager model and no
        recorded references for it); 1: an artefact failed parity; 0: all verified."""
        if any(v.status in ("changed", "missing", "unreferenced") for v in self.verdicts):
            return 2
        return 1 if any(v.status == "failed" for v in self.verdicts) else 0


def verify_workdir(
    workdir: str | Path = "exports",
    *,
    data: str | Path | None = None,
    device: str = "auto",
    weights: str | Path | None = None,
    images: int = IMAGES,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    max_class_change: float | None = None,
    min_dice: float | None = None,
    model=None,
) -> VerifyReport:
    """Re-run the parity gate of every artefact in ``workdir``'s manifest and record the verdicts.
    FP32 is judged on the seeded inputs and the real images; FP16/BF16/INT8 on the real images
    only (``data``, else those recorded in the manifest), and without any it is not judged here.
    ``model`` rebuilds a factory's eager model (--model-factory) or an in-memory module's (the
    module): the manifest's own record of them is never run."""
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
    dev = resolve_device(device)
    report = VerifyReport(workdir, host_record(dev), "")
    # Every file's bytes first: a changed artefact stops the run before minutes of parity checks.
    report.verdicts = [v for e in manifest["artifacts"] if (v := _integrity(e, workdir)) is not None]
    if report.verdicts:
        return report
    net, stand_in = _eager_or_recorded(workdir, manifest, weights, model)
    sources = set()
    # --data or the model's held-out set, found (every recorded file hashed) once for the workdir;
    # only an artefact with gate images of its own looks again.
    shared = real_images_for(manifest, None, data, images)
    for entry in manifest["artifacts"]:
        own = data is None and entry.get("real_images") is not None
        paths, source, why = real_images_for(manifest, entry, data, images) if own else shared
        sources.add(source or "no real images")
        judged = _verify_entry(entry, workdir, net, dev, (paths, why), seed, limits, manifest, stand_in)
        report.verdicts.append(judged)
    report.inputs = "seeded (fp32 only) + real images: " + "; ".join(sorted(sources))
    if stand_in is not None:
        report.inputs = f"{stand_in.judged}, on the recorded inputs among: {report.inputs}"
    _record(workdir, report)
    return report


@dataclass
class Recorded:
    """The eager model's recorded outputs, judging in its place where it cannot be rebuilt."""

    references: References
    why: str  # why the eager model was not rebuilt

    @property
    def judged(self) -> str:
        return f"judged against recorded float64 references (eager not rebuilt: {self.why})"


def _eager_or_recorded(workdir: Path, manifest: dict, weights, model=None) -> tuple[torch.nn.Module | None, Recorded | None]:
    """The eager model, or (where it cannot be rebuilt: smp missing, a factory not importable or
    not trusted) the outputs recorded when its artefacts were published; neither is exit 2."""
    try:
        return build_model(manifest_checkpoint(manifest, weights, model)), None
    except EagerUnavailable as exc:
        return None, Recorded(recorded_references(workdir, manifest, str(exc)), str(exc))


def integrity_problem(entry: dict, workdir: Path) -> tuple[str, str] | None:
    """("missing" or "changed", why) for an entry whose file is not the one verified, else None
    (verify, and `unet-export report`, say so of it)."""
    try:
        checked_path(workdir, entry)
        return None
    except IntegrityError as exc:
        return ("missing" if "missing" in str(exc) else "changed"), str(exc)


def _integrity(entry: dict, workdir: Path) -> Verdict | None:
    """A verdict for an entry whose file is missing or not the one verified, else None."""
    problem = integrity_problem(entry, workdir)
    if problem is None:
        return None
    return Verdict(entry["format"], entry["precision"], entry["path"], *problem, sha256=entry.get("sha256"))


def _verify_entry(entry: dict, workdir: Path, net, dev: torch.device, real: tuple[list[Path], str], seed: int,
                  limits: dict, manifest: dict, stand_in: Recorded | None = None) -> Verdict:  # fmt: skip
    verdict = Verdict(entry["format"], entry["precision"], entry["path"], "unavailable", sha256=entry.get("sha256"))
    if reason := _cannot_run_here(entry, dev):
        verdict.reason = reason
        return verdict
    paths, why = real
    reduced = judged_on_images_only(entry["precision"])
    if reduced and not paths:
        verdict.status, verdict.reason = "not_judged", not_judged(entry["precision"], why)
        return verdict
    recorded = entry.get("parity") or {}
    tol = tolerance_for(entry["precision"], base=tolerance_from_record(recorded.get("limits"), entry["precision"]),
                        **limits)  # fmt: skip
    model = manifest["model"]
    channels = int(model["config"].get("n_channels", 3))
    env = envelope.of_entry(entry)
    shapes, seeded_probes = _seeded_shapes(entry, env, recorded, channels)
    real_inputs = fitted(image_batches(paths, channels, Preprocess.from_dict(model.get("preprocess"))), entry)
    seeded = [] if reduced else seeded_inputs(shapes, seed)
    if stand_in is not None:
        seeded, real_inputs, verdict.reason = _recorded_inputs(stand_in, seeded, real_inputs)
        if not verdict.reason:
            verdict.status, verdict.reason = "unreferenced", _unreferenced(stand_in, entry, reduced)
            return verdict
    real_probes = [GATE_IMAGES] * len(real_inputs)
    if env is not None and reduced and stand_in is None:  # the envelope again, on the real images
        real_inputs, real_probes = gate_and_probes(real_inputs, env, tuple(entry["export_size"]))
    labels = ["seeded"] * len(seeded) + ["images"] * len(real_inputs)
    # the seeded probes (none left when recorded references could not hold them), then the images
    probes = seeded_probes[: len(seeded)] + real_probes if env is not None else None
    try:
        verdict.parity = run_parity(entry, workdir, net, dev, seeded + real_inputs, tol,
                                    threshold=mask_threshold(model["config"]), probes=probes,
                                    recorded=stand_in.references if stand_in is not None else None)
    except IntegrityError as exc:  # replaced while this ran
        verdict.status, verdict.reason = "changed", str(exc)
        return verdict
    except UserError as exc:  # no runtime for it here (not installed, unknown format): the others still run
        verdict.reason = str(exc)
        return verdict
    for case, label in zip(verdict.parity.cases, labels):
        case.label = label
    verdict.status = "verified" if verdict.parity.passed else "failed"
    if env is not None:
        verdict.envelope = envelope.record(env, verdict.parity)
    return verdict


def _seeded_shapes(entry: dict, env, recorded: dict, channels: int) -> tuple[list[tuple], list[str] | None]:
    """The FP32 gate's seeded shapes: the envelope's probes; an entry exported before envelopes,
    the shapes its own gate recorded (or, when that crashed first, the export size at batch 1)."""
    if env is not None:
        probes = env.probes(tuple(entry["export_size"]))
        return [p.shape for p in probes], [p.label for p in probes]
    shapes = [tuple(case["shape"]) for case in recorded.get("cases", []) if case.get("label") != "images"]
    return shapes or [(1, channels, *entry["export_size"])], None


def _recorded_inputs(recorded: Recorded, seeded: list, real: list) -> tuple[list, list, str]:
    """(seeded inputs, real-image batches, the verdict's reason) judged against the recorded
    references: every seeded input must be recorded; real images only count where they were
    (the FP32 gate ran on seeded inputs alone). An empty reason: nothing can be judged."""
    known = [x for x in real if recorded.references.knows(x)]
    if not all(recorded.references.knows(x) for x in seeded) or not (seeded or known):
        return [], [], ""
    return seeded, known, recorded.judged


def _unreferenced(recorded: Recorded, entry: dict, reduced: bool) -> str:
    what = "the real images it is judged on" if reduced else "its seeded inputs"
    return (f"no recorded float64 references for {what} and the eager model cannot be rebuilt here "
            f"({recorded.why}): verify it where the model can be rebuilt, or export it again")  # fmt: skip


def _cannot_run_here(entry: dict, dev: torch.device) -> str:
    if entry["format"] == "tensorrt" and dev.type != "cuda":
        return "a TensorRT engine runs on CUDA only: verify it on its GPU machine"
    if entry["format"] == "aoti" and entry.get("device", "cpu") != dev.type:
        return f"compiled for {entry.get('device')}, this check runs on {dev.type} (--device)"
    return ""


def host_record(dev: torch.device) -> dict:
    """Where a verdict was reached: machine, device and the versions of everything that ran."""
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
            if verdict.envelope is not None:  # proven on this host: what predict, triton and bench trust
                entry["verified_on"]["envelope"] = verdict.envelope
