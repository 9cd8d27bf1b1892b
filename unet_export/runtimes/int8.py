"""The two INT8 quantizers, one attempt (a recipe: Attempt) at a time: NNCF post-training
quantisation of an FP32 OpenVINO IR, and ONNX Runtime's static QDQ quantisation of an ONNX model.
They take paths and calibration images (anything with ``paths`` and ``tensor(path)``: the
flow's Images), write the staged artefact and say which convolutions stayed FP32; judging the
result and publishing it is the INT8 flow's job (flows/int8.py, flows/int8_gate.py)."""

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from unet_export.errors import ArtifactError, require
from unet_export.fileio import claim_temp_path
from unet_export.runtimes.onnx.layers import CONVS, module_path
from unet_export.runtimes.openvino.export import ir_path, write_ir

WEIGHT_INT8 = {"i8", "u8", "i4", "u4"}
# The range INT8 weights are quantized to, recorded with each artefact: 8-bit products summed in
# int16 saturate on x86 CPUs without VNNI, 7-bit ones never do (OrtQuantizer.write).
WEIGHT_RANGE = {"onnxruntime": "7-bit in every layer (reduce_range)",
                "openvino": "7-bit in the first convolution, 8-bit elsewhere (NNCF's overflow fix)"}


@dataclass(frozen=True)
class Attempt:
    """One quantisation recipe. preset: performance = symmetric activations, mixed = asymmetric."""

    name: str
    preset: str = "performance"
    ignore_ends: bool = False  # keep the first and the last convolution in FP32
    fast_bias_correction: bool | None = True  # NNCF's default; False = its full BiasCorrection
    fp32: tuple[str, ...] = ()  # ONNX node names of convolutions kept in FP32 (--fp32-layers, the search)


@dataclass
class AccuracyControl:
    """NNCF's accuracy control: validation inputs, a score per input batch (higher is better) and
    the largest absolute drop of the mean score allowed."""

    inputs: list[torch.Tensor]
    score: Callable[[int, torch.Tensor], float]  # (batch index, logits) -> score
    max_drop: float


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

    def __init__(self, source: Path, weights: Path, onnx_path: Path, calib, accuracy: AccuracyControl | None = None):
        self.ov, self.nncf = require("openvino", extra="openvino"), require("nncf", extra="openvino")
        self.source, self.weights = source, weights  # the verified FP32 IR (.xml and its .bin)
        self.calib, self.accuracy = calib, accuracy
        self.names = _onnx_module_paths(onnx_path)
        graph = require("onnx").load(str(onnx_path), load_external_data=False).graph
        self.outputs = {n.name: n.output[0] for n in graph.node if n.op_type in CONVS}  # to find them in the IR
        self.ov_to_onnx: dict[str, str] = {}

    def dest(self, workdir: Path, onnx_name: str) -> Path:
        return ir_path(workdir, onnx_name, "int8")

    def write(self, attempt: Attempt, staged: Path) -> dict:
        nncf, model = self.nncf, self.ov.Core().read_model(str(self.source), str(self.weights))
        convs = _ov_convs(model)
        self.ov_to_onnx = _ov_to_onnx(convs, self.outputs)
        ends = [convs[0].get_friendly_name(), convs[-1].get_friendly_name()] if attempt.ignore_ends else []
        kept = _ov_names(convs, attempt.fp32, self.outputs)
        ignored = list(dict.fromkeys(ends + kept))
        options = {"preset": nncf.QuantizationPreset(attempt.preset), "target_device": nncf.TargetDevice.CPU,
                   "subset_size": len(self.calib.paths), "fast_bias_correction": attempt.fast_bias_correction,
                   "ignored_scope": nncf.IgnoredScope(names=ignored) if ignored else None}  # fmt: skip
        calibration = nncf.Dataset(self.calib.paths, lambda path: self.calib.tensor(path)[None].numpy())
        with _quiet():
            if self.accuracy is None:
                quantized = nncf.quantize(model, calibration, **options)
            else:
                inputs = self.accuracy.inputs
                validation = nncf.Dataset(list(range(len(inputs))), lambda i: inputs[i].numpy())
                quantized = nncf.quantize_with_accuracy_control(
                    model, calibration, validation, self._validate, max_drop=self.accuracy.max_drop,
                    drop_type=nncf.DropType.ABSOLUTE, **options)  # fmt: skip
        fp32 = [self._label(op) for op in _ov_convs(quantized) if not _ov_int8_weights(op)]
        info = write_ir(quantized, staged, {"precision": "int8", "source": self.source.name})
        return info | {"fp32_nodes": fp32, "layers": len(convs), "ignored_scope": [self._label_name(n) for n in ignored],
                       "accuracy_control": self.accuracy is not None, "weight_range": WEIGHT_RANGE["openvino"]}  # fmt: skip

    def _validate(self, compiled, indices) -> tuple[float, list[float]]:
        """NNCF's validation function: the caller's score (Dice vs ground truth) per validation batch."""
        scores = []
        for i in indices:
            logits = torch.from_numpy(compiled(self.accuracy.inputs[i].numpy())[0].copy())
            scores.append(self.accuracy.score(i, logits))
        return sum(scores) / max(len(scores), 1), scores

    def _label(self, op) -> str:
        return self._label_name(op.get_friendly_name())

    def _label_name(self, name: str) -> str:
        onnx_name = self.ov_to_onnx.get(name, name.removesuffix("/WithoutBiases"))
        return f"{self.names[onnx_name]} ({onnx_name})" if self.names.get(onnx_name) else name


