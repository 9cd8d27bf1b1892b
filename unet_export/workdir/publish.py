"""Publishing an artefact into a workdir: a temp path beside its final name while it is written
and verified (``staged``), then its verdict recorded and the file renamed in one manifest
transaction (``record_artifact``)."""

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from unet_export.errors import UserError
from unet_export.fileio import claim_temp_path, ensure_free_space, sha256_file, sweep_stale_temps
from unet_export.workdir.manifest import make_workdir, publish, tool_versions, utc_now
from unet_export.workdir.references import Recording, record_references, sweep_references


def estimated_bytes(net: torch.nn.Module) -> int:
    """What an FP32 artefact of ``net`` takes on disk, with room for graph, metadata and manifest:
    measured .onnx/.ts/.pt2 files are 1.0-1.3x the weights."""
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    return int(weights * 1.5) + (16 << 20)


@contextmanager
def staged(dest: Path, need_bytes: int, what: str):
    """A temp path beside ``dest`` for the artefact while it is written and verified; removed
    unless the block publishes it. Dead processes' leftovers are swept first."""
    sweep_stale_temps(dest.parent)
    ensure_free_space(dest.parent, need_bytes, f"the {what} artefact {dest.name}")
    path = claim_temp_path(dest)
    try:
        yield path
    except OSError as exc:  # a full disk while writing: name the artefact, not its hidden temp name
        if exc.filename == str(path):
            exc.filename = str(dest)
        raise
    finally:
        path.unlink(missing_ok=True)


class created_dir:
    """Create a directory for the block; remove it again if the block fails and left it empty."""

    def __init__(self, path: Path):
        self.path, self.created = path, not path.exists()

    def __enter__(self):
        make_workdir(self.path)

    def __exit__(self, exc_type, *_):
        if exc_type and self.created and not any(self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)


def same_model(current: dict, read: dict, workdir: Path) -> None:
    """An artefact derived from the workdir's model is recorded only if that is still the model."""
    if (current.get("model") or {}).get("checkpoint") != (read.get("model") or {}).get("checkpoint"):
        raise UserError(f"the model in {workdir} was replaced by another export while this one ran; run it again")


def record_artifact(workdir: Path, manifest: dict, entry: dict, parity, device, staged: Path,
                    references: Recording | None = None) -> None:  # fmt: skip
    """Inside a manifest transaction: complete the entry with its verdict (a ParityReport), provenance,
    size and sha256 (of the very file that was checked), and publish ``staged`` under the entry's name.
    ``references``: the eager outputs its gate ran on, recorded for a model that a deployment host
    may be unable to rebuild (workdir/references.py)."""
    record_references(workdir, manifest, references)
    entry |= {
        "status": "verified" if parity.passed else "failed",
        "bytes": staged.stat().st_size,
        "sha256": sha256_file(staged),
        "parity": parity.to_dict() | {"device": str(device)},
        "versions": tool_versions(),
        "created": utc_now(),
    }
    publish(workdir, manifest, entry, staged)
    sweep_references(workdir, manifest)  # the saved manifest names the new file, no longer the one it replaced
