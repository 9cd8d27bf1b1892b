"""The workdir's manifest.json: a small transactional store of the model the artefacts came from
and one entry per artefact.

Every change is a read-modify-write under an exclusive lock (``fcntl.flock`` on
``.manifest.lock``), saved atomically, so commands running at once on one workdir all land. An
artefact is published in two steps, both inside the lock: the manifest is saved with the new
entry marked ``pending`` (its verified temp file named), then the temp file is renamed into place
and the mark cleared. A process killed in between leaves a redo record: the next transaction
finishes the rename. So a crash leaves either the old state or the new one, never a manifest
that describes a file other than the one on disk.

An entry is keyed by (format, precision): re-running a command replaces its own entry. Every
entry records the artefact's sha256 and size; ``checked_path`` refuses a file that is missing
or changed since it was verified.

A workdir travels (it is copied to the deployment host and verified there), so its manifest is
untrusted input: every file it names is a plain name inside the workdir (checked on load), a
link in the workdir that leads out of it is refused where a command opens it (``workdir_file``),
and the lock is opened without following a link. So no manifest makes a command read, write or
delete a file outside the workdir.
"""

import errno
import fcntl
import json
import os
import signal
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterator

from unet_export.errors import IntegrityError, UserError
from unet_export.fileio import sha256_file, sweep_stale_temps, write_json

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".manifest.lock"
SCHEMA_VERSION = 1

# field -> type(s), checked on every load so a hand-edited manifest fails with the field's name.
_MODEL_FIELDS = {"architecture": str, "config": dict, "checkpoint": dict}
_ENTRY_FIELDS = {"format": str, "path": str, "precision": str, "status": str, "inputs": list, "outputs": list}
# Entry fields that name a file of the workdir. Every writer records a bare name (``dest.name``):
# no folders. The model record's paths (the checkpoint, held-out images) are inputs read where
# they are, pinned by sha256, and are not the workdir's files.
_FILE_FIELDS = [("path",), ("pending",), ("source",), ("source_onnx",), ("weights", "path"), ("weights", "pending")]


def empty_manifest() -> dict:
    return {"schema": SCHEMA_VERSION, "model": None, "artifacts": []}


