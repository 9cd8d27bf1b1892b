"""config.pbtxt for each kind of model, built as Triton's own ``ModelConfig`` protobuf message
(tritonclient ships model_config_pb2), so a written config is schema-valid by construction; read
back with ``text_format.Parse``, which rejects a misspelled field or a bad enum in a hand edit.

Tensor specs are plain dicts ``{"name", "dtype", "dims"}`` (dtype as Triton names it: FP32,
UINT8, INT32; dims without the batch dimension when max_batch_size > 0, -1 where free)."""

import json
from dataclasses import dataclass
from pathlib import Path

from unet_export.errors import UserError, require

CONFIG_NAME = "config.pbtxt"
VERSION = "1"
QUEUE_DELAY_US = 2000  # how long dynamic batching waits to fill a batch: a few % of one request's latency
# The Python-backend CPU model's: no wait. Its one instance has every core, so a request that waits
# for company leaves them idle; under load, requests that queued while it ran still go together
# (benchmarks/serve.py: at batch 1 the 2 ms wait was 2.1 of 13 ms per request for one client).
PYTHON_QUEUE_DELAY_US = 0


@dataclass(frozen=True)
class Kind:
    """How Triton serves one artefact format."""

    platform: str | None  # the config's platform, or None where only a backend is named
    backend: str  # the backend folder the server needs to load it
    filename: str  # Triton's default model file name in the version folder
    gpu: bool  # instance kind: the engine runs on a GPU only


NATIVE = {
    "onnx": Kind("onnxruntime_onnx", "onnxruntime", "model.onnx", gpu=False),
    "tensorrt": Kind("tensorrt_plan", "tensorrt", "model.plan", gpu=True),
    "torchscript": Kind("pytorch_libtorch", "pytorch", "model.pt", gpu=False),
    "openvino": Kind(None, "openvino", "model.xml", gpu=False),
}
PYTHON = Kind(None, "python", "model.py", gpu=False)
ENSEMBLE = Kind("ensemble", "", "", gpu=False)
PLATFORM_BACKENDS = {k.platform: k.backend for k in NATIVE.values() if k.platform}


def protobuf():
    """(model_config_pb2, text_format), from the `serve` extra."""
    require("tritonclient.grpc", extra="serve")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2, text_format


def new_config(name: str, kind: Kind, max_batch: int, inputs: list[dict], outputs: list[dict]):
    pb, _ = protobuf()
    config = pb.ModelConfig(name=name, max_batch_size=max_batch)
    if kind.platform:
        config.platform = kind.platform
    else:
        config.backend = kind.backend
    for spec in inputs:
        config.input.add(name=spec["name"], data_type=pb.DataType.Value(f"TYPE_{spec['dtype']}"), dims=spec["dims"])
    for spec in outputs:
        config.output.add(name=spec["name"], data_type=pb.DataType.Value(f"TYPE_{spec['dtype']}"), dims=spec["dims"])
    return config


def add_serving(config, kind: Kind, instances: int, batching: bool) -> None:
    """instance_group (KIND_GPU for engines, KIND_CPU otherwise) and, when batching, dynamic_batching."""
    pb, _ = protobuf()
    group = pb.ModelInstanceGroup.KIND_GPU if kind.gpu else pb.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=instances, kind=group)
    if batching and config.max_batch_size > 0:
        config.dynamic_batching.SetInParent()  # present even where every field keeps its default (delay 0)
        config.dynamic_batching.max_queue_delay_microseconds = PYTHON_QUEUE_DELAY_US if kind is PYTHON else QUEUE_DELAY_US


def set_parameter(config, key: str, value) -> None:
    config.parameters[key].string_value = value if isinstance(value, str) else json.dumps(value)


def add_step(config, model: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    """One ensemble step: ``inputs``/``outputs`` map the step model's tensor names to the
    ensemble's tensor names."""
    step = config.ensemble_scheduling.step.add(model_name=model, model_version=-1)
    for key, value in inputs.items():
        step.input_map[key] = value
    for key, value in outputs.items():
        step.output_map[key] = value


def to_text(config, header: list[str]) -> str:
    _, text_format = protobuf()
    comments = "".join(f"# {line}\n" for line in header)
    return comments + text_format.MessageToString(config)


def parse(path: Path):
    """A config.pbtxt parsed against ModelConfig; a syntax or schema error is one line."""
    pb, text_format = protobuf()
    try:
        return text_format.Parse(Path(path).read_text(), pb.ModelConfig())
    except text_format.ParseError as exc:
        raise UserError(f"{path} is not a valid Triton ModelConfig: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def io_specs(tensors) -> list[dict]:
    """A config's inputs or outputs as tensor specs."""
    pb, _ = protobuf()
    return [{"name": t.name, "dtype": pb.DataType.Name(t.data_type).removeprefix("TYPE_"), "dims": list(t.dims)}
            for t in tensors]  # fmt: skip


def backend_of(config) -> str:
    """The backend folder a server needs for this config ('' for an ensemble)."""
    if config.platform == "ensemble":
        return ""
    return config.backend or PLATFORM_BACKENDS.get(config.platform, config.platform)
