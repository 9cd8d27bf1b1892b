"""The use case behind `unet-export openvino`: an OpenVINO IR (``<stem>.xml`` + ``<stem>.bin``)
from the workdir's verified ONNX artefact (written by runtimes/openvino/export.py), checked against the
eager model and published. An IR is two files: both are verified together under temp names and
published together (``record_ir``), and the manifest records the .bin's sha256 beside the .xml's.

    from unet_export.flows.openvino import export_openvino
    result = export_openvino("weights.pth", "exports")      # exports/weights.xml + .bin, verified
"""

import os
import time
from pathlib import Path

from unet_export.checkpoint import build_model, load_checkpoint
from unet_export.errors import ArtifactError, UserError, require
from unet_export.fileio import sha256_file
from unet_export.flows.export import (ExportResult, export_artifact, inherit_envelope, keep_named, record_envelope,
                                      require_real_images)  # fmt: skip
from unet_export.models import ModelChoice, mask_threshold
from unet_export.parity import envelope
from unet_export.parity.gate import seeded_inputs, tolerance_for
from unet_export.parity.realimages import gate_images, with_probes
from unet_export.parity.run import run_parity
from unet_export.runtimes.openvino.export import convert_onnx, ir_path
from unet_export.workdir import publish, references
from unet_export.workdir.ir import finish_pending_weights, parked_name
from unet_export.workdir.lookup import manifest_checkpoint, onnx_entry
from unet_export.workdir.manifest import load_manifest, transaction
from unet_export.workdir.publish import record_artifact


def record_ir(workdir: Path, manifest: dict, entry: dict, parity, device, staged: Path,
              recording: references.Recording | None = None) -> None:  # fmt: skip
    """Inside a manifest transaction: publish the verified IR ``staged`` (.xml) and its .bin.

    The .bin is parked under a hidden name the temp sweep keeps and recorded as ``weights.pending``
    in the same manifest save that marks the .xml pending (``record_artifact``); then both are
    renamed and the marks cleared. A process killed anywhere leaves the old IR or a redo record:
    the next transaction renames the .xml (manifest._recover) and the next reader or export
    the .bin (workdir.ir.finish_pending_weights); an orphan parked .bin is deleted."""
    staged_bin = staged.with_suffix(".bin")
    final_bin = Path(entry["path"]).with_suffix(".bin").name
    sha = sha256_file(staged_bin)
    parked = Path(workdir) / parked_name(final_bin, sha)
    os.replace(staged_bin, parked)
    entry["weights"] = {"path": final_bin, "bytes": parked.stat().st_size, "sha256": sha, "pending": parked.name}
    try:
        record_artifact(workdir, manifest, entry, parity, device, staged, recording)
    except BaseException:
        if manifest_holds(workdir, parked.name):
            raise  # the redo record is on disk: the next transaction finishes the publish
        parked.unlink(missing_ok=True)
        raise
    os.replace(parked, Path(workdir) / final_bin)
    entry["weights"].pop("pending")  # the manifest holds ``entry``: the transaction saves it


def manifest_holds(workdir: Path, parked: str) -> bool:
    """Whether manifest.json on disk names ``parked`` as a pending .bin."""
    try:
        return any((a.get("weights") or {}).get("pending") == parked for a in load_manifest(workdir)["artifacts"])
    except UserError:
        return False


def ensure_onnx(weights, workdir: Path, *, model=None, device="auto", height=256, width=256,
                on_result=None) -> dict:  # fmt: skip
    """The workdir's verified FP32 ONNX entry of ``weights``' checkpoint, exported first when the
    workdir has none (or holds another checkpoint's artefacts). ``weights`` None: the workdir's own
    (unless ``model`` is an nn.Module: then its weights)."""
    manifest = load_manifest(workdir)
    if weights is not None or ModelChoice.of(model).in_memory:
        ckpt = load_checkpoint(weights, model)
        recorded = ((manifest.get("model") or {}).get("checkpoint") or {}).get("sha256")
        has_onnx = any(a["format"] == "onnx" and a["precision"] == "fp32" and a["status"] == "verified"
                       for a in manifest["artifacts"])  # fmt: skip
        if recorded != ckpt.sha256 or not has_onnx:
            result = export_artifact(weights, "onnx", workdir, model=model, device=device, height=height, width=width)
            if on_result:
                on_result(result)
            if not result.passed:
                raise ArtifactError(
                    f"{result.path.name} failed its parity check; the IR is converted only from a verified ONNX model"
                )
            manifest = load_manifest(workdir)
    return onnx_entry(manifest, workdir)


