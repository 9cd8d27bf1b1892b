"""ONNX writer: torch.onnx's dynamo exporter (the default since PyTorch 2.9) with dynamic batch,
height and width, metadata_props, onnx.checker, and an atomic write."""

import contextlib
import io
import json
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from unet_export.errors import ArtifactError, IntegrityError, UserError, require
from unet_export.fileio import atomic_path
from unet_export.models.sizes import SizeRule

# ONNX Runtime's CUDA provider had no Resize kernel for opset >= 19 until early 2026, so a
# U-Net's up-sampling silently fell back to the CPU; Ultralytics caps at 18 for the same reason.
DEFAULT_OPSET = 18
MIN_OPSET = 18  # the lowest opset torch.onnx's dynamo exporter implements
INPUT_NAME, OUTPUT_NAME = "input", "logits"
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}


def export_onnx(
    model: nn.Module,
    dest: Path,
    sample: torch.Tensor,
    metadata: dict[str, str],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    sizes: SizeRule = SizeRule(),
    **_,
) -> dict:
    """Write ``model`` to ``dest`` as ONNX; returns the I/O description for the manifest."""
    onnx = require("onnx")
    require("onnxscript")  # the dynamo exporter translates through it
    check_opset(opset, onnx.defs.onnx_opset_version())
    shapes = (_dynamic_shapes(sizes),) if dynamic else None
    # torch.export specialises a dimension of size 1 to a constant: traced at batch 1, a model that
    # reshapes by its batch (smp's Segformer) came out fixed at batch 1, so the trace sees two.
    if dynamic and sample.shape[0] == 1:
        sample = sample.repeat(2, 1, 1, 1)
    proto = _export_proto(model, sample, opset, shapes)
    onnx.helper.set_model_props(proto, metadata)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ArtifactError(f"the exported ONNX model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    with atomic_path(dest) as tmp:
        onnx.save(proto, str(tmp))
    return io_record(proto, dynamic)


def check_opset(opset: int, newest: int) -> None:
    """The dynamo exporter writes opset 18 and up; below that its down-conversion fails for
    U-Nets (no Pad adapter) and it would silently keep 18, so refuse instead."""
    if not MIN_OPSET <= opset <= newest:
        raise UserError(f"--opset {opset} is not supported: choose {MIN_OPSET} to {newest} (installed onnx)")


def _dynamic_shapes(sizes: SizeRule) -> dict:
    """Batch, height and width as torch.export dims that follow the model's size rule."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    if sizes.multiple == 1:
        return {0: batch, 2: Dim("height", min=sizes.min), 3: Dim("width", min=sizes.min)}
    # e.g. 32k for encoders that halve five times, 16k + 124 for the unpadded 2015 U-Net
    k_min = (sizes.first() - sizes.offset) // sizes.multiple
    dims = [sizes.multiple * Dim(f"{name}_k", min=k_min) + sizes.offset for name in ("height", "width")]
    return {0: batch, 2: dims[0], 3: dims[1]}


def _export_proto(model, sample, opset, dynamic_shapes):
    log = io.StringIO()
    try:
        # The exporter prints progress lines and deprecation chatter; keep it for errors only.
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model.eval(),
                (sample,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean "could not export"
        raise ArtifactError(f"torch.onnx.export failed: {_root_cause(exc)}") from exc
    return program.model_proto


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _root_cause(exc: BaseException) -> str:
    """The exception torch.export raised, not the exporter's wrapper: the wrapper's first 300
    characters are always the same advice (in terminal colours), the cause says what failed."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(ANSI.sub("", str(exc)).split())
    return f"{type(exc).__name__}: {text[:300]}"


def io_record(proto, dynamic: bool) -> dict:
    def shape(value_info):
        dims = value_info.type.tensor_type.shape.dim
        return [d.dim_param or d.dim_value for d in dims]

    return {
        "inputs": [{"name": v.name, "shape": shape(v)} for v in proto.graph.input],
        "outputs": [{"name": v.name, "shape": shape(v)} for v in proto.graph.output],
        # what the graph declares, not what was asked for: an exporter that fixed an axis says so here
        "dynamic_axes": {v.name: {axis: DYNAMIC_AXES[axis] for axis in DYNAMIC_AXES if shape(v)[axis] and
                                  isinstance(shape(v)[axis], str)} for v in (*proto.graph.input, *proto.graph.output)
                         if v.name in (INPUT_NAME, OUTPUT_NAME)} if dynamic else {},
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
    }


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file (without loading its weights)."""
    onnx = require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def check_external_data(path: Path) -> None:
    """Refuse an ONNX model with a tensor whose external data file is not inside the model's own
    folder (an absolute path, ``..``, or a link leading out): ONNX Runtime, OpenVINO and onnx
    refuse to load it, and it must never make a command read a file elsewhere."""
    onnx = require("onnx")
    path = Path(path)
    folder = path.parent.resolve()
    for tensor in _tensors(onnx.load(str(path), load_external_data=False)):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if Path(location).is_absolute() or not _inside(path.parent / location, folder):
            raise IntegrityError(f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, outside the model's "
                                 f"folder {folder}; an ONNX model's external data must sit beside it")  # fmt: skip


def _inside(path: Path, folder: Path) -> bool:
    try:
        target = path.resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL in the name
        return False
    return target.is_relative_to(folder) and target != folder


def refuse_outside_data(path: Path) -> None:
    """After a runtime failed to load the ONNX model at ``path``: raise check_external_data's
    error if that is why; otherwise return and let the runtime's own error speak."""
    try:
        check_external_data(path)
    except IntegrityError:
        raise
    except Exception:  # not a model onnx can parse either
        pass


def _tensors(model):
    """Every tensor of an ONNX model that can hold external data: initializers and the constants
    of nodes, in the graph, its subgraphs and its functions."""

    def graph_tensors(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from node_tensors(graph.node)

    def node_tensors(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from graph_tensors(graph)

    yield from graph_tensors(model.graph)
    for function in model.functions:
        yield from node_tensors(function.node)


def metadata_json(record: dict) -> dict[str, str]:
    """Flatten a model record into ONNX metadata_props (string values only)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()}


