"""TorchScript writer: torch.jit.script keeps milesial's shape-dependent padding as code, so the
module works at any size (a trace would freeze the padding of the trace size). The file loads
with torch.jit.load in Python and torch::jit::load in libtorch C++."""

import io
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from unet_export.errors import ArtifactError
from unet_export.fileio import atomic_path, decode_metadata, write_bytes_checked

METADATA_FILE = "unet_export.json"  # carried inside the archive as an extra file


def export_torchscript(model: nn.Module, dest: Path, sample: torch.Tensor, metadata: dict[str, str], **_) -> dict:
    """Write ``model`` to ``dest`` as a scripted module; returns the I/O description."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
        try:
            scripted = torch.jit.script(model.eval())
        except Exception as exc:  # TorchScript's frontend raises many types
            first = " ".join(str(exc).split())[:300]
            raise ArtifactError(f"torch.jit.script failed: {type(exc).__name__}: {first}") from exc
        # Serialised in memory, written from Python: torch.jit.save to a path aborts the whole
        # process (SIGABRT) when the disk fills, where a Python write raises ENOSPC.
        buffer = io.BytesIO()
        # Real JSON inside the archive (not JSON strings inside JSON); read_metadata takes both.
        torch.jit.save(scripted, buffer, _extra_files={METADATA_FILE: json.dumps(decode_metadata(metadata))})
        with atomic_path(dest) as tmp:
            write_bytes_checked(tmp, buffer.getvalue())
    n, c = sample.shape[:2]
    return {
        "inputs": [{"name": "input", "shape": ["batch", int(c), "height", "width"]}],
        "outputs": [{"name": "logits", "shape": ["batch", "n_classes", "height", "width"]}],
        "dynamic_axes": {"input": {0: "batch", 2: "height", 3: "width"}},
    }


def read_metadata(path: Path) -> dict:
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_FILE] or "{}")
