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
import hashlib
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from unet_export.checkpoint import build_model, class_mask_values, load_checkpoint
from unet_export.data.dataset import (
    IMAGE_EXTS,
    Preprocess,
    SegmentationDataset,
    check_dataset,
    find_samples,
    image_channels,  # fmt: skip
    image_to_tensor,
    load_image,
    open_image,
)
from unet_export.errors import ArtifactError, UnetExportError, UserError, require
from unet_export.runtimes.onnx.layers import module_path
from unet_export.runtimes.openvino.export import ir_path, write_ir
from unet_export.fileio import claim_temp_path, sha256_file
from unet_export.flows.export import ExportResult
from unet_export.flows.openvino import ensure_onnx, export_openvino, record_ir
from unet_export.workdir.manifest import checked_path, load_manifest, transaction
from unet_export.metrics import center_crop, dice_score, logits_to_mask
from unet_export.models import get_spec
from unet_export.parity.realimages import IMAGES_PER_BATCH, image_record
from unet_export.runtimes import EagerRunner
from unet_export.workdir.runners import artifact_runner
from unet_export.parity.gate import ParityReport, Tolerance, compare, tolerance_for
from unet_export.workdir import publish
from unet_export.workdir.ir import finish_pending_weights, ir_weights
from unet_export.workdir.publish import record_artifact

ENGINES = {"openvino": "openvino", "onnxruntime": "onnx"}  # --engine -> the artefact's format
MAX_SUBSET = 300  # NNCF's default subset_size: more calibration images rarely move the ranges
GATE_BATCH = IMAGES_PER_BATCH  # verify re-judges the recorded gate images in the same batches
GATE_CALIB_IMAGES = 8  # without --val the gate runs on the first calibration images: one batch
WEIGHT_INT8 = {"i8", "u8", "i4", "u4"}


@dataclass(frozen=True)
class Attempt:
    """One quantisation recipe. preset: performance = symmetric activations, mixed = asymmetric."""

    name: str
    preset: str = "performance"
    ignore_ends: bool = False  # keep the first and the last convolution in FP32
    fast_bias_correction: bool | None = True  # NNCF's default; False = its full BiasCorrection


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


@dataclass
class Images:
    """Calibration images as the model will see them."""

    folder: Path
    paths: list[Path]
    pp: Preprocess
    channels: int

    def tensor(self, path: Path) -> torch.Tensor:
        return image_to_tensor(load_image(path, self.channels), self.pp, self.channels)

    @functools.cached_property
    def record(self) -> dict:
        digest = hashlib.sha256()  # names and bytes: the same set, and only it, gives this hash
        for path in self.paths:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return {"path": str(self.folder.resolve()), "count": len(self.paths), "sha256": digest.hexdigest(),
                "first": self.paths[0].name, "last": self.paths[-1].name}  # fmt: skip


@dataclass
class GateSet:
    """The real images every INT8 attempt is judged on, with eager's logits (computed once) and
    the ground-truth masks when there are any."""

    batches: list[
        tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]
    ]  # images, eager fp32, fp64, masks
    source: str
    n_classes: int
    eager_dice: float | None = None
    paths: list[Path] | None = None  # the image files, recorded with the entry for verify and bench

    @property
    def images(self) -> int:
        return sum(len(batch[0]) for batch in self.batches)


def calibration_images(calib: str | Path | list, ckpt, subset: int | None) -> Images:
    """The first ``subset`` images (sorted by name) of a folder of images or a dataset (imgs/,
    JPEGImages/), or the listed image files, each readable, with the model's channel count, at a
    size the model takes."""
    if isinstance(calib, (list, tuple)):
        paths = [Path(p) for p in calib]
        folder = paths[0].parent if paths else Path(".")
    else:
        folder = Path(calib)
        if not folder.is_dir():
            raise UserError(f"--calib {folder}: not a folder of images")
        images = next((folder / d for d in ("imgs", "JPEGImages") if (folder / d).is_dir()), folder)
        paths = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not paths:
        raise UserError(f"--calib {folder} holds no images ({', '.join(sorted(IMAGE_EXTS))}); "
                        "calibrate on a few hundred images like the ones the model will see")  # fmt: skip
    if subset is not None and subset < 1:
        raise UserError(f"--subset must be at least 1, got {subset}")
    paths = paths[: min(subset or MAX_SUBSET, MAX_SUBSET)]
    channels, pp = int(ckpt.config.get("n_channels", 3)), Preprocess.from_dict(ckpt.preprocess)
    rule = get_spec(ckpt.architecture).sizes(ckpt.config)
    for path in paths:
        img = open_image(path)
        found, size = image_channels(img, path), img.size
        img.close()
        if found != channels:
            raise UserError(f"--calib {path} has {found} channel(s) but the model takes {channels}: calibrate on "
                            "images like the ones the model will see")  # fmt: skip
        width, height = pp.size(*size)
        if not (rule.accepts(height) and rule.accepts(width)):
            raise UserError(f"--calib {path} is {height}x{width} after preprocessing, but the model takes "
                            f"{rule.describe()}: resize the calibration images to the training size")  # fmt: skip
        load_image(path, channels).close()  # decodes every pixel: a truncated file fails here
    return Images(folder, paths, pp, channels)


