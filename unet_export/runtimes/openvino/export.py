"""OpenVINO IR (``<stem>.xml`` + ``<stem>.bin``) from an ONNX model, converted with OpenVINO's own
converter (``ov.convert_model``) and saved with FP32 or FP16-compressed weights; the use case
that verifies and publishes it is flows/openvino.py.

The IR keeps the ONNX model's dynamic batch, height and width, and carries the model record
(architecture, config, mask_values, preprocessing, checkpoint) in its runtime info under
``unet_export``, as the ONNX model carries it in metadata_props."""

from pathlib import Path

from unet_export.errors import ArtifactError, require
from unet_export.fileio import fsync_file
from unet_export.runtimes.onnx.export import read_metadata as read_onnx_metadata

RT_KEY = "unet_export"  # the IR's runtime-info section holding the model record
SUFFIXES = {"fp32": ".xml", "fp16": ".fp16.xml", "int8": ".int8.xml"}


def ir_path(workdir: Path, onnx_name: str, precision: str) -> Path:
    """exports/<stem>.xml (FP32), <stem>.fp16.xml, <stem>.int8.xml; the .bin sits beside each."""
    return Path(workdir) / (Path(onnx_name).stem + SUFFIXES[precision])


def write_ir(model, dest: Path, metadata: dict[str, str], *, compress_to_fp16: bool = False) -> dict:
    """Save the ov.Model ``model`` as ``dest`` (.xml) + ``dest.with_suffix('.bin')`` with
    ``metadata`` in its runtime info; both files are flushed to disk. Returns the IR's record."""
    ov = require("openvino", extra="openvino")
    for key, value in metadata.items():
        model.set_rt_info(value, [RT_KEY, key])
    try:
        ov.save_model(model, str(dest), compress_to_fp16=compress_to_fp16)
    except RuntimeError as exc:  # OpenVINO reports a full disk or a bad path as RuntimeError
        raise ArtifactError(f"openvino.save_model failed: {' '.join(str(exc).split())[:300]}") from exc
    for path in (dest, dest.with_suffix(".bin")):
        fsync_file(path)
    return {"ir_shapes": {"input": str(model.input(0).get_partial_shape()), "output": str(model.output(0).get_partial_shape())},
            "openvino_version": ov.__version__.split("-")[0], "weights_fp16": compress_to_fp16}  # fmt: skip


def convert_onnx(src: Path, dest: Path, *, fp16: bool = False) -> dict:
    """The ONNX model at ``src`` -> IR at ``dest`` with OpenVINO's converter; its metadata_props
    become the IR's runtime info."""
    ov = require("openvino", extra="openvino")
    try:
        model = ov.convert_model(str(src))
    except Exception as exc:  # the frontend raises its own types (OpConversionFailure, ...)
        raise ArtifactError(f"openvino.convert_model failed on {src.name}: {' '.join(str(exc).split())[:300]}") from exc
    metadata = read_onnx_metadata(src) | {"precision": "fp16" if fp16 else "fp32", "source": src.name}
    return write_ir(model, dest, metadata, compress_to_fp16=fp16)


def read_metadata(path: Path) -> dict[str, str]:
    """The model record an IR carries (``predict`` reads it like ONNX metadata_props)."""
    ov = require("openvino", extra="openvino")
    info = ov.Core().read_model(str(path)).get_rt_info()
    section = info[RT_KEY] if RT_KEY in info else {}  # noqa: SIM401 (an RTMap has no get)
    return {key: value.astype(str) for key, value in section.items()}
