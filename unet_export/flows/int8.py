"""INT8 for the CPU, gated on Dice: NNCF post-training quantisation of the OpenVINO IR, and ONNX
Runtime's static QDQ quantisation of the ONNX model, both calibrated on real images preprocessed
exactly as the model was trained (the checkpoint's sidecar).

Each INT8 artefact is verified on real images, never noise (INT8 on noise says nothing): the
held-out ``val`` images when given (calibration images are always dropped from them), else the
calibration images. The gate: at most ``max_class_change`` of pixels change class and Dice vs
eager >= ``min_dice`` per batch (the FP16 defaults), and with masks Dice vs ground truth at most
``max_dice_drop`` below eager's. When the default quantisation fails, the fixes people apply by
hand are tried in order (ATTEMPTS) and the manifest records each attempt and which one worked.

    from unet_export.flows.int8 import quantize_int8
    results = quantize_int8("weights.pth", "calib_imgs/", "exports", val="val_set/")
"""

import contextlib
import functools
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from unet_export.checkpoint import build_model, load_checkpoint
from unet_export.errors import ArtifactError, UnetExportError, UserError, require
from unet_export.flows.export import ExportResult, inherit_envelope, record_envelope
from unet_export.flows.fallback import DEFAULT_BUDGET_S, best_ms, record, Search, Step, step_numbers, grow
from unet_export.flows.int8_gate import (
    GateSet,
    Images,
    add_probes,
    calibration_images,
    gate_set,
    judge,
    mask_dice,
    validation_samples,
)
from unet_export.flows.openvino import ensure_onnx, export_openvino, record_ir
from unet_export.parity import envelope
from unet_export.parity.gate import Tolerance, tolerance_for
from unet_export.parity.realimages import image_record
from unet_export.runtimes.int8 import AccuracyControl, Attempt, NncfQuantizer, OrtQuantizer
from unet_export.runtimes.onnx.fp16 import fp32_nodes
from unet_export.runtimes.onnx.layers import CONVS
from unet_export.runtimes.onnx.sensitivity import rank_layers
from unet_export.workdir.runners import artifact_runner
from unet_export.workdir import publish, references
from unet_export.workdir.ir import finish_pending_weights, ir_weights
from unet_export.workdir.manifest import checked_path, load_manifest, transaction
from unet_export.workdir.publish import record_artifact

ENGINES = {"openvino": "openvino", "onnxruntime": "onnx"}  # --engine -> the artefact's format
FALLBACKS = ("presets", "auto", "none")  # the ATTEMPTS ladder (default), the FP32 layer search, the default only
RANK_IMAGES = 8  # calibration images the layer ranking runs on (each convolution alone, twice)


# The default, then what people do by hand, each step keeping the previous ones. NNCF already
# applies fast bias correction by default, so its last step is the full (slower) bias correction.
# ONNX Runtime's default is already the mixed scheme (uint8 asymmetric activations, int8 symmetric
# per-channel weights): its recommendation for x86 with VNNI, measured 1.3x faster here than
# symmetric int8 activations, which bring it no speed at all; quantize_static has no bias correction.
ATTEMPTS = {
    "openvino": [
        Attempt("default"),
        Attempt("mixed preset", "mixed"),
        Attempt("first and last conv in FP32", "mixed", True),
        Attempt("full bias correction", "mixed", True, False),
    ],
    "onnxruntime": [
        Attempt("default", "mixed", fast_bias_correction=None),
        Attempt("first and last conv in FP32", "mixed", True, None),
    ],
}
# --fallback auto: first the recipes that keep no convolution in FP32 (they cost quantisation
# time, never speed), then the search for FP32 layers from the last of them. NNCF's full bias
# correction is one: on the outlier model it passes the gate alone (benchmarks/fallback.py).
FREE_ATTEMPTS = {
    "openvino": [*ATTEMPTS["openvino"][:2], Attempt("mixed preset, full bias correction", "mixed", False, False)],
    "onnxruntime": ATTEMPTS["onnxruntime"][:1],
}


