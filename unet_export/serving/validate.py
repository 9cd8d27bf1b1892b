"""Checks a Triton repository must pass before anyone serves it: every config.pbtxt parsed against
Triton's ModelConfig, then what the protobuf schema cannot see (REFERENCE.md 9: a wrong platform
string, a repeated batch dim): folder name = model name, platform/backend of the artefact's kind,
dims that fit the artefact's real shapes (read from the ONNX graph itself where there is one),
tensor names that exist in the graph or engine, max_batch_size within a TensorRT profile, files
that hash to what was verified, and ensemble steps that connect. Problems are collected, then
raised as one UserError."""

import importlib.util
import json
from pathlib import Path

from unet_export.errors import UserError, require
from unet_export.fileio import sha256_file
from unet_export.serving import configs
from unet_export.serving.configs import CONFIG_NAME, ENSEMBLE, NATIVE, PYTHON, VERSION
from unet_export.serving.plan import RECORD_NAME

KINDS = NATIVE | {"python": PYTHON, "preprocess": PYTHON, "postprocess": PYTHON, "ensemble": ENSEMBLE}


def read_record(repo: Path) -> dict:
    path = Path(repo) / RECORD_NAME
    if not path.is_file():
        raise UserError(f"{repo} is not a repository written by `unet-export triton` (no {RECORD_NAME})")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); write the repository again") from None


def check_repository(repo: str | Path) -> dict:
    """{model name: parsed config} of a repository that passed every check."""
    repo = Path(repo)
    record = read_record(repo)
    folders = sorted(p.name for p in repo.iterdir() if p.is_dir())
    found = {name: configs.parse(repo / name / CONFIG_NAME) for name in folders}
    problems = [f"{name}: a model unet-export did not write" for name in folders if name not in record["models"]]
    problems += [f"{name}: in {repo.name}/unet_export.json but its folder is missing"
                 for name in record["models"] if name not in found]  # fmt: skip
    for name, config in found.items():
        if name in record["models"]:
            problems += [f"{name}: {p}" for p in check_model(repo / name, config, record["models"][name], found)]
    if problems:
        raise UserError(f"{repo}: {len(problems)} problem(s): " + "; ".join(problems))
    return found


def check_model(folder: Path, config, record: dict, others: dict) -> list[str]:
    kind = KINDS.get(record.get("kind"))
    if kind is None:
        return [f"unknown kind {record.get('kind')!r} in unet_export.json"]
    problems = []
    if config.name != folder.name:
        problems.append(f"config name {config.name!r} differs from its folder's name")
    if (config.platform or None) != kind.platform or (not kind.platform and config.backend != kind.backend):
        problems.append(f"platform {config.platform!r} / backend {config.backend!r}: a {record['kind']} model needs "
                        + (f"platform {kind.platform!r}" if kind.platform else f"backend {kind.backend!r}"))  # fmt: skip
    problems += _check_batching(config, record)
    broken = _check_files(folder, record)
    if broken:  # the rest would read files that are not the verified ones
        return problems + broken
    if record["kind"] == "ensemble":
        return problems + _check_steps(config, others)
    problems += _check_instances(config, kind)
    if "artifact" in record:
        problems += _check_io(folder, config, record)
    if kind is PYTHON:
        problems += _check_python(folder, config, record)
    return problems


def _check_batching(config, record: dict) -> list[str]:
    problems = []
    limit = record.get("batch_limit")
    if config.max_batch_size < 0:
        problems.append(f"max_batch_size {config.max_batch_size} is negative")
    if limit is not None and config.max_batch_size > limit:
        problems.append(f"max_batch_size {config.max_batch_size} exceeds the engine profile's max batch {limit}")
    if config.HasField("dynamic_batching"):
        if config.max_batch_size == 0:
            problems.append("dynamic_batching needs max_batch_size > 0")
        too_big = [n for n in config.dynamic_batching.preferred_batch_size if n > config.max_batch_size]
        if too_big:
            problems.append(f"preferred_batch_size {too_big} above max_batch_size {config.max_batch_size}")
    return problems


def _check_files(folder: Path, record: dict) -> list[str]:
    if not (folder / VERSION).is_dir():
        return [f"no version folder {VERSION}/"]
    problems = []
    for relative, digest in record.get("files", {}).items():
        path = folder / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{relative} changed since it was written (sha256 differs)")
    return problems


def _check_instances(config, kind) -> list[str]:
    pb, _ = configs.protobuf()
    wanted = pb.ModelInstanceGroup.KIND_GPU if kind.gpu else pb.ModelInstanceGroup.KIND_CPU
    bad = [g for g in config.instance_group if g.kind != wanted or g.count < 1]
    if not config.instance_group or bad:
        return [f"instance_group must be {pb.ModelInstanceGroup.Kind.Name(wanted)} with count >= 1"]
    return []


def _check_io(folder: Path, config, record: dict) -> list[str]:
    """Config tensors against the artefact's: the ONNX graph or OpenVINO IR when the model folder
    holds one, else the names and shapes the manifest recorded (engine, TorchScript)."""
    graph = _onnx_io(folder) or _ir_io(folder) or record["graph"]
    problems = []
    for side in ("inputs", "outputs"):
        tensors = config.input if side == "inputs" else config.output
        names, shapes = graph[side], graph.get(f"{side}_dims") or record.get("dims", {}).get(side)
        if len(tensors) != len(names):
            problems.append(f"{len(tensors)} {side} in the config, {len(names)} in the artefact")
            continue
        for i, tensor in enumerate(tensors):
            expected = f"{side[:-1].upper()}__{i}" if record["kind"] == "torchscript" else names[i]
            if tensor.name != expected:
                problems.append(f"{side[:-1]} {tensor.name!r} is not in the artefact (expected {expected!r})")
            if shapes is not None:
                problems += _dims_fit(tensor, shapes[i], config.max_batch_size)
    return problems