def _ov_to_onnx(convs: list, outputs: dict[str, str]) -> dict[str, str]:
    """IR convolution friendly name -> the ONNX node it came from. A convolution with a bias becomes
    ``<node>/WithoutBiases`` plus an Add; a ConvTranspose gets a generated name
    (ConvolutionBackpropData_182), so it is found by the ONNX output tensor (``outputs``: node ->
    its first output) that its bias Add carries."""
    by_tensor = {tensor: node for node, tensor in outputs.items()}
    found = {}
    for op in convs:
        name = op.get_friendly_name()
        tensors = set(op.output(0).get_names())
        for consumer in op.output(0).get_target_inputs():
            tensors |= set(consumer.get_node().output(0).get_names())
        direct = name.removesuffix("/WithoutBiases")
        node = direct if direct in outputs else next((by_tensor[t] for t in sorted(tensors) if t in by_tensor), None)
        if node:
            found[name] = node
    return found


def _ov_names(convs: list, onnx_nodes: tuple[str, ...], outputs: dict[str, str]) -> list[str]:
    """The friendly names of the IR convolutions that came from these ONNX nodes (_ov_to_onnx)."""
    found = {node: name for name, node in _ov_to_onnx(convs, outputs).items()}
    missing = [node for node in onnx_nodes if node not in found]
    if missing:
        raise ArtifactError(f"no OpenVINO convolution came from the ONNX node(s) {', '.join(missing)}")
    return [found[node] for node in onnx_nodes]


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

    def __init__(self, source: Path, input_name: str, calib):
        self.q = require("onnxruntime.quantization", "onnxruntime")
        self.source, self.calib, self.input_name = source, calib, input_name
        self.names = _onnx_module_paths(self.source)
        self.pre = claim_temp_path(self.source.parent / f"{self.source.stem}.preprocessed.onnx")

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
            ends = list(dict.fromkeys(ends + list(attempt.fp32)))
            symmetric = attempt.preset == "performance"
            # reduce_range: 7-bit weights. Without VNNI (AVX2, early AVX-512) ONNX Runtime's u8s8
            # kernels sum pairs of products in int16 (VPMADDUBSW), which saturates: the demo with
            # outliers changed 0.18% of pixels there and 0.07% with 7-bit weights. 7-bit sums never
            # saturate, so the artefact computes the same on every x86 CPU and a verdict reached on
            # one holds on the others (ONNX Runtime's and OpenVINO's advice for such CPUs).
            q.quantize_static(str(self.pre), str(staged), _Reader(self.calib, self.input_name), quant_format=q.QuantFormat.QDQ,
                              per_channel=True, activation_type=q.QuantType.QInt8 if symmetric else q.QuantType.QUInt8,
                              weight_type=q.QuantType.QInt8, nodes_to_exclude=ends, reduce_range=True,
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
                "layers": len(convs), "ignored_scope": [self._label(n) for n in ends], "accuracy_control": False,
                "weight_range": WEIGHT_RANGE["onnxruntime"]}  # fmt: skip

    def _label(self, name: str) -> str:
        return f"{self.names[name]} ({name})" if self.names.get(name) else name

    def close(self) -> None:
        self.pre.unlink(missing_ok=True)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over the calibration images, one at a time."""

    def __init__(self, calib, input_name: str):
        self.calib, self.input_name = calib, input_name
        self.rewind()

    def get_next(self):
        path = next(self.paths, None)
        return None if path is None else {self.input_name: self.calib.tensor(path)[None].numpy()}

    def rewind(self):
        self.paths = iter(self.calib.paths)