def export_openvino(weights: str | Path | None = None, workdir: str | Path = "exports", *, fp16: bool = False,
                    model=None, device: str = "auto", height: int = 256, width: int = 256,
                    seed: int = 0, on_result=None, data: str | Path | None = None, rtol: float | None = None,
                    atol: float | None = None, max_class_change: float | None = None,
                    min_dice: float | None = None) -> ExportResult:  # fmt: skip
    """Convert the verified ONNX model of ``weights`` (exported into ``workdir`` first if missing)
    to an OpenVINO IR, check it against eager FP32 on the CPU (FP32 tolerances on seeded inputs,
    or FP16 ones on real images for FP16-compressed weights) and record both files in the manifest.
    ``rtol``/``atol`` (FP32) or ``max_class_change``/``min_dice`` (FP16) replace the IR's gate."""
    workdir = Path(workdir)
    precision = "fp16" if fp16 else "fp32"
    tol = tolerance_for(precision, rtol=rtol, atol=atol, max_class_change=max_class_change, min_dice=min_dice)
    require("openvino", extra="openvino")
    if fp16 and (weights is not None or ModelChoice.of(model).in_memory):
        require_real_images("fp16", weights, model, data)
    with publish.created_dir(workdir):
        source = ensure_onnx(
            weights, workdir, model=model, device=device, height=height, width=width, on_result=on_result
        )
    started = time.perf_counter()
    manifest = load_manifest(workdir)
    net = build_model(manifest_checkpoint(manifest, weights, model))
    dest = ir_path(workdir, source["path"], precision)
    need = 2 * publish.estimated_bytes(net)  # the IR, and its parked .bin beside the old one while publishing
    # save_model writes the .bin beside the .xml: .<stem>.<pid>.tmp.bin, the .bin's own temp name
    with (
        publish.staged(dest, need, "OpenVINO IR") as staged,
        publish.staged(dest.with_suffix(".bin"), 0, "OpenVINO IR weights"),
    ):
        entry = inherit_envelope(ir_entry(dest, precision, source, {}), source)
        if fp16:  # reduced precision is judged on real images only
            gate, entry["real_images"] = gate_images(manifest, entry, data)
            inputs, probes, env = with_probes(gate, entry)
            recording = references.images(entry["real_images"])
        else:
            inputs, probes, env = _seeded_probes(source, entry, seed)
            recording = references.seeded(seed)
        entry |= convert_onnx(workdir / source["path"], staged, fp16=fp16)
        parity = run_parity(entry, workdir, net, "cpu", inputs, tol, path=staged, probes=probes,
                            threshold=mask_threshold(manifest["model"]["config"]), capture=recording.batches)
        keep_named(recording, len(gate) if fp16 else len(inputs))  # a seeded recording is kept whole
        record_envelope(entry, env, parity)
        with transaction(workdir) as current:
            finish_pending_weights(workdir, current)
            publish.same_model(current, manifest, workdir)
            record_ir(workdir, current, entry, parity, "cpu", staged, recording)
    return ExportResult(dest, entry, parity, time.perf_counter() - started)


def _seeded_probes(source: dict, entry: dict, seed: int) -> tuple[list, list[str] | None, envelope.Envelope | None]:
    """FP32: seeded inputs at the envelope's probes; a source exported before envelopes: at the
    shapes its own gate checked."""
    env = envelope.of_entry(entry)
    if env is None:
        return seeded_inputs([tuple(case["shape"]) for case in source["parity"]["cases"]], seed), None, None
    probes = env.probes(tuple(entry["export_size"]))
    return seeded_inputs([p.shape for p in probes], seed), [p.label for p in probes], env


def ir_entry(dest: Path, precision: str, source: dict, ir: dict) -> dict:
    """The manifest entry of an IR converted from the ONNX entry ``source``."""
    return {"format": "openvino", "path": dest.name, "precision": precision, "inference_precision": "f32",
            "source": source["path"], **ir, "inputs": source["inputs"], "outputs": source["outputs"],
            "dynamic_axes": source["dynamic_axes"], "export_size": source["export_size"],
            "size_rule": source["size_rule"]}  # fmt: skip
