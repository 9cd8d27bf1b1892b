"""OpenVINO on the CPU, reading an OpenVINO IR (``.xml`` + its ``.bin``) or the ONNX artefact.
Each new input shape is compiled static once (static kernels are faster than dynamic ones);
``precision`` names what the artefact is (fp32, fp16, bf16, int8) and sets the inference
precision hint: fp32 keeps full precision, bf16 uses the CPU's bf16 units where it has them
(OpenVINO emulates them, slowly, on CPUs without avx512_bf16/AMX), int8 runs the quantised layers
in INT8 (VNNI/AMX) and the layers left in FP32 in f32.

An IR is two files. The manifest records the .xml as the entry's ``path`` and the .bin under
``weights`` (path, bytes, sha256); ``ir_weights`` is the check every reader goes through, and it
finishes a .bin rename that a killed export left pending (see export/openvino.py, record_ir)."""

import os
from pathlib import Path

import torch

from unet_export.errors import IntegrityError, UserError, require
from unet_export.fileio import sha256_file
from unet_export.manifest import transaction, workdir_file
from unet_export.runners.base import Runner

PARKED_SUFFIX = ".pending"
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


class OpenVinoRunner(Runner):
    name = "openvino"

    def __init__(self, path: str | Path, device="cpu", precision="fp32", weights: str | Path | None = None,
                 hint: str | None = None):  # fmt: skip
        super().__init__(device, precision)
        if self.device.type != "cpu":
            raise UserError("the OpenVINO runner runs on the CPU only")
        if precision not in HINTS:
            raise UserError(f"OpenVINO precision {precision!r}: choose one of {', '.join(HINTS)}")
        self.path = Path(path)
        self.weights = Path(weights) if weights else None
        self.hint = hint or HINTS[precision]
        self.requests = {}

    def _activate_impl(self) -> None:
        ov = require("openvino", extra="openvino")
        if not self.path.is_file():
            raise UserError(f"OpenVINO model not found: {self.path}")
        self.core = ov.Core()
        files = (str(self.path), str(self.weights)) if self.weights else (str(self.path),)
        try:
            self.model = self.core.read_model(*files)
        except Exception:
            if self.path.suffix == ".onnx":  # an ONNX model read by OpenVINO (no IR in the workdir)
                from unet_export.export.onnx import refuse_outside_data

                refuse_outside_data(self.path)
            raise
        self.requests = {}

    def _request(self, shape: tuple[int, ...]):
        if shape not in self.requests:
            model = self.model.clone()
            model.reshape({model.input(0).get_any_name(): list(shape)})
            config = {"INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": "LATENCY"}
            compiled = self.core.compile_model(model, "CPU", config)
            self.requests[shape] = (compiled.create_infer_request(), compiled.output(0))
        return self.requests[shape]

    def _infer_impl(self, x: torch.Tensor) -> torch.Tensor:
        request, output = self._request(tuple(x.shape))
        request.infer({0: x.detach().contiguous().numpy()})
        return torch.from_numpy(request.get_tensor(output).data.copy())

    def _deactivate_impl(self) -> None:
        self.requests = {}
        self.model = None

    def describe(self) -> str:
        source = ", IR" if self.path.suffix == ".xml" else ""
        if self.precision == "int8":
            return f"CPU{source}, INT8 ({self.hint} for the layers left in FP32)"
        return f"CPU{source}, {self.hint} inference precision"


def ir_weights(xml: Path, entry: dict) -> Path | None:
    """The .bin of the IR at ``xml``, checked against the manifest's ``weights`` record when
    ``xml`` is the published file (an IR still being verified reads the .bin beside it). A
    published IR's .bin is a file of the workdir, never a link leading out, recorded or not."""
    record = entry.get("weights")
    if xml.suffix != ".xml":
        return None
    if xml.name != entry["path"]:  # this command's own staged IR
        return xml.with_suffix(".bin") if record else None
    if not record or "sha256" not in record:  # a manifest from before the .bin was recorded
        return workdir_file(xml.parent, xml.with_suffix(".bin").name)
    path = workdir_file(xml.parent, record["path"])
    if record.get("pending") and not _matches(path, record):
        finish_pending_weights(xml.parent)
    if not path.is_file():
        raise IntegrityError(
            f"{path} (the weights of {xml.name}) is in manifest.json but missing on disk; export it again"
        )
    if not _matches(path, record):
        raise IntegrityError(f"{path} (the weights of {xml.name}) changed since it was verified (its sha256 is not the one "
                             "in manifest.json); export it again")  # fmt: skip
    return path


def _matches(path: Path, record: dict) -> bool:
    return path.is_file() and path.stat().st_size == record["bytes"] and sha256_file(path) == record["sha256"]


def finish_pending_weights(workdir: Path, manifest: dict | None = None) -> bool:
    """Complete the .bin renames a killed export left half done: the parked .bin (named in
    ``weights.pending``) is moved into place if it is the recorded one. Inside a manifest
    transaction pass its ``manifest``; otherwise this opens one. Returns whether anything changed."""
    if manifest is None:
        with transaction(workdir) as current:
            return finish_pending_weights(workdir, current)
    records = [entry.get("weights") or {} for entry in manifest["artifacts"]]
    # every name is checked (a plain name, no link leading out) before anything moves or is deleted
    moves = [(workdir_file(workdir, parked), workdir_file(workdir, record["path"]), record)
             for record in records if (parked := record.pop("pending", None)) is not None]  # fmt: skip
    for parked, final, record in moves:
        if parked.is_file() and not _matches(final, record) and sha256_file(parked) == record["sha256"]:
            os.replace(parked, final)
        parked.unlink(missing_ok=True)
    for orphan in Path(workdir).glob(f".*{PARKED_SUFFIX}"):  # parked by an export killed before it saved
        orphan.unlink(missing_ok=True)
    return bool(moves)


def parked_name(bin_name: str, sha256: str) -> str:
    """Where a verified .bin waits for its rename: a hidden name that the temp-file sweep keeps."""
    return f".{bin_name}.{sha256[:16]}{PARKED_SUFFIX}"