def quantize_int8(weights: str | Path | None, calib: str | Path | list, workdir: str | Path = "exports", *, val: str | Path | None = None,
                  engine: str = "all", subset: int | None = None, max_dice_drop: float = 0.005,
                  max_class_change: float | None = None, min_dice: float | None = None, fallback: bool | str = True,
                  fp32_layers: list[str] | None = None, fallback_budget: float = DEFAULT_BUDGET_S, mask_suffix: str = "_mask", model: str | None = None, device: str = "auto", height: int = 256,
                  width: int = 256, on_result=None) -> list[ExportResult]:  # fmt: skip
    """INT8 artefacts of ``weights`` for each engine (openvino, onnxruntime or all), calibrated on
    ``calib`` (a folder, or a list of image files) and gated on real images; the FP32 ONNX model
    and IR they start from are exported (and verified) first if ``workdir`` lacks them. Every
    input is checked before anything is written. ``on_result`` sees each ExportResult
    (prerequisites included) as it lands. ``fallback``: "presets" (True) tries ATTEMPTS in turn,
    "auto" tries FREE_ATTEMPTS, then searches for FP32 layers within ``fallback_budget`` seconds
    (NNCF's accuracy control is then left to the search), "none" (False) the default only; ``fp32_layers`` (globs on module
    path, node name or op type) stay FP32 in every attempt."""
    mode = {True: "presets", False: "none"}.get(fallback, fallback)
    if mode not in FALLBACKS:
        raise UserError(f"--fallback {fallback!r}: choose {', '.join(FALLBACKS)}")
    if not math.isfinite(fallback_budget) or fallback_budget <= 0:
        raise UserError(f"--fallback-budget must be a number of seconds > 0, got {fallback_budget}")
    engines = list(ENGINES) if engine == "all" else [engine]
    if any(e not in ENGINES for e in engines):
        raise UserError(f"--engine {engine!r}: choose openvino, onnxruntime or all")
    if "openvino" in engines:  # a missing runtime is exit 2 before anything is written
        require("openvino", extra="openvino"), require("nncf", extra="openvino")
    if "onnxruntime" in engines:
        require("onnxruntime.quantization", "onnxruntime")
    if not math.isfinite(max_dice_drop) or max_dice_drop < 0:
        raise UserError(f"--max-dice-drop must be a finite number >= 0, got {max_dice_drop}")
    tol = tolerance_for("int8", max_class_change=max_class_change, min_dice=min_dice)
    ckpt = load_checkpoint(weights, model)
    images = calibration_images(calib, ckpt, subset)
    samples = validation_samples(val, ckpt, images, mask_suffix) if val is not None else None
    workdir, sources = Path(workdir), {}
    with publish.created_dir(workdir):
        sources["onnx"] = ensure_onnx(
            weights, workdir, model=model, device=device, height=height, width=width, on_result=on_result
        )
    kept = _fp32_convs(workdir / sources["onnx"]["path"], fp32_layers)
    if "openvino" in engines:
        sources["openvino"] = _ensure_ir(weights, workdir, model, on_result)
    net = build_model(ckpt)
    gates = gate_set(net, ckpt, images, samples)
    add_probes(gates, net, envelope.of_entry(sources["onnx"]), tuple(sources["onnx"]["export_size"]))
    results = []
    for name in engines:
        if name == "openvino":
            quantizer = _nncf(workdir, sources, images, gates, max_dice_drop, control=mode != "auto")
        else:
            quantizer = OrtQuantizer(workdir / sources["onnx"]["path"], sources["onnx"]["inputs"][0]["name"], images)
        ladder = {"presets": ATTEMPTS[name], "auto": FREE_ATTEMPTS[name]}.get(mode, ATTEMPTS[name][:1])  # none: the default
        attempts = [replace(a, fp32=kept) for a in ladder]
        budget = fallback_budget if mode == "auto" else None
        try:
            results.append(
                _quantize(quantizer, attempts, workdir, sources["onnx"], net, images, gates, tol, max_dice_drop, budget)
            )
        finally:
            getattr(quantizer, "close", lambda: None)()
        if on_result:
            on_result(results[-1])
    return results


def _fp32_convs(onnx_path: Path, patterns: list[str] | None) -> tuple[str, ...]:
    """The convolutions of the FP32 ONNX model that --fp32-layers selects (module path or node
    name); patterns that select none are refused (exit 2), as for the FP16 model."""
    if not patterns:
        return ()
    model = require("onnx").load(str(onnx_path), load_external_data=False)
    convs = {n.name for n in model.graph.node if n.op_type in CONVS}
    chosen = [n for n in fp32_nodes(model, patterns, onnx_path.name) if n in convs]
    if not chosen:
        raise UserError(f"--fp32-layers {' '.join(patterns)} selects no convolution of {onnx_path.name}: INT8 keeps "
                        "convolutions (Conv, ConvTranspose) in FP32")  # fmt: skip
    return tuple(chosen)