def _dims_fit(tensor, artefact: list[int], max_batch: int) -> list[str]:
    """Triton's dims against the artefact's full shape: without the batch dim when batching (which
    must then be free in the artefact), otherwise equal (-1 exactly where the artefact is free:
    a fixed size there would refuse inputs the artefact was verified on)."""
    dims, full = list(tensor.dims), list(artefact)
    if max_batch > 0:
        if full and full[0] != -1:
            return [f"{tensor.name}: max_batch_size > 0 but the artefact's batch is fixed at {full[0]}"]
        full = full[1:]
    if len(dims) != len(full):
        return [f"{tensor.name}: dims {dims} have rank {len(dims)}, the artefact's {'non-batch ' if max_batch else ''}"
                f"shape {full} rank {len(full)}"]  # fmt: skip
    return [] if dims == full else [f"{tensor.name}: dims {dims} differ from the artefact's {full}"]


def _onnx_io(folder: Path) -> dict | None:
    """Names and dims (-1 where symbolic) of the ONNX graph in the model's version folder."""
    path = folder / VERSION / "model.onnx"
    if not path.is_file():
        return None
    onnx = require("onnx")
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # its sha256 matched, so this is a file the writer copied wrongly: say so
        raise UserError(f"{path} is not a readable ONNX model: {' '.join(str(exc).split())[:200]}") from None
    initialisers = {i.name for i in graph.initializer}

    def dims(value):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]

    inputs = [v for v in graph.input if v.name not in initialisers]
    return {"inputs": [v.name for v in inputs], "outputs": [v.name for v in graph.output],
            "inputs_dims": [dims(v) for v in inputs], "outputs_dims": [dims(v) for v in graph.output]}  # fmt: skip


def _ir_io(folder: Path) -> dict | None:
    """Names and dims (-1 where dynamic) of the OpenVINO IR in the version folder, when OpenVINO
    is installed to read it (else the manifest's record is the reference)."""
    path = folder / VERSION / "model.xml"
    if not path.is_file() or importlib.util.find_spec("openvino") is None:
        return None
    import openvino as ov

    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:
        raise UserError(f"{path} is not a readable OpenVINO IR: {' '.join(str(exc).split())[:200]}") from None

    def dims(port):
        return [-1 if d.is_dynamic else d.get_length() for d in port.get_partial_shape()]

    return {"inputs": [p.get_any_name() for p in model.inputs], "outputs": [p.get_any_name() for p in model.outputs],
            "inputs_dims": [dims(p) for p in model.inputs], "outputs_dims": [dims(p) for p in model.outputs]}  # fmt: skip


def _check_python(folder: Path, config, record: dict) -> list[str]:
    try:
        settings = json.loads(config.parameters["unet_export"].string_value)
    except (KeyError, json.JSONDecodeError):
        return ["parameter 'unet_export' is missing or not JSON"]
    role = "model" if record["kind"] == "python" else record["kind"]
    if settings.get("role") != role:
        return [f"parameter role {settings.get('role')!r}, expected {role!r}"]
    if role != "model":
        return []
    problems = []
    if not (folder / VERSION / str(settings.get("artifact"))).is_file():
        problems.append(f"its artefact {settings.get('artifact')!r} is not in {VERSION}/")
    if settings.get("input") != config.input[0].name or settings.get("output") != config.output[0].name:
        problems.append("parameter input/output names differ from the config's")
    return problems


def _check_steps(config, others: dict) -> list[str]:
    """Every step's model exists and its maps name real tensors; every tensor is produced
    before it is used, with one data type along the way; every ensemble output is produced."""
    problems, available = [], {t["name"]: t["dtype"] for t in configs.io_specs(config.input)}
    for step in config.ensemble_scheduling.step:
        model = others.get(step.model_name)
        if model is None:
            problems.append(f"step model {step.model_name!r} is not in the repository")
            continue
        ins = {t["name"]: t["dtype"] for t in configs.io_specs(model.input)}
        outs = {t["name"]: t["dtype"] for t in configs.io_specs(model.output)}
        if set(step.input_map) != set(ins):
            problems.append(f"step {step.model_name} maps inputs {sorted(step.input_map)}, the model takes "
                            f"{sorted(ins)}")  # fmt: skip
        for key, tensor in step.input_map.items():
            if tensor not in available:
                problems.append(f"step {step.model_name} reads {tensor!r} before any step produces it")
            elif key in ins and available[tensor] != ins[key]:
                problems.append(f"step {step.model_name}: {tensor!r} is {available[tensor]}, {key} takes {ins[key]}")
        for key, tensor in step.output_map.items():
            if key not in outs:
                problems.append(f"step {step.model_name} has no output {key!r}")
            else:
                available[tensor] = outs[key]
        if model.max_batch_size < config.max_batch_size:
            problems.append(f"max_batch_size {config.max_batch_size} exceeds step {step.model_name}'s "
                            f"{model.max_batch_size}")  # fmt: skip
    for tensor in configs.io_specs(config.output):
        if available.get(tensor["name"]) != tensor["dtype"]:
            problems.append(f"output {tensor['name']} ({tensor['dtype']}) is not produced by any step")
    return problems
