"""Which convolutions reduced precision hurts most, one layer at a time: each convolution of the
FP32 ONNX model runs alone (ONNX Runtime, CPU) on its real inputs, captured on calibration images,
once in FP32 and once with its input and weights rounded the way the reduced precision rounds
them: INT8 = per-tensor uint8 activations over the calibration range and per-channel int8
weights; FP16 = both cast to float16. The score is the layer's relative output error
||y_rounded - y|| / ||y||. Judging the output rather than the input matters: a few extreme outliers
in one channel stretch a per-tensor scale until the ordinary values round to zero, yet the outliers
themselves may carry almost no weight, so the input's own error would look small.

A tensor is quantised once for all its readers: ONNX Runtime's QDQ puts the pair at the output of
the convolution that wrote it, so keeping only the reader in FP32 leaves the damage in. Each
layer is therefore followed in the ranking by the convolution that writes its input (through
activations and pooling), which takes the reader's score."""

from pathlib import Path

import numpy as np

from unet_export.errors import require
from unet_export.runtimes.onnx.layers import CONVS, input_chain


def rank_layers(onnx_path: Path, batches: list[np.ndarray], precision: str) -> list[tuple[str, float]]:
    """(node name, score) for every convolution with constant weights, most sensitive first."""
    onnx = require("onnx")
    model = onnx.load(str(onnx_path))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type in CONVS and n.input[1] in weights]
    captured = _capture(model, sorted({n.input[0] for n in convs}), batches)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    scores = [(n.name, _score(n, captured[n.input[0]], weights, (opset, model.ir_version), precision)) for n in convs]
    return _with_writers(model, sorted(scores, key=lambda item: -item[1]))


def _with_writers(model, ranked: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """``ranked`` with each layer's input writer (a convolution) right after it, each layer once."""
    nodes = {n.name: n for n in model.graph.node}
    writer = {out: n for n in model.graph.node for out in n.output}
    out, seen = [], set()
    for name, score in ranked:
        for node, value in ((name, score), (input_chain(nodes[name], writer)[1], score)):
            if node and node not in seen:
                seen.add(node)
                out.append((node, value))
    return out


def _capture(model, names: list[str], batches: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The values of the tensors ``names`` on each batch, from one FP32 run of the whole model."""
    onnx, ort = require("onnx"), require("onnxruntime")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n not in known)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    out = {name: [] for name in names}
    for x in batches:
        for name, value in zip(names, session.run(names, {feed: x})):
            out[name].append(value)
    return out


def _score(node, inputs: list[np.ndarray], weights: dict, versions: tuple[int, int], precision: str) -> float:
    opset, ir_version = versions  # the model's own: this ONNX Runtime reads it
    onnx, ort = require("onnx"), require("onnxruntime")
    params = [weights[name] for name in node.input[1:] if name]
    single = onnx.helper.make_node(node.op_type, ["x", *[f"p{i}" for i in range(len(params))]], ["y"], **{
        a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})  # fmt: skip
    value = lambda name: onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)  # noqa: E731
    graph = onnx.helper.make_graph([single], "layer", [value("x"), *[value(f"p{i}") for i in range(len(params))]],
                                   [value("y")])  # fmt: skip
    layer = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=ir_version)
    session = ort.InferenceSession(layer.SerializeToString(), providers=["CPUExecutionProvider"])
    axis = 1 if node.op_type == "ConvTranspose" else 0  # the output-channel axis of the weights
    if precision == "int8":
        low, high = min(0.0, min(float(x.min()) for x in inputs)), max(0.0, max(float(x.max()) for x in inputs))
        rounded = [_int8_weights(params[0], axis), *params[1:]]
        round_input = lambda x: _uint8_activations(x, low, high)  # noqa: E731
    else:
        rounded = [_fp16(p) for p in params]
        round_input = _fp16
    error = total = 0.0
    with np.errstate(all="ignore"):
        for x in inputs:
            y = session.run(["y"], {"x": x, **{f"p{i}": p for i, p in enumerate(params)}})[0]
            yq = session.run(["y"], {"x": round_input(x), **{f"p{i}": p for i, p in enumerate(rounded)}})[0]
            error += float(np.square(yq.astype(np.float64) - y).sum())
            total += float(np.square(y.astype(np.float64)).sum())
    score = np.sqrt(error / total) if total > 0 else np.sqrt(error)
    return float(score) if np.isfinite(score) else float("inf")  # FP16 overflow: inf, ranked first


def _uint8_activations(x: np.ndarray, low: float, high: float) -> np.ndarray:
    scale = (high - low) / 255 or 1.0
    zero = np.round(-low / scale)
    return ((np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)


def _int8_weights(w: np.ndarray, axis: int) -> np.ndarray:
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.abs(w).max(axis=reduce, keepdims=True) / 127
    scale[scale == 0] = 1.0
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)


def _fp16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # past 65504 is inf: that is the point
        return x.astype(np.float16).astype(np.float32)