def validation_samples(val: str | Path, ckpt, calib: Images, mask_suffix: str) -> list:
    """The labelled --val pairs, checked like `evaluate` checks them, minus every calibration image."""
    _, samples = find_samples(val, mask_suffix)
    n_classes = ckpt.config.get("n_classes", 2)
    check_dataset(samples, n_channels=calib.channels, mask_values=class_mask_values(ckpt.mask_values, n_classes),
                  pp=calib.pp, rule=get_spec(ckpt.architecture).sizes(ckpt.config))  # fmt: skip
    used = {sha256_file(p) for p in calib.paths}  # by content: a copied calibration image is still one
    held_out = [s for s in samples if sha256_file(s.image) not in used]
    if not held_out:
        raise UserError(f"every --val image in {val} is also a calibration image: keep calibration and Dice images "
                        "apart (e.g. --subset N calibrates on the first N only)")  # fmt: skip
    return held_out


def gate_set(net, ckpt, calib: Images, samples: list | None) -> GateSet:
    """Batches of same-size real images, eager's logits on them in fp32 and in float64 (the exact
    answer decisions are judged by, as verify.check_parity does) and (with --val) the masks."""
    n_classes = ckpt.config.get("n_classes", 2)
    if samples:
        dataset = SegmentationDataset(samples, class_mask_values(ckpt.mask_values, n_classes), calib.pp, calib.channels)
        items, source = [(d["image"], d["mask"]) for d in dataset], f"{len(samples)} held-out --val images"
        paths = [s.image for s in samples]
    else:
        paths = calib.paths[:GATE_CALIB_IMAGES]
        items = [(calib.tensor(p), None) for p in paths]
        source = f"{len(items)} calibration images (no --val: Dice vs ground truth not checked)"
    batches, total = [], 0.0
    with EagerRunner(net, "cpu") as eager, EagerRunner(net, "cpu", "fp64") as exact:
        for group in _same_size_groups(items):
            x = torch.stack([image for image, _ in group])
            masks = torch.stack([mask for _, mask in group]) if samples else None
            ref = eager.infer(x).float().cpu()
            if masks is not None:
                total += _dice(ref, masks, n_classes) * len(x)
            batches.append((x, ref, exact.infer(x).cpu(), masks))
    gates = GateSet(batches, source, n_classes, paths=list(paths))
    gates.eager_dice = total / gates.images if samples else None
    return gates


def _same_size_groups(items: list) -> list[list]:
    groups = []
    for item in items:
        if groups and len(groups[-1]) < GATE_BATCH and groups[-1][0][0].shape == item[0].shape:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _dice(logits: torch.Tensor, masks: torch.Tensor, n_classes: int) -> float:
    pred = logits_to_mask(logits)
    return dice_score(pred, center_crop(masks, pred.shape[-2:]), n_classes)


