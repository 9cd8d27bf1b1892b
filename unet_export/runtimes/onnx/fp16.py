"""FP16 ONNX from the verified FP32 ONNX, inputs and outputs kept FP32 so callers feed the same
tensors. TensorRT 11 builds FP16 engines only from such a model (strong typing), and ONNX Runtime's
CUDA provider runs it directly. The converter ships inside the onnxruntime wheel."""

from pathlib import Path

from unet_export.errors import ArtifactError, UserError, require
from unet_export.fileio import atomic_path
from unet_export.runtimes.onnx.export import io_record
from unet_export.runtimes.onnx.layers import describe_nodes, select_nodes, with_input_chains

FP16_MAX = 65504.0  # clamp weights to FP16's finite range, not the 1e4 some converters default to


def fp32_nodes(model, fp32_layers: list[str] | None, name: str) -> list[str]:
    """The nodes ``fp32_layers`` keep in FP32; a pattern list that matches none is a user error
    (a typo would otherwise give a plain FP16 model)."""
    blocked = select_nodes(model.graph, fp32_layers) if fp32_layers else []
    if fp32_layers and not blocked:
        raise UserError(
            f"--fp32-layers {' '.join(fp32_layers)} matches no node of {name}; patterns match a node's "
            f"name, op type or module path, e.g. {describe_nodes(model.graph)}"
        )
    return blocked


def check_fp32_layers(onnx_path: Path, fp32_layers: list[str], name: str) -> None:
    """Refuse ``fp32_layers`` that match no node of the (FP32) ONNX file at ``onnx_path``."""
    fp32_nodes(require("onnx").load(str(onnx_path), load_external_data=False), fp32_layers, name)


def convert_onnx_fp16(src: Path, dest: Path, fp32_layers: list[str] | None = None) -> dict:
    """Write ``src`` converted to FP16 at ``dest``; nodes matching ``fp32_layers`` stay FP32."""
    onnx = require("onnx")
    float16 = require("onnxruntime.transformers.float16", "onnxruntime")
    model = onnx.load(str(src))
    blocked = with_input_chains(model.graph, fp32_nodes(model, fp32_layers, src.name))
    converted = float16.convert_float_to_float16(
        model, keep_io_types=True, node_block_list=blocked or None, max_finite_val=FP16_MAX
    )
    if blocked:
        _drop_round_trips(converted.graph, model.graph)
    _sort_topologically(converted.graph)
    props = {p.key: p.value for p in model.metadata_props} | {"precision": "fp16", "fp32_nodes": ",".join(blocked)}
    del converted.metadata_props[:]
    onnx.helper.set_model_props(converted, props)
    onnx.checker.check_model(converted)
    with atomic_path(dest) as tmp:
        onnx.save(converted, str(tmp))
    dynamic = bool(model.graph.input[0].type.tensor_type.shape.dim[0].dim_param)
    return io_record(converted, dynamic) | {"fp32_nodes": blocked, "source": src.name}


def _sort_topologically(graph) -> None:
    """The converter appends the input Cast after nodes that read the input (Shape): ONNX and
    TensorRT's parser require producers before consumers, so restore that order."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in known for name in n.input)]
        if not ready:
            raise ArtifactError("the FP16 model has a cycle or an input no node produces")
        for node in ready:
            known.update(node.output)
        ordered += ready
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto's element types


def _drop_round_trips(graph, source) -> None:
    """The converter wraps every blocked node in Casts, even between two blocked nodes (FP32 ->
    FP16 -> FP32: the tensor between them is still rounded to FP16, and inf past 65504), and stores
    a blocked node's weights as FP16 with a Cast back. Remove both round trips, so a layer kept in
    FP32 reads FP32 weights and an FP32 input from another layer kept in FP32."""
    onnx = require("onnx")
    originals = {t.name: t for t in source.initializer}
    fp16_inits = {t.name for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    replace, dropped, added = {}, set(), []
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != FLOAT or node.output[0] in outputs:
            continue  # (a graph output keeps the Cast that names it)
        src = node.input[0]
        if src in fp16_inits and src in originals:  # a weight: use the FP32 original instead
            fp32 = onnx.TensorProto()
            fp32.CopyFrom(originals[src])
            fp32.name = f"{src}_fp32"
            added.append(fp32)
            replace[node.output[0]], dropped = fp32.name, dropped | {node.name}
            continue
        up = next((n for n in graph.node if src in n.output), None)
        if up is not None and up.op_type == "Cast" and _cast_to(up) == FLOAT16 and src not in outputs:
            replace[node.output[0]], dropped = up.input[0], dropped | {node.name}
    if not replace:
        return
    kept = [n for n in graph.node if n.name not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    used = {name for n in kept for name in n.input}
    kept = [n for n in kept if n.op_type != "Cast" or any(o in used or o in outputs for o in n.output)]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for n in kept for name in n.input}
    inits = [t for t in graph.initializer if t.name in used] + [t for t in added if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _cast_to(node) -> int:
    return next(a.i for a in node.attribute if a.name == "to")
