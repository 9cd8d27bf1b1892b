"""`unet-export inspect`: what an exported artefact is, read from the file (inputs, outputs with
their dynamic axes, opset, node count, precision, the model record it carries) and, when it sits
in a workdir, from that workdir's manifest (size rule, the recorded verdict, whether this is the
file that was verified). Nothing is run; only the runtime of the format asked is imported, and
a .pt2 package is read as a zip (loading it would load its compiled code).

    from unet_export.flows.inspect import inspect_artifact
    info = inspect_artifact("exports/demo_unet.onnx")    # or ("exports", "demo_unet.onnx")
    info.inputs[0].shape                                  # ['batch', 3, 'height', 'width']
"""

import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unet_export.errors import UserError, require
from unet_export.fileio import decode_metadata, sha256_file
from unet_export.workdir.manifest import MANIFEST_NAME, is_file_name, load_manifest, workdir_file

FORMATS = {".onnx": "onnx", ".ts": "torchscript", ".pt2": "aoti", ".xml": "openvino", ".engine": "tensorrt"}
# export.openvino.RT_KEY (a test holds them equal): importing that module would import torch.
IR_RECORD_KEY = "unet_export"
_NP_DTYPES = {"float": "float32", "double": "float64"}  # ONNX's names where numpy's differ


@dataclass
class Tensor:
    name: str
    dtype: str
    shape: list  # sizes, and the names of dynamic axes ("batch", "height", ...)


@dataclass
class ArtifactInfo:
    path: Path
    format: str
    bytes: int
    sha256: str
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    opset: int | None = None  # ONNX only
    nodes: int | None = None  # ONNX nodes, OpenVINO ops, TorchScript graph nodes (inlined)
    precision: str | None = None
    model: dict = field(default_factory=dict)  # the model record the file (or the manifest) carries
    size_rule: dict | None = None
    entry: dict | None = None  # the manifest's record of this file
    verified_file: bool | None = None  # its sha256 (and an IR's .bin's) are those the verdict was given to
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self) | {"path": str(self.path)}


def inspect_artifact(target: str | Path, name: str | None = None) -> ArtifactInfo:
    """Describe the artefact at ``target``, or the one called ``name`` in the workdir ``target``."""
    path = _resolve(Path(target), name)
    info = ArtifactInfo(path, FORMATS[path.suffix.lower()], path.stat().st_size, sha256_file(path))
    _recorded(info)
    READERS[info.format](info)
    _from_record(info)
    return info


def _resolve(target: Path, name: str | None) -> Path:
    """The artefact's path: ``target`` itself, or ``name`` inside the workdir ``target``, which
    must be a plain file name there (the workdir is untrusted: no ``..``, no link leading out)."""
    if name is not None:
        if not target.is_dir():
            raise UserError(f"{target} is not a workdir (a folder with {MANIFEST_NAME})")
        if not is_file_name(name):
            raise UserError(f"{name!r} is not a file name inside the workdir {target}")
        target = workdir_file(target, name)
    elif target.is_dir():
        names = [a["path"] for a in load_manifest(target)["artifacts"]]
        listed = f": one of {', '.join(names)}" if names else f" (it has no {MANIFEST_NAME} with artefacts)"
        raise UserError(f"{target} is a folder: name the artefact in it{listed}")
    if not target.is_file():
        raise UserError(f"artefact not found: {target}" if not target.exists() else f"{target} is not a file")
    if target.suffix.lower() not in FORMATS:
        raise UserError(f"{target} is not an exported model: inspect reads {', '.join(FORMATS)} files")
    return target