def judge(entry: dict, workdir: Path, staged: Path, gates: GateSet, tol: Tolerance, max_dice_drop: float):
    """Run the staged INT8 artefact on the gate set: per batch class change and Dice vs eager
    (verify.compare), then Dice vs ground truth against eager's. Returns (report, accuracy)."""
    runner = artifact_runner(entry, workdir, "cpu", path=staged)
    cases, total = [], 0.0
    try:
        with runner:
            for x, ref, ref64, masks in gates.batches:
                out = runner.infer(x).float().cpu()
                case = compare(out, ref, tol, exact=ref64)
                case.shape = list(x.shape)
                cases.append(case)
                if masks is not None:
                    total += _dice(out, masks, gates.n_classes) * len(x)
    except UnetExportError:
        raise
    except Exception as exc:  # the artefact would not run: a verification failure, as in parity.run.run_parity
        message = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        return ParityReport(runner.name, tol.name, [], error=message, limits=tol.to_dict()), None
    report = ParityReport(f"{runner.name} ({runner.describe()})", tol.name, cases, limits=tol.to_dict())
    if gates.eager_dice is None:
        return report, None
    dice = total / gates.images
    accuracy = {"images": gates.images, "eager_dice": gates.eager_dice, "dice": dice, "drop": gates.eager_dice - dice,
                "max_drop": max_dice_drop, "passed": gates.eager_dice - dice <= max_dice_drop}  # fmt: skip
    if not accuracy["passed"]:  # verify.ParityReport has no slot for a ground-truth check; its error holds it
        report.error = (f"Dice vs ground truth {dice:.4f} is {accuracy['drop']:.4f} below eager's {gates.eager_dice:.4f} "
                        f"on {gates.images} held-out images (allowed {max_dice_drop})")  # fmt: skip
    return report, accuracy


@contextlib.contextmanager
def _quiet():
    """NNCF and ONNX Runtime's quantisers print progress bars and INFO lines: keep them for errors."""
    log = io.StringIO()
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield log
    finally:
        nncf_logger.setLevel(level)


class NncfQuantizer:
    """NNCF post-training quantisation of the FP32 IR (with accuracy control when --val is given)."""

    engine, fmt = "openvino", "openvino"

    def __init__(self, workdir: Path, ir: dict, onnx: dict, calib: Images, gates: GateSet, max_dice_drop: float):
        self.ov, self.nncf = require("openvino", extra="openvino"), require("nncf", extra="openvino")
        self.source = checked_path(workdir, ir)
        self.weights = ir_weights(self.source, ir)  # both files must be the verified ones
        self.calib, self.gates, self.max_dice_drop = calib, gates, max_dice_drop
        self.names = _onnx_module_paths(workdir / onnx["path"])

    def dest(self, workdir: Path, onnx_name: str) -> Path:
        return ir_path(workdir, onnx_name, "int8")

    def write(self, attempt: Attempt, staged: Path) -> dict:
        nncf, model = self.nncf, self.ov.Core().read_model(str(self.source), str(self.weights))
        convs = _ov_convs(model)
        ends = [convs[0].get_friendly_name(), convs[-1].get_friendly_name()] if attempt.ignore_ends else []
        options = {"preset": nncf.QuantizationPreset(attempt.preset), "target_device": nncf.TargetDevice.CPU,
                   "subset_size": len(self.calib.paths), "fast_bias_correction": attempt.fast_bias_correction,
                   "ignored_scope": nncf.IgnoredScope(names=ends) if ends else None}  # fmt: skip
        calibration = nncf.Dataset(self.calib.paths, lambda path: self.calib.tensor(path)[None].numpy())
        with _quiet():
            if self.gates.eager_dice is None:
                quantized = nncf.quantize(model, calibration, **options)
            else:
                validation = nncf.Dataset(
                    list(range(len(self.gates.batches))), lambda i: self.gates.batches[i][0].numpy()
                )
                quantized = nncf.quantize_with_accuracy_control(
                    model, calibration, validation, self._validate, max_drop=self.max_dice_drop,
                    drop_type=nncf.DropType.ABSOLUTE, **options)  # fmt: skip
        fp32 = [self._label(op) for op in _ov_convs(quantized) if not _ov_int8_weights(op)]
        info = write_ir(quantized, staged, {"precision": "int8", "source": self.source.name})
        return info | {"fp32_nodes": fp32, "layers": len(convs), "ignored_scope": [self._label_name(n) for n in ends],
                       "accuracy_control": self.gates.eager_dice is not None}  # fmt: skip

    def _validate(self, compiled, indices) -> tuple[float, list[float]]:
        """NNCF's validation function: Dice vs ground truth per gate batch, milesial's definition."""
        scores = []
        for i in indices:
            x, _, _, masks = self.gates.batches[i]
            logits = torch.from_numpy(compiled(x.numpy())[0].copy())
            scores.append(_dice(logits, masks, self.gates.n_classes))
        return sum(scores) / max(len(scores), 1), scores

    def _label(self, op) -> str:
        return self._label_name(op.get_friendly_name())

    def _label_name(self, name: str) -> str:
        onnx_name = name.removesuffix("/WithoutBiases")
        return f"{self.names[onnx_name]} ({onnx_name})" if self.names.get(onnx_name) else name