def _nncf(workdir: Path, sources: dict, images: Images, gates: GateSet, max_dice_drop: float,
          control: bool = True) -> NncfQuantizer:  # fmt: skip
    """NNCF on the verified FP32 IR (both files checked), with accuracy control on Dice vs ground
    truth when the gate set has masks (--val) and ``control`` (not under --fallback auto, whose
    search keeps layers in FP32 by the full gate instead)."""
    source = checked_path(workdir, sources["openvino"])
    accuracy = None
    if gates.eager_dice is not None and control:
        labelled = [batch for batch in gates.batches if batch[3] is not None]  # not the envelope's crops

        def score(i: int, logits) -> float:
            return mask_dice(logits, labelled[i][3], gates.n_classes, gates.threshold)

        accuracy = AccuracyControl([batch[0] for batch in labelled], score, max_dice_drop)
    return NncfQuantizer(source, ir_weights(source, sources["openvino"]), workdir / sources["onnx"]["path"], images, accuracy)


def _ensure_ir(weights, workdir: Path, model, on_result) -> dict:
    """The workdir's verified FP32 IR entry, converted from the ONNX model first if missing."""
    for entry in load_manifest(workdir)["artifacts"]:
        if entry["format"] == "openvino" and entry["precision"] == "fp32" and entry["status"] == "verified":
            return entry
    result = export_openvino(weights, workdir, model=model, device="cpu")
    if on_result:
        on_result(result)
    if not result.passed:
        raise ArtifactError(
            f"{result.path.name} failed its parity check; the INT8 IR is quantised only from a verified one"
        )
    return result.entry


def _quantize(quantizer, attempts: list[Attempt], workdir: Path, onnx: dict, net, images: Images, gates: GateSet,
              tol: Tolerance, max_dice_drop: float, budget_s: float | None = None) -> ExportResult:  # fmt: skip
    """Try each attempt until one passes the gate; with ``budget_s`` (--fallback auto) then search for
    FP32 layers that make the last one pass; publish the one that passed (or the last)."""
    started = time.perf_counter()
    manifest = load_manifest(workdir)
    dest = quantizer.dest(workdir, onnx["path"])
    ir = quantizer.fmt == "openvino"
    tried = []
    with contextlib.ExitStack() as stack:
        staged = stack.enter_context(publish.staged(dest, 2 * publish.estimated_bytes(net), f"INT8 {quantizer.engine}"))
        if ir:  # write_ir puts the .bin beside the staged .xml, under the .bin's own temp name
            stack.enter_context(publish.staged(dest.with_suffix(".bin"), 0, "INT8 IR weights"))
        for attempt in attempts:
            entry, parity, accuracy = _try(quantizer, attempt, staged, dest, workdir, onnx, images, gates, tol, max_dice_drop)
            info = {"ignored_scope": entry["quantization"]["ignored_scope"], "fp32_nodes": entry["fp32_nodes"]}
            tried.append({"name": attempt.name, "preset": attempt.preset, "ignored_scope": info["ignored_scope"],
                          "bias_correction": _bias(attempt), "fp32_nodes": len(info["fp32_nodes"]),
                          "passed": parity.passed, "failures": parity.failures()[:4]})  # fmt: skip
            if parity.passed:
                break
        entry["quantization"] |= {"attempts": tried, "worked": attempt.name if parity.passed else None}
        if not parity.passed and budget_s is not None:  # --fallback auto
            failed = Step([], **step_numbers(parity, accuracy))
            entry, parity, accuracy = _search(quantizer, attempt, staged, dest, workdir, onnx, images, gates, tol,
                                              max_dice_drop, budget_s, tried, failed)  # fmt: skip
        entry["accuracy"] = accuracy
        with transaction(workdir) as current:
            finish_pending_weights(workdir, current)
            publish.same_model(current, manifest, workdir)
            recording = _recording(entry, gates)
            (record_ir if ir else record_artifact)(workdir, current, entry, parity, "cpu", staged, recording)
    return ExportResult(dest, entry, parity, time.perf_counter() - started)


def _try(quantizer, attempt: Attempt, staged: Path, dest: Path, workdir: Path, onnx: dict, images: Images,
         gates: GateSet, tol: Tolerance, max_dice_drop: float):  # fmt: skip
    """Write one attempt to ``staged`` and judge it: (entry, parity, accuracy)."""
    try:
        info = quantizer.write(attempt, staged)
    except UnetExportError:
        raise
    except Exception as exc:  # NNCF and ONNX Runtime raise many types; all mean "could not quantise"
        raise ArtifactError(
            f"INT8 quantisation with {quantizer.engine} failed ({attempt.name}): "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ) from exc
    entry = inherit_envelope(_entry(dest, quantizer, onnx, info, images, gates, attempt), onnx)
    parity, accuracy = judge(entry, workdir, staged, gates, tol, max_dice_drop)
    record_envelope(entry, envelope.of_entry(entry), parity)
    return entry, parity, accuracy