def load_manifest(workdir: Path) -> dict:
    """The manifest as it is on disk (an empty one where there is none), validated."""
    path = Path(workdir) / MANIFEST_NAME
    if Path(workdir).exists() and not Path(workdir).is_dir():  # every command reads its workdir's manifest
        raise UserError(f"--workdir {workdir} is a file, not a folder")
    if not path.exists():
        return empty_manifest()
    workdir_file(workdir, MANIFEST_NAME)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: [[[[...
        raise UserError(f"{path} is not valid JSON ({exc}); delete it and export again") from None
    validate(manifest, path)
    return manifest


def validate(manifest, path: Path) -> None:
    """Raise a UserError naming the first field that is not what unet-export writes."""
    fix = "delete it and export again"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list):
        raise UserError(f"{path} is not an unet-export manifest (no 'artifacts' list); {fix}")
    model = manifest.get("model")
    if model is not None:
        _check_fields(model, _MODEL_FIELDS, f"{path}: 'model'", fix)
        if not isinstance(model["checkpoint"].get("sha256"), str):
            raise UserError(f"{path}: 'model.checkpoint.sha256' is missing or not a string; {fix}")
        _check_references(model.get("references"), f"{path}: 'model.references'", fix)
    for i, entry in enumerate(manifest["artifacts"]):
        _check_fields(entry, _ENTRY_FIELDS, f"{path}: artifacts[{i}]", fix)
        _check_file_names(entry, f"{path}: artifacts[{i}]", fix)


def _check_references(record, where: str, fix: str) -> None:
    """The model's recorded references (workdir/references.py): a plain file name of the workdir,
    its sha256, and the inputs each by its samples' sha256."""
    if record is None:
        return
    def samples(item) -> bool:
        return isinstance(item, dict) and isinstance(item.get("samples"), list) and \
            all(isinstance(key, str) for key in item["samples"])

    if not (isinstance(record, dict) and is_file_name(record.get("path")) and isinstance(record.get("sha256"), str)
            and isinstance(record.get("inputs"), list) and all(samples(item) for item in record["inputs"])):  # fmt: skip
        raise UserError(f"{where} is not {{path: a file name inside the workdir, sha256, inputs}}; {fix}")


def _check_fields(record, fields: dict, where: str, fix: str) -> None:
    if not isinstance(record, dict):
        raise UserError(f"{where} is a {type(record).__name__}, not an object; {fix}")
    for name, kind in fields.items():
        if not isinstance(record.get(name), kind):
            found = "missing" if name not in record else f"a {type(record[name]).__name__}"
            raise UserError(f"{where}.{name} is {found}, expected a {kind.__name__}; {fix}")


def _check_file_names(entry: dict, where: str, fix: str) -> None:
    """Every field naming a workdir file holds a plain file name: never a path that leaves the
    workdir (``../x``, ``/etc/x``), a folder, an empty name or a NUL."""
    weights = entry.get("weights")
    if weights is not None and not (isinstance(weights, dict) and "path" in weights):
        raise UserError(f"{where}.weights is not an object with a 'path'; {fix}")
    for keys in _FILE_FIELDS:
        record = entry if len(keys) == 1 else entry.get(keys[0]) or {}
        if keys[-1] not in record or (record[keys[-1]] is None and keys[-1] != "path"):  # null: no redo record
            continue
        if not is_file_name(name := record[keys[-1]]):
            raise UserError(f"{where}.{'.'.join(keys)} {name!r} is not a file name inside the workdir; {fix}")


def is_file_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def workdir_file(workdir: Path, name: str) -> Path:
    """``workdir/name``, refused when it is a link that leads out of the workdir (checked where a
    command opens or moves the file: a link made after the manifest was read counts too)."""
    if not is_file_name(name):
        raise UserError(f"{name!r} is not a file name inside the workdir {workdir}")
    path = Path(workdir) / name
    if not path.is_symlink():
        return path
    try:
        target, root = path.resolve(), Path(workdir).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a link loop (Python < 3.13)
        raise IntegrityError(f"{path} is a link that cannot be followed ({exc}); replace it with the file") from None
    if not target.is_relative_to(root) or target == root:
        raise IntegrityError(f"{path} is a link to {target}, outside the workdir: a workdir holds its files itself; "
                             f"replace the link with the file")  # fmt: skip
    return path


def save_manifest(workdir: Path, manifest: dict) -> None:
    write_json(Path(workdir) / MANIFEST_NAME, manifest)


def make_workdir(workdir: Path) -> None:
    """mkdir -p, naming a file that stands in the way (mkdir itself only says "File exists")."""
    workdir = Path(workdir)
    for folder in (workdir, *workdir.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                where = "" if folder == workdir else f": {folder}"
                raise UserError(f"--workdir {workdir}{where} is a file, not a folder")
            break
    workdir.mkdir(parents=True, exist_ok=True)


@contextmanager
def transaction(workdir: Path) -> Iterator[dict]:
    """Lock the workdir's manifest, finish any publish a killed process left half done, sweep
    dead processes' temp files, yield the manifest, and save it when the block succeeds."""
    workdir = Path(workdir)
    make_workdir(workdir)
    lock = _open_lock(workdir)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = load_manifest(workdir)
        if _recover(workdir, manifest):
            save_manifest(workdir, manifest)
        sweep_stale_temps(workdir)
        yield manifest
        # Counts committed changes, so a command can tell whether another one landed meanwhile.
        manifest["revision"] = manifest.get("revision", 0) + 1
        save_manifest(workdir, manifest)
    finally:
        os.close(lock)  # releases the flock


def _open_lock(workdir: Path) -> int:
    """The lock file's descriptor, created if need be but never through a link: a linked lock
    would create or open a file outside the workdir."""
    path = workdir / LOCK_NAME
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UserError(f"{path} is a symbolic link; a workdir's lock is its own file: delete the link") from None


def _recover(workdir: Path, manifest: dict) -> bool:
    """Redo the rename of every entry still marked pending (its writer died after the manifest
    was saved); returns whether anything changed. Every name is checked before anything moves."""
    redo = [(entry, entry.pop("pending", None)) for entry in manifest["artifacts"]]
    moves = [(workdir_file(workdir, pending), workdir_file(workdir, entry["path"]), entry)
             for entry, pending in redo if pending is not None]  # fmt: skip
    for staged, dest, entry in moves:
        if staged.is_file() and sha256_file(staged) == entry.get("sha256"):
            os.replace(staged, dest)
    return bool(moves)


def publish(workdir: Path, manifest: dict, entry: dict, staged: Path) -> None:
    """Inside ``transaction``: move the verified file ``staged`` to its name and record ``entry``
    (which carries its sha256), with a redo record in between (see the module docstring)."""
    _fault_point("before-publish")
    upsert_artifact(manifest, entry | {"pending": Path(staged).name})
    save_manifest(workdir, manifest)
    _fault_point("before-rename")
    os.replace(staged, Path(workdir) / entry["path"])
    upsert_artifact(manifest, entry)


def _fault_point(name: str) -> None:
    """Crash tests: UNET_EXPORT_KILL_AT=<name> kills this process here with SIGKILL, as a power cut
    or an OOM kill would, to prove a crash at this point leaves a consistent workdir."""
    if os.environ.get("UNET_EXPORT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def set_model(manifest: dict, record: dict) -> int:
    """Record the model; returns how many entries of a previous model were dropped."""
    old = manifest.get("model") or {}
    dropped = 0
    if old.get("checkpoint", {}).get("sha256") != record["checkpoint"]["sha256"]:
        dropped = len(manifest["artifacts"])
        manifest["artifacts"] = []
    elif "references" in old:  # the kept artefacts' recorded references (workdir/references.py)
        record = record | {"references": old["references"]}
    manifest["model"] = record
    return dropped


def upsert_artifact(manifest: dict, entry: dict) -> None:
    key = (entry["format"], entry["precision"])
    kept = [a for a in manifest["artifacts"] if (a["format"], a["precision"]) != key]
    manifest["artifacts"] = kept + [entry]


def find_artifacts(manifest: dict, fmt: str | None = None) -> list[dict]:
    return [a for a in manifest["artifacts"] if fmt is None or a["format"] == fmt]


def checked_path(workdir: Path, entry: dict) -> Path:
    """The artefact's path, if the file is there, in the workdir, and is the one that was verified (sha256)."""
    path = workdir_file(workdir, entry["path"])
    if not path.is_file():
        raise IntegrityError(f"{path} is in {MANIFEST_NAME} but missing on disk; export it again")
    if "sha256" not in entry:  # manifests written before sizes and hashes were recorded
        return path
    if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry["sha256"]:
        raise IntegrityError(f"{path} changed since it was verified (its sha256 is not the one in {MANIFEST_NAME}); "
                             f"export it again")  # fmt: skip
    return path


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