def _ov_convs(model) -> list:
    return [
        op
        for op in model.get_ordered_ops()
        if op.get_type_name() in ("Convolution", "ConvolutionBackpropData", "GroupConvolution")
    ]


def _ov_int8_weights(op) -> bool:
    """Whether a convolution's weights reach it through a FakeQuantize or as int8 constants."""
    node = op.input_value(1).get_node()
    for _ in range(8):
        kind = node.get_type_name()
        if kind == "FakeQuantize" or (kind == "Constant" and node.get_element_type().get_type_name() in WEIGHT_INT8):
            return True
        if kind == "Constant" or node.get_input_size() == 0:
            return False
        node = node.input_value(0).get_node()
    return False


def _onnx_module_paths(path: Path) -> dict[str, str]:
    onnx = require("onnx")
    return {node.name: module_path(node) for node in onnx.load(str(path), load_external_data=False).graph.node}


class OrtQuantizer:
    """ONNX Runtime: quant_pre_process once, then quantize_static (QDQ, per-channel int8 weights)."""

    engine, fmt = "onnxruntime", "onnx"

    def __init__(self, workdir: Path, onnx: dict, calib: Images):
        self.q = require("onnxruntime.quantization", "onnxruntime")
        self.source, self.calib, self.input_name = workdir / onnx["path"], calib, onnx["inputs"][0]["name"]
        self.names = _onnx_module_paths(self.source)
        self.pre = claim_temp_path(workdir / f"{self.source.stem}.preprocessed.onnx")

    def dest(self, workdir: Path, onnx_name: str) -> Path:
        return workdir / f"{Path(onnx_name).stem}.int8.onnx"

    def write(self, attempt: Attempt, staged: Path) -> dict:
        onnx, q = require("onnx"), self.q
        from onnxruntime.quantization.shape_inference import quant_pre_process

        with _quiet():
            if not self.pre.is_file():
                try:  # the dynamo exporter's shape arithmetic needs merged symbolic dims
                    quant_pre_process(str(self.source), str(self.pre), auto_merge=True)
                except Exception:
                    quant_pre_process(str(self.source), str(self.pre), skip_symbolic_shape=True)
            convs = [n for n in onnx.load(str(self.pre)).graph.node if n.op_type in ("Conv", "ConvTranspose")]
            ends = [convs[0].name, convs[-1].name] if attempt.ignore_ends else []
            symmetric = attempt.preset == "performance"
            q.quantize_static(str(self.pre), str(staged), _Reader(self.calib, self.input_name), quant_format=q.QuantFormat.QDQ,
                              per_channel=True, activation_type=q.QuantType.QInt8 if symmetric else q.QuantType.QUInt8,
                              weight_type=q.QuantType.QInt8, nodes_to_exclude=ends,
                              extra_options={"ActivationSymmetric": symmetric})  # fmt: skip
        model = onnx.load(str(staged))
        produced = {o: n.op_type for n in model.graph.node for o in n.output}
        fp32 = [self._label(n.name) for n in model.graph.node
                if n.op_type in ("Conv", "ConvTranspose") and produced.get(n.input[1]) != "DequantizeLinear"]  # fmt: skip
        props = {p.key: p.value for p in model.metadata_props} | {"precision": "int8", "source": self.source.name}
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, props)
        onnx.save(model, str(staged))
        return {"opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "fp32_nodes": fp32,
                "layers": len(convs), "ignored_scope": [self._label(n) for n in ends], "accuracy_control": False}  # fmt: skip

    def _label(self, name: str) -> str:
        return f"{self.names[name]} ({name})" if self.names.get(name) else name

    def close(self) -> None:
        self.pre.unlink(missing_ok=True)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over the calibration images, one at a time."""

    def __init__(self, calib: Images, input_name: str):
        self.calib, self.input_name = calib, input_name
        self.rewind()

    def get_next(self):
        path = next(self.paths, None)
        return None if path is None else {self.input_name: self.calib.tensor(path)[None].numpy()}

    def rewind(self):
        self.paths = iter(self.calib.paths)


def quantize_int8(weights: str | Path, calib: str | Path | list, workdir: str | Path = "exports", *, val: str | Path | None = None,
                  engine: str = "all", subset: int | None = None, max_dice_drop: float = 0.005,
                  max_class_change: float | None = None, min_dice: float | None = None, fallback: bool = True,
                  mask_suffix: str = "_mask", model: str | None = None, device: str = "auto", height: int = 256,
                  width: int = 256, on_result=None) -> list[ExportResult]:  # fmt: skip
    """INT8 artefacts of ``weights`` for each engine (openvino, onnxruntime or all), calibrated on
    ``calib`` (a folder, or a list of image files) and gated on real images; the FP32 ONNX model
    and IR they start from are exported (and verified) first if ``workdir`` lacks them. Every
    input is checked before anything is written. ``on_result`` sees each ExportResult
    (prerequisites included) as it lands."""
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
    if "openvino" in engines:
        sources["openvino"] = _ensure_ir(weights, workdir, model, on_result)
    net = build_model(ckpt)
    gates = gate_set(net, ckpt, images, samples)
    results = []
    for name in engines:
        if name == "openvino":
            quantizer = NncfQuantizer(workdir, sources["openvino"], sources["onnx"], images, gates, max_dice_drop)
        else:
            quantizer = OrtQuantizer(workdir, sources["onnx"], images)
        attempts = ATTEMPTS[name] if fallback else ATTEMPTS[name][:1]
        try:
            results.append(
                _quantize(quantizer, attempts, workdir, sources["onnx"], net, images, gates, tol, max_dice_drop)
            )
        finally:
            getattr(quantizer, "close", lambda: None)()
        if on_result:
            on_result(results[-1])
    return results


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
              tol: Tolerance, max_dice_drop: float) -> ExportResult:  # fmt: skip
    """Try each attempt until one passes the gate; publish the one that passed (or the last)."""
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
            try:
                info = quantizer.write(attempt, staged)
            except UnetExportError:
                raise
            except Exception as exc:  # NNCF and ONNX Runtime raise many types; all mean "could not quantise"
                raise ArtifactError(
                    f"INT8 quantisation with {quantizer.engine} failed ({attempt.name}): "
                    f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                ) from exc
            entry = _entry(dest, quantizer, onnx, info, images, gates, attempt)
            parity, accuracy = judge(entry, workdir, staged, gates, tol, max_dice_drop)
            tried.append({"name": attempt.name, "preset": attempt.preset, "ignored_scope": info["ignored_scope"],
                          "bias_correction": _bias(attempt), "fp32_nodes": len(info["fp32_nodes"]),
                          "passed": parity.passed, "failures": parity.failures()[:4]})  # fmt: skip
            if parity.passed:
                break
        entry["quantization"] |= {"attempts": tried, "worked": attempt.name if parity.passed else None}
        entry["accuracy"] = accuracy
        with transaction(workdir) as current:
            finish_pending_weights(workdir, current)
            publish.same_model(current, manifest, workdir)
            (record_ir if ir else record_artifact)(workdir, current, entry, parity, "cpu", staged)
    return ExportResult(dest, entry, parity, time.perf_counter() - started)


def _bias(attempt: Attempt) -> str | None:
    return None if attempt.fast_bias_correction is None else ("fast" if attempt.fast_bias_correction else "full")


def _entry(dest: Path, quantizer, onnx: dict, info: dict, images: Images, gates: GateSet, attempt: Attempt) -> dict:
    extra = {k: v for k, v in info.items() if k not in ("fp32_nodes", "layers", "ignored_scope", "accuracy_control")}
    quantization = {"engine": "nncf" if quantizer.engine == "openvino" else "onnxruntime", "calibration": images.record,
                    "preset": attempt.preset, "ignored_scope": info["ignored_scope"], "bias_correction": _bias(attempt),
                    "accuracy_control": info["accuracy_control"], "int8_layers": info["layers"] - len(info["fp32_nodes"]),
                    "layers": info["layers"], "gate_images": gates.source}  # fmt: skip
    # Every gate image by path and sha256: verify and bench judge the artefact on these again.
    extra |= {"real_images": image_record(gates.paths, limit=len(gates.paths))}
    if quantizer.engine == "openvino":
        extra |= {"inference_precision": "f32"}
    return {"format": quantizer.fmt, "path": dest.name, "precision": "int8", "source": quantizer.source.name, **extra,
            "fp32_nodes": info["fp32_nodes"], "quantization": quantization, "inputs": onnx["inputs"],
            "outputs": onnx["outputs"], "dynamic_axes": onnx["dynamic_axes"], "export_size": onnx["export_size"],
            "size_rule": onnx["size_rule"]}  # fmt: skip
