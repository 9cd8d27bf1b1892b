"""The workdir's manifest.json: the model the artefacts came from and one entry per artefact.

`unet-export trt`, `unet-bench` and `predict` read it. An entry is keyed by (format, precision):
re-running a command replaces its own entry. Exporting a different checkpoint into the same
workdir starts a new artefact list, since the old entries no longer describe that model.
"""

import json
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from unet_export.errors import UserError
from unet_export.fileio import write_json

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


def load_manifest(workdir: Path) -> dict:
    path = Path(workdir) / MANIFEST_NAME
    if not path.exists():
        return {"schema": SCHEMA_VERSION, "model": None, "artifacts": []}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); delete it and export again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list):
        raise UserError(f"{path} is not an unet-export manifest; delete it and export again")
    return manifest


def save_manifest(workdir: Path, manifest: dict) -> None:
    write_json(Path(workdir) / MANIFEST_NAME, manifest)


def set_model(manifest: dict, record: dict) -> int:
    """Record the model; returns how many entries of a previous model were dropped."""
    old = manifest.get("model") or {}
    dropped = 0
    if old.get("checkpoint", {}).get("sha256") != record["checkpoint"]["sha256"]:
        dropped = len(manifest["artifacts"])
        manifest["artifacts"] = []
    manifest["model"] = record
    return dropped


def upsert_artifact(manifest: dict, entry: dict) -> None:
    key = (entry["format"], entry["precision"])
    kept = [a for a in manifest["artifacts"] if (a["format"], a["precision"]) != key]
    manifest["artifacts"] = kept + [entry]


def find_artifacts(manifest: dict, fmt: str | None = None) -> list[dict]:
    return [a for a in manifest["artifacts"] if fmt is None or a["format"] == fmt]


def tool_versions(*packages: str) -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing heavy is imported)."""
    names = packages or ("unet-export", "torch", "onnx", "onnxruntime", "onnxscript")
    found = {}
    if "torch" in names:  # the import name carries the build (+cu132, +cpu); metadata does not
        import torch

        found["torch"], found["cuda"] = torch.__version__, torch.version.cuda
    for name in (n for n in names if n not in found):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
