"""TorchScript writer: torch.jit.script keeps milesial's shape-dependent padding as code, so the
module works at any size (a trace would freeze the padding of the trace size). A model that
cannot be scripted (timm/smp encoders that set ``_is_torch_scriptable = False``, Python
constructs TorchScript rejects) is traced at the sample's shape instead and recorded static:
the trace froze its interpolation sizes and padding. The file loads with torch.jit.load in
Python and torch::jit::load in libtorch C++."""

import io
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from unet_export.errors import ArtifactError
from unet_export.fileio import atomic_path, decode_metadata, write_bytes_checked

METADATA_FILE = "unet_export.json"  # carried inside the archive as an extra file
# What torch.jit.trace's check only warns about but is a wrong artefact: traced != eager.
TRACE_MISMATCH = "of the traced function does not match"
REASON_CHARS = 120  # the reason a model was traced, as the export prints and records it


def export_torchscript(model: nn.Module, dest: Path, sample: torch.Tensor, metadata: dict[str, str], **_) -> dict:
    """Write ``model`` to ``dest`` as a scripted module (or, when scripting fails, traced at
    ``sample``'s shape); returns the I/O description, with ``static``/``traced`` when traced."""
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
        try:
            module, reason = torch.jit.script(model), None
        except Exception as exc:  # TorchScript's frontend raises many types
            reason = _first_line(exc)
            module = _trace(model, sample, exc)
        # Serialised in memory, written from Python: torch.jit.save to a path aborts the whole
        # process (SIGABRT) when the disk fills, where a Python write raises ENOSPC.
        buffer = io.BytesIO()
        # Real JSON inside the archive (not JSON strings inside JSON); read_metadata takes both.
        torch.jit.save(module, buffer, _extra_files={METADATA_FILE: json.dumps(decode_metadata(metadata))})
        with atomic_path(dest) as tmp:
            write_bytes_checked(tmp, buffer.getvalue())
    c = int(sample.shape[1])
    if reason is not None:
        return {
            "inputs": [{"name": "input", "shape": list(sample.shape)}],
            "outputs": [{"name": "logits", "shape": ["batch", "n_classes", "height", "width"]}],
            "dynamic_axes": {},
            "static": True,
            "traced": reason,
        }
    return {
        "inputs": [{"name": "input", "shape": ["batch", c, "height", "width"]}],
        "outputs": [{"name": "logits", "shape": ["batch", "n_classes", "height", "width"]}],
        "dynamic_axes": {"input": {0: "batch", 2: "height", 3: "width"}},
    }


def _trace(model: nn.Module, sample: torch.Tensor, script_error: Exception) -> torch.jit.ScriptModule:
    """``model`` traced at ``sample``'s shape, checked on ``sample`` and on a second seeded input of
    that shape (a data-dependent branch shows as a graph that differs). Its TracerWarnings are
    expected (shapes turned into constants) and silenced, except traced outputs that differ from
    eager, which the check only warns about; any failure names both failures."""
    check = torch.rand(sample.shape, generator=torch.Generator().manual_seed(1), dtype=sample.dtype).to(sample.device)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, sample, check_trace=True, check_inputs=[(sample,), (check,)])
        mismatch = [str(w.message) for w in caught if TRACE_MISMATCH in str(w.message)]
        if mismatch:
            raise RuntimeError(mismatch[0])
    except Exception as exc:
        shape = "x".join(map(str, sample.shape))
        raise ArtifactError(f"torch.jit.script failed: {_squeezed(script_error)}; torch.jit.trace at {shape} "
                            f"failed too: {_squeezed(exc)}") from exc  # fmt: skip
    for w in caught:  # the model's own warnings are not the trace's to hide
        if not issubclass(w.category, torch.jit.TracerWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return traced


def _first_line(exc: Exception) -> str:
    """Why scripting failed, in one short line: the error's first line (the rest is a source
    excerpt), cut after the last whole sentence that fits when that line runs long."""
    line = next((s.strip() for s in str(exc).splitlines() if s.strip()), "")
    if len(line) > REASON_CHARS:
        head = line[:REASON_CHARS]
        line = head[: head.rfind(". ") + 1] or head
    return f"{type(exc).__name__}: {line}"


def _squeezed(exc: Exception) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def read_metadata(path: Path) -> dict:
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_FILE] or "{}")
