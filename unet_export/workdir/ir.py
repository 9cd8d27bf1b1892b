"""An OpenVINO IR in a workdir is two files. The manifest records the .xml as the entry's
``path`` and the .bin under ``weights`` (path, bytes, sha256); ``ir_weights`` is the check every
reader goes through, and it finishes a .bin rename that a killed export left pending (see
flows/openvino.py, record_ir)."""

import os
from pathlib import Path

from unet_export.errors import IntegrityError
from unet_export.fileio import sha256_file
from unet_export.workdir.manifest import transaction, workdir_file

PARKED_SUFFIX = ".pending"


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
