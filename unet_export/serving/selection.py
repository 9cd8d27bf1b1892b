"""Which manifest entries a Triton repository publishes, and which CPU runtime the Python-backend
model runs: only verified artefacts, a failed one is named and left out, never served."""

import importlib.util
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from unet_export.errors import UnetExportError, UserError
from unet_export.parity.gate import seeded_inputs
from unet_export.runtimes import OpenVinoRunner
from unet_export.serving.configs import NATIVE
from unet_export.workdir.manifest import checked_path
from unet_export.workdir.runners import artifact_runner

PYTHON_FORMAT = "python"
# Formats Triton could take but this repository does not publish, and why.
NOT_SERVED = {"aoti": "Triton's torch_aoti platform (26.03+) serves batch 1 only; the TorchScript or ONNX model serves "
                      "the same network with batching"}  # fmt: skip
RUNTIMES = ("onnxruntime", "openvino")


@dataclass
class Selection:
    publish: list[dict]  # verified entries of native formats
    python: bool  # write the Python-backend model
    skipped: list[str] = field(default_factory=list)  # what was left out, and why
    python_precision: str | None = None  # `--formats python:fp32`: only artefacts of this precision


def parse_formats(text: str | None) -> list[tuple[str, str | None]] | None:
    """'onnx,tensorrt:fp16,python' -> [('onnx', None), ('tensorrt', 'fp16'), ('python', None)]."""
    if text is None:
        return None
    items = []
    for item in (part.strip() for part in text.split(",")):
        fmt, _, precision = item.partition(":")
        known = [*NATIVE, *NOT_SERVED, PYTHON_FORMAT]
        if fmt not in known:
            raise UserError(f"--formats: unknown format {fmt!r}; choose from {', '.join(known)} (FORMAT or "
                            f"FORMAT:PRECISION)")  # fmt: skip
        items.append((fmt, precision or None))
    return items


def select(manifest: dict, workdir: Path, formats: list[tuple[str, str | None]] | None) -> Selection:
    entries = manifest["artifacts"]
    if formats is None:  # everything that passed; the failed and the unservable are reported
        chosen = Selection([e for e in entries if _publishable(e)], python=True)
        chosen.skipped = [_why_not(e) for e in entries if not _publishable(e)]
        return chosen
    python = [precision for fmt, precision in formats if fmt == PYTHON_FORMAT]
    chosen = Selection([], python=bool(python), python_precision=python[0] if python else None)
    for fmt, precision in (item for item in formats if item[0] != PYTHON_FORMAT):
        label = f"{fmt}:{precision}" if precision else fmt
        matching = [e for e in entries if e["format"] == fmt and precision in (None, e["precision"])]
        if not matching:
            raise UserError(f"--formats {label}: no such artefact in {workdir}/manifest.json")
        if fmt in NOT_SERVED:
            raise UserError(f"--formats {label}: not published: {NOT_SERVED[fmt]}")
        passing = [e for e in matching if e["status"] == "verified"]
        if not passing or (precision and len(passing) < len(matching)):
            failed = ", ".join(e["path"] for e in matching if e["status"] != "verified")
            raise UserError(f"--formats {label}: {failed} failed its parity check, and a failed artefact is never "
                            f"published; fix and re-export it, or leave it out of --formats")  # fmt: skip
        chosen.skipped += [_why_not(e) for e in matching if e not in passing]
        chosen.publish += [e for e in passing if e not in chosen.publish]
    return chosen


def _publishable(entry: dict) -> bool:
    return entry["status"] == "verified" and entry["format"] in NATIVE


def _why_not(entry: dict) -> str:
    what = f"{entry['path']} ({entry['format']} {entry['precision']})"
    if entry["status"] != "verified":
        return f"{what}: failed its parity check, not published"
    return f"{what}: {NOT_SERVED.get(entry['format'], 'no Triton backend for this format')}"