def _recorded(info: ArtifactInfo) -> None:
    """The manifest entry beside the file, and whether the file (and an IR's .bin) is the one it
    verified. A link that leads out of the workdir is refused, as every command refuses it."""
    workdir, name = info.path.parent, info.path.name
    if not (workdir / MANIFEST_NAME).exists():
        info.notes.append(f"no {MANIFEST_NAME} beside it: no recorded verdict")
        return
    workdir_file(workdir, name)
    info.entry = next((a for a in load_manifest(workdir)["artifacts"] if a["path"] == name), None)
    if info.entry is None:
        info.notes.append(f"{workdir / MANIFEST_NAME} does not record {name}: no recorded verdict")
        return
    same = info.entry.get("sha256") == info.sha256 and info.entry.get("bytes") == info.bytes
    weights = info.entry.get("weights")
    if weights:  # checked first whatever the .xml's state: the IR reader opens the .bin next
        bin_path = workdir_file(workdir, weights["path"])
        same = same and bin_path.is_file() and sha256_file(bin_path) == weights.get("sha256")
    info.verified_file = same
    if not same:
        info.notes.append("the file changed since it was verified: the recorded verdict is not this file's")


def _from_record(info: ArtifactInfo) -> None:
    """What the file did not say, from the manifest entry, then from the model record."""
    entry = info.entry or {}
    for key in ("inputs", "outputs"):
        if not getattr(info, key) and entry.get(key):
            setattr(info, key, [Tensor(t["name"], "float32", list(t["shape"])) for t in entry[key]])
    info.precision = entry.get("precision") or info.precision
    info.size_rule = entry.get("size_rule") or _size_rule(info.model)


def _size_rule(model: dict) -> dict | None:
    architecture, config = model.get("architecture"), model.get("config")
    if not isinstance(architecture, str) or not isinstance(config, dict):
        return None
    from unet_export.models import MODELS

    spec = MODELS.get(architecture)
    return spec.sizes(config).to_dict() if spec else None


def _unreadable(info: ArtifactInfo, what: str, exc: Exception) -> UserError:
    detail = " ".join(str(exc).split())[:200] or type(exc).__name__
    return UserError(f"{info.path} is not a readable {what} (corrupt or truncated?): {detail}")