def _search(quantizer, attempt: Attempt, staged: Path, dest: Path, workdir: Path, onnx: dict, images: Images,
            gates: GateSet, tol: Tolerance, max_dice_drop: float, budget_s: float, tried: list, base: Step):  # fmt: skip
    """--fallback auto: rank the convolutions by their INT8 error on calibration images, then grow
    the FP32 set from ``attempt`` (which failed and is still staged) until the gate passes
    (flows/fallback.py). The staged file ends as the set found, else as the last step."""
    started = time.perf_counter()
    onnx_path = workdir / onnx["path"]
    x = torch.stack([images.tensor(p) for p in images.paths[:RANK_IMAGES]]).numpy()
    ranked = [(n, s) for n, s in rank_layers(onnx_path, [x[i:i + 4] for i in range(0, len(x), 4)], "int8")
              if n not in attempt.fp32]  # fmt: skip
    latency = functools.partial(_latency, workdir=workdir, staged=staged, x=gates.batches[0][0])
    entry = _entry(dest, quantizer, onnx, {"fp32_nodes": [], "layers": 0, "ignored_scope": [], "accuracy_control": False},
                   images, gates, attempt)  # fmt: skip
    base.latency_ms = latency(entry)
    last = {}

    def trial(nodes: list[str]) -> Step:
        t = time.perf_counter()
        step = replace(attempt, name=f"{attempt.name} + {len(nodes)} FP32", fp32=attempt.fp32 + tuple(nodes))
        last["result"] = _try(quantizer, step, staged, dest, workdir, onnx, images, gates, tol, max_dice_drop)
        numbers = step_numbers(*last["result"][1:])
        return Step(list(nodes), latency_ms=latency(last["result"][0]), seconds=time.perf_counter() - t, **numbers)

    found, steps = grow([n for n, _ in ranked], trial, budget_s)
    if found is not None and steps[-1].fp32 != found:  # pruning's last try failed: write the set found again
        trial(found)
    entry, parity, accuracy = last["result"]  # grow always takes its first step
    search = Search(ranked, steps, found, budget_s, time.perf_counter() - started, base)
    entry["quantization"] |= {"attempts": tried, "worked": "auto" if found is not None else None,
                              "search": record(search, onnx_path)}  # fmt: skip
    return entry, parity, accuracy


def _latency(entry: dict, workdir: Path, staged: Path, x: torch.Tensor) -> float:
    """The staged artefact's best time on one gate batch, on the CPU (the search's speed cost)."""
    with artifact_runner(entry, workdir, "cpu", path=staged) as runner:
        return round(best_ms(lambda: runner.infer(x)), 3)


def _recording(entry: dict, gates: GateSet) -> references.Recording:
    """The gate set's eager outputs (already computed in fp32 and float64), to be recorded."""
    recording = references.images(entry["real_images"])
    # the gate's own images, which the recording names in order; not the envelope's crops of them
    recording.batches = [(x, ref, ref64) for (x, ref, ref64, _), probe in zip(gates.batches, gates.labels) if not probe]
    return recording


def _bias(attempt: Attempt) -> str | None:
    return None if attempt.fast_bias_correction is None else ("fast" if attempt.fast_bias_correction else "full")


def _entry(dest: Path, quantizer, onnx: dict, info: dict, images: Images, gates: GateSet, attempt: Attempt) -> dict:
    extra = {k: v for k, v in info.items() if k not in ("fp32_nodes", "layers", "ignored_scope", "accuracy_control", "weight_range")}
    quantization = {"engine": "nncf" if quantizer.engine == "openvino" else "onnxruntime", "calibration": images.record,
                    "preset": attempt.preset, "ignored_scope": info["ignored_scope"], "bias_correction": _bias(attempt),
                    "accuracy_control": info["accuracy_control"], "int8_layers": info["layers"] - len(info["fp32_nodes"]),
                    "layers": info["layers"], "weight_range": info.get("weight_range"), "gate_images": gates.source}  # fmt: skip
    # Every gate image by path and sha256: verify and bench judge the artefact on these again.
    extra |= {"real_images": image_record(gates.paths, limit=len(gates.paths))}
    if quantizer.engine == "openvino":
        extra |= {"inference_precision": "f32"}
    return {"format": quantizer.fmt, "path": dest.name, "precision": "int8", "source": quantizer.source.name, **extra,
            "fp32_nodes": info["fp32_nodes"], "quantization": quantization, "inputs": onnx["inputs"],
            "outputs": onnx["outputs"], "dynamic_axes": onnx["dynamic_axes"], "export_size": onnx["export_size"],
            "size_rule": onnx["size_rule"]}  # fmt: skip
