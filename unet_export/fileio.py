"""Atomic writes, hashing, free space and stale temp files: no half-written artefact is ever left
where a user looks, and none that a dead process left behind survives the next run."""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from unet_export.errors import UserError

# Temp files are ".<stem>.<pid>.tmp<suffix>": the real suffix stays last (AOTInductor's .pt2
# writer checks it), and the pid tells a sweep whether the writer is still alive.
_TEMP = re.compile(r"^\..+\.(\d+)\.tmp(\.[^.]+)*$")
# A disk full, a read-only mount, a path that is a file: the user's environment, not a bug.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                      errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENOENT, errno.ENAMETOOLONG}  # fmt: skip


def temp_path(dest: Path) -> Path:
    dest = Path(dest)
    return dest.with_name(f".{dest.stem}.{os.getpid()}.tmp{dest.suffix}")


def claim_temp_path(dest: Path) -> Path:
    """``temp_path(dest)``, with whatever is already at that name removed: this process has not
    written it yet, so it is a dead process's leftover, or a link planted in a workdir that a
    writer would follow out of it."""
    tmp = temp_path(dest)
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    return tmp


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` (its folder created if need be, as for a report in
    a new `reports/`); rename it into place only if the block succeeds. An error names ``dest``,
    never the hidden temp file, also one from write() or fsync() (ENOSPC, EFBIG), which names none."""
    dest = Path(dest)
    tmp = temp_path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        claim_temp_path(dest)
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        if exc.filename in (None, str(tmp)):
            exc.filename = str(dest)
        raise
    finally:
        with contextlib.suppress(OSError):  # never mask the real error (e.g. ENOTDIR) with the cleanup's
            tmp.unlink(missing_ok=True)


def fsync_file(path: Path) -> None:
    """Flush a finished file to disk before it is renamed over the old one (a crash after the
    rename must never leave an empty file under the real name)."""
    if Path(path).is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(dest: Path, data) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def loads_json(text: str):
    """json.loads, where a document nested deeper than the parser can follow (`[` x 200000 raises
    RecursionError) is malformed JSON like any other: a JSONDecodeError, which callers handle."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to parse", text[:1], 0) from None


def write_bytes_checked(dest: Path, payload: bytes) -> None:
    """Write bytes from Python, where a full disk is an OSError; some C++ writers abort instead."""
    with open(dest, "wb") as fh:
        fh.write(payload)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_stale_temps(directory: Path) -> list[Path]:
    """Delete temp files whose writer is dead (killed mid-write); returns what was removed."""
    removed = []
    if not Path(directory).is_dir():
        return removed
    for path in Path(directory).iterdir():
        match = _TEMP.match(path.name)
        if match and path.is_file() and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def ensure_free_space(directory: Path, need_bytes: int, what: str) -> None:
    """Refuse before writing when ``directory``'s disk cannot hold ``need_bytes`` (plus a margin)."""
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise UserError(f"not enough free space in {directory} for {what}: about {need_bytes / 1e6:.0f} MB needed, "
                        f"{free / 1e6:.0f} MB free")  # fmt: skip


def environment_error(exc: BaseException) -> OSError | None:
    """The disk-full/read-only OSError behind a wrapped exception (Inductor wraps its own), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def os_error_message(exc: OSError) -> str:
    """One line for an environment error, naming the path it hit."""
    where = exc.filename or "a file"
    if exc.filename2:
        where = f"{where} -> {exc.filename2}"
    return f"cannot write or read {where}: {exc.strerror or exc}"


def decode_metadata(metadata: dict) -> dict:
    """The inverse of an exported model's metadata encoding (export.onnx.metadata_json): JSON
    strings back to values; plain strings (the architecture's name) and values already decoded
    stay as they are. Here, in a module without torch, so that reading a model's record does not
    load torch."""
    decoded = {}
    for key, value in metadata.items():
        try:
            decoded[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            decoded[key] = value
    return decoded