def _read_onnx(info: ArtifactInfo) -> None:
    onnx = require("onnx")
    try:
        proto = onnx.load(str(info.path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or anything a damaged file raises
        raise _unreadable(info, "ONNX model", exc) from None
    graph = proto.graph
    if not graph.input or not graph.output or not proto.opset_import:
        raise UserError(f"{info.path} is not a readable ONNX model: it has no graph inputs, outputs or opset")

    def tensor(value) -> Tensor:
        kind = value.type.tensor_type
        dtype = onnx.TensorProto.DataType.Name(kind.elem_type).lower()
        return Tensor(value.name, _NP_DTYPES.get(dtype, dtype), [d.dim_param or d.dim_value for d in kind.shape.dim])

    info.inputs, info.outputs = [tensor(v) for v in graph.input], [tensor(v) for v in graph.output]
    info.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    info.nodes = len(graph.node)
    ops = {node.op_type for node in graph.node}
    halves = any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    info.precision = "int8" if "QuantizeLinear" in ops else "fp16" if halves else "fp32"
    info.model = decode_metadata({p.key: p.value for p in proto.metadata_props})


def _read_torchscript(info: ArtifactInfo) -> None:
    import warnings

    import torch

    from unet_export.runtimes.torchscript.export import METADATA_FILE

    extra = {METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript is deprecated upstream
            module = torch.jit.load(str(info.path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - torch.jit.load raises RuntimeError and others
        raise _unreadable(info, "TorchScript model", exc) from None
    info.nodes = len(list(module.inlined_graph.nodes()))
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    info.precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    info.model = json.loads(extra[METADATA_FILE] or "{}")
    info.inputs, info.outputs = _declared_io(info.model, str(dtype).removeprefix("torch."))


def _read_aoti(info: ArtifactInfo) -> None:
    """The package's metadata, read from the zip: no compiled code is loaded."""
    try:
        with zipfile.ZipFile(info.path) as package:
            names = [n for n in package.namelist() if "/aotinductor/" in n and n.endswith("_metadata.json")]
            metadata = json.loads(package.read(names[0])) if names else None
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:  # ValueError: not JSON
        raise _unreadable(info, "AOTInductor package", exc) from None
    if not isinstance(metadata, dict):
        raise UserError(f"{info.path} is not an AOTInductor package: it holds no aotinductor metadata")
    info.model = decode_metadata({k: v for k, v in metadata.items() if not k.startswith("AOTI_")})
    device = metadata.get("AOTI_DEVICE_KEY")
    info.notes.append(f"compiled for {device or 'an unknown device'}"
                      + (f" ({metadata['AOTI_CPU_ISA']})" if metadata.get("AOTI_CPU_ISA") else ""))  # fmt: skip
    info.inputs, info.outputs = _declared_io(info.model, "float32")


def _read_openvino(info: ArtifactInfo) -> None:
    ov = require("openvino", extra="openvino")
    try:  # the IR frontend alone: read_model tries every frontend, and TensorFlow's logs its failure
        frontend = ov.frontend.FrontEndManager().load_by_framework("ir")
        model = frontend.convert(frontend.load(str(info.path)))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError or its own types
        raise _unreadable(info, "OpenVINO IR (with its .bin beside it)", exc) from None
    entry = info.entry or {}
    named = {t["name"]: t["shape"] for t in entry.get("inputs", []) + entry.get("outputs", [])}

    def dim(d, known):  # an IR says ? (or 16..) for a dynamic axis: its name comes from the ONNX record
        return d.get_length() if d.is_static else known if isinstance(known, str) else str(d)

    def tensor(port) -> Tensor:
        known = named.get(port.get_any_name(), [])
        dims = [dim(d, known[i] if i < len(known) else None) for i, d in enumerate(port.get_partial_shape())]
        return Tensor(port.get_any_name(), port.get_element_type().to_dtype().name, dims)

    info.inputs, info.outputs = [tensor(p) for p in model.inputs], [tensor(p) for p in model.outputs]
    ops = model.get_ops()
    info.nodes = len(ops)
    kinds = {op.get_type_name() for op in ops}
    halves = any(op.get_type_name() == "Constant" and op.get_element_type().get_type_name() == "f16" for op in ops)
    info.precision = "int8" if "FakeQuantize" in kinds else "fp16" if halves else "fp32"
    rt = model.get_rt_info()
    section = rt[IR_RECORD_KEY] if IR_RECORD_KEY in rt else {}  # noqa: SIM401 (an RTMap has no get)
    info.model = decode_metadata({key: value.astype(str) for key, value in section.items()})


def _read_tensorrt(info: ArtifactInfo) -> None:
    """An engine is described from its manifest entry and never opened: opening one needs TensorRT
    and the GPU (and TensorRT version) that built it, and `unet-export verify` does that. Without a
    manifest that records it nothing can be said: refused (exit 2)."""
    if info.entry is None:
        raise UserError(f"{info.path}: a TensorRT engine is described from the {MANIFEST_NAME} of its workdir "
                        "(opening one needs TensorRT and the GPU that built it), and none beside it records it")
    info.notes.append("a TensorRT engine is not opened here: inputs, outputs and precision are the manifest's "
                      "record (unet-export verify opens it on its GPU)")


def _declared_io(model: dict, dtype: str) -> tuple[list[Tensor], list[Tensor]]:
    """A U-Net's one input and one output, from the model record (TorchScript and AOTI files
    declare no shapes): dynamic batch, height and width."""
    config = model.get("config") if isinstance(model.get("config"), dict) else {}
    channels, classes = config.get("n_channels", 3), config.get("n_classes", "n_classes")
    shrink = (_size_rule(model) or {}).get("shrink", 0)
    out_hw = [f"height-{shrink}", f"width-{shrink}"] if shrink else ["height", "width"]
    return ([Tensor("input", dtype, ["batch", channels, "height", "width"])],
            [Tensor("logits", dtype, ["batch", classes, *out_hw])])  # fmt: skip


READERS = {"onnx": _read_onnx, "torchscript": _read_torchscript, "aoti": _read_aoti, "openvino": _read_openvino,
           "tensorrt": _read_tensorrt}  # fmt: skip
