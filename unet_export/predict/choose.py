"""Which runtime `predict` runs: MODEL as one file runs as that file; MODEL as a workdir runs the
artefact `--runtime` names, or with `--runtime auto` the fastest verified artefact the device can
run, timed here (median of 3 runs at batch 1 and the export size, after one warm-up) and
remembered per workdir and machine (predict.remember)."""

import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from unet_export.errors import UnetExportError, UserError
from unet_export.inference.predictor import Predictor, entry_predictor, load_predictor, runtime_label
from unet_export.parity import envelope
from unet_export.parity.gate import seeded_inputs
import unet_export.predict.remember as remember
from unet_export.workdir.manifest import load_manifest


def open_model(model, device, runtime: str = "auto", architecture: str | None = None, *, measure: bool = True,
               timing=lambda labels: nullcontext()) -> tuple[Predictor, str]:  # fmt: skip
    """(predictor, a line saying how the runtime was chosen, or ''). ``measure=False``: nothing
    will run (every mask is done), so with nothing remembered no runtime is timed either.
    ``timing(labels)``: a context manager around the timing (the CLI's progress lines). The
    predictor of a manifest entry carries the envelope it was proven on (parity.envelope): it is
    never run outside it."""
    predictor, note = _open(model, device, runtime, architecture, measure=measure, timing=timing)
    if predictor.entry is not None:
        predictor.envelope = envelope.of_entry(predictor.entry)
    return predictor, note


def _open(model, device, runtime: str, architecture: str | None, *, measure: bool, timing) -> tuple[Predictor, str]:
    path, device = Path(model), torch.device(device)
    # A save_pretrained folder (config.json, no manifest) is a checkpoint: the eager model.
    if not path.is_dir() or ((path / "config.json").is_file() and not (path / "manifest.json").is_file()):
        predictor = load_predictor(path, device, architecture)
        if runtime not in ("auto", predictor.label):
            raise UserError(f"--runtime {runtime}: {path.name} runs with {predictor.label}; give a workdir to choose "
                            "among its artefacts")  # fmt: skip
        return predictor, ""
    if not (path / "manifest.json").is_file():
        raise UserError(f"{path} has no manifest.json: MODEL is a checkpoint, an artefact or a workdir of exports")
    manifest = load_manifest(path)
    candidates = runnable(manifest, device)
    if runtime != "auto":
        if runtime not in candidates:
            have = ", ".join(candidates) or "none"
            raise UserError(f"--runtime {runtime}: no verified artefact in {path}/manifest.json runs with it on "
                            f"{device.type} (there: {have})")  # fmt: skip
        return entry_predictor(manifest, candidates[runtime], path, device), ""
    if not candidates:
        raise UserError(f"no verified artefact in {path}/manifest.json runs on {device.type}: export one first "
                        f"(unet-export onnx WEIGHTS -w {path})")  # fmt: skip
    if len(candidates) == 1:
        (label, entry), = candidates.items()
        return entry_predictor(manifest, entry, path, device), f"runtime auto: {label}, the only verified artefact for {device.type}"
    best, note = _fastest(manifest, candidates, path, device, measure, timing)
    return entry_predictor(manifest, candidates[best], path, device), note


def _fastest(manifest: dict, candidates: dict, workdir: Path, device, measure: bool, timing) -> tuple[str, str]:
    """(label, note): the choice remembered for this machine and these artefacts, else timed
    here and remembered (predict.remember)."""
    key = remember.key_of(device, candidates)
    known = remember.recall(workdir, key)
    if known is not None:
        return known["runtime"], (f"runtime auto: {known['runtime']}, remembered from {known['measured']} "
                                  f"({_timings(known['runtime'], known['ms'])}; {workdir / remember.CACHE})")  # fmt: skip
    if not measure:
        first = next(iter(candidates))
        return first, f"runtime auto: {first}, not timed: every mask is already done (--resume)"
    with timing(list(candidates)):
        timings = {label: per_image_ms(manifest, entry, workdir, device) for label, entry in candidates.items()}
    best = min(timings, key=timings.get)
    if timings[best] == float("inf"):
        raise UserError(f"no runtime could run the artefacts in {workdir} here ({', '.join(timings)} tried)")
    if all(ms < float("inf") for ms in timings.values()):  # a runtime that failed here may work next time
        remember.remember(workdir, key, best, timings)
    return best, f"runtime auto: {best} ({_timings(best, timings)})"


def _timings(best: str, timings: dict[str, float]) -> str:
    others = ", ".join(f"{label} {ms:.1f}" for label, ms in sorted(timings.items(), key=lambda kv: kv[1]) if label != best)
    return f"{timings[best]:.1f} ms/image at batch 1; {others}"


def runnable(manifest: dict, device: torch.device) -> dict[str, dict]:
    """label -> the first verified entry of each runtime the device can run, in manifest order."""
    found: dict[str, dict] = {}
    for entry in manifest["artifacts"]:
        if entry["status"] == "verified" and _runs_on(entry, device.type):
            found.setdefault(runtime_label(entry["format"], entry["precision"]), entry)
    return found


def _runs_on(entry: dict, device: str) -> bool:
    if entry["format"] == "tensorrt":
        return device == "cuda"
    if entry["format"] == "openvino":
        return device == "cpu"
    if entry["format"] == "aoti":  # compiled for one device
        return entry.get("device", "cpu") == device
    return True


def per_image_ms(manifest: dict, entry: dict, workdir: Path, device, repeats: int = 3) -> float:
    try:
        predictor = entry_predictor(manifest, entry, workdir, device)
        channels = manifest["model"]["config"].get("n_channels", 3)
        shape = (predictor.fixed_batch or 1, channels, *(predictor.fixed or entry["export_size"]))
        (x,) = seeded_inputs([shape])
        with predictor.runner as runner:
            runner.infer(x)  # session set-up, shape compilation
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                runner.infer(x)
                runner.synchronize()
                times.append(time.perf_counter() - began)
    except UnetExportError:
        raise
    except Exception:  # this runtime cannot run the artefact here: no candidate
        return float("inf")
    return statistics.median(times) * 1e3 / shape[0]