@dataclass
class RuntimeChoice:
    entry: dict
    runtime: str  # onnxruntime | openvino
    timings_ms: dict[str, float]  # "<artefact> with <runtime>" -> median latency, batch 1
    shape: tuple[int, ...]


def cpu_candidates(manifest: dict, runtime: str = "auto", precision: str | None = None) -> list[tuple[dict, str]]:
    """(entry, runtime) pairs the Python model could run, of ``precision`` (default fp32): verified
    ONNX models with ONNX Runtime (FP32 ones with OpenVINO too), verified OpenVINO IR with OpenVINO. FP16 ONNX is left out: on
    a CPU its FP16 nodes run as FP32 through casts, slower and no more exact."""
    have_openvino = importlib.util.find_spec("openvino") is not None
    found = []
    for entry in (e for e in manifest["artifacts"] if e["status"] == "verified"):
        if entry["format"] == "onnx" and entry["precision"] != "fp16":
            found.append((entry, "onnxruntime"))
            if have_openvino and entry["precision"] == "fp32":
                found.append((entry, "openvino"))
        elif entry["format"] == "openvino" and have_openvino:
            found.append((entry, "openvino"))
    # FP32 unless asked (`--formats python:int8`): the default served model is the exact one; an
    # INT8 artefact is published as its own native model, and faster is no reason to swap it in.
    return [(e, r) for e, r in found if runtime in ("auto", r) and e["precision"] == (precision or "fp32")]


def choose_cpu_runtime(manifest: dict, workdir: Path, runtime: str = "auto", precision: str | None = None,
                       repeats: int = 5) -> RuntimeChoice:  # fmt: skip
    """The fastest candidate, measured here: median of ``repeats`` batch-1 runs at the export size."""
    candidates = cpu_candidates(manifest, runtime, precision)
    if not candidates:
        what = "a verified ONNX model (not FP16)" + (" or OpenVINO IR" if runtime != "onnxruntime" else "")
        also = (f" that {runtime} can run" if runtime != "auto" else "") + (f" in {precision}" if precision else "")
        raise UserError(f"the Python-backend model needs {what}{also} in {workdir}: run `unet-export onnx "
                        f"WEIGHTS --workdir {workdir}` first, or leave python out of --formats")  # fmt: skip
    entry = candidates[0][0]
    channels = manifest["model"]["config"].get("n_channels", 3)
    shape = (1, channels, *entry["export_size"])
    timings = {}
    for candidate, name in candidates:
        timings[(candidate["path"], name)] = _median_ms(candidate, name, workdir, shape, repeats)
    (path, name), fastest = min(timings.items(), key=lambda item: item[1])
    if fastest == float("inf"):
        raise UserError(f"no CPU runtime could run {path} here ({', '.join(r for _, r in candidates)} tried)")
    best = next(e for e, r in candidates if e["path"] == path and r == name)
    return RuntimeChoice(best, name, {f"{p} with {r}": round(ms, 2) for (p, r), ms in timings.items()}, shape)


def cpu_runner(entry: dict, runtime: str, workdir: Path):
    """The runner for ``entry`` with ``runtime``, as the Python model runs it (an ONNX model may
    run on OpenVINO)."""
    if entry["format"] == "onnx" and runtime == "openvino":
        return OpenVinoRunner(checked_path(workdir, entry), "cpu", entry["precision"])
    return artifact_runner(entry, workdir, "cpu")  # the runner that verified it (files checked against their sha256)


def _median_ms(entry: dict, runtime: str, workdir: Path, shape: tuple, repeats: int) -> float:
    runner = cpu_runner(entry, runtime, workdir)
    (x,) = seeded_inputs([shape])
    try:
        with runner:
            runner.infer(x)  # first call: session set-up and shape compilation
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                runner.infer(x)
                times.append((time.perf_counter() - began) * 1e3)
    except UnetExportError:
        raise
    except Exception:  # this runtime cannot run the artefact here: it is no candidate
        return float("inf")
    return statistics.median(times)
