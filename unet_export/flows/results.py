"""What `--json PATH` writes: one document per run, so CI reads verdicts and gate numbers without
parsing manifest.json or a table (docs/json.md has the schemas and a real example of each).

Every document has the same envelope (``ENVELOPE``): the schema's name and version, when and
where it ran (host, versions, the git commit of the folder it ran in), how long it took, its
exit code and verdict, and the error when it ended with one. The rest is the command's own
(``artifacts`` for export and verify, ``eager``/``artifacts`` for evaluate, ``checks`` for
doctor, ``results`` for unet-bench), in the words the manifest and the bench already use.
"""

import math
import os
import platform
import re
import socket
import time
from pathlib import Path

from unet_export.device import cpu_name
from unet_export.errors import UserError
from unet_export.workdir.manifest import tool_versions, utc_now

SCHEMA_VERSION = 1
SCHEMAS = ("export", "verify", "evaluate", "doctor", "bench", "report")
ENVELOPE = ("schema", "command", "time", "seconds", "host", "versions", "exit_code", "verdict")
ARTIFACT = ("path", "format", "precision", "status", "sha256", "bytes", "parity")
# Every runtime unet-export drives: absent ones are null, so a document says what was not there.
RUNTIMES = ("unet-export", "torch", "onnx", "onnxruntime", "openvino", "tensorrt")
VERDICTS = {0: "passed", 1: "failed"}  # any other exit code: "error" (2 bad input, 3 a bug, 130 interrupted)
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


def schema_name(schema: str) -> str:
    return f"unet-export.{schema}/{SCHEMA_VERSION}"


def envelope(schema: str, command: str) -> dict:
    """The start of a document; ``finish`` completes it."""
    if schema not in SCHEMAS:
        raise ValueError(f"unknown result schema {schema!r}")
    doc = {"schema": schema_name(schema), "command": command, "time": utc_now(), "seconds": None,
           "host": host_record(), "versions": tool_versions(*RUNTIMES) | {"python": platform.python_version()}}  # fmt: skip
    commit = git_commit()
    if commit:
        doc["git_commit"] = commit
    doc["_started"] = time.perf_counter()
    return doc


def finish(doc: dict, exit_code: int, error: str = "") -> dict:
    """The finished document: duration, exit code, verdict, the error if any; JSON-safe."""
    started = doc.pop("_started", None)
    doc["seconds"] = round(time.perf_counter() - started, 3) if started is not None else None
    doc["exit_code"], doc["verdict"] = exit_code, VERDICTS.get(exit_code, "error")
    if error:
        doc["error"] = error
    return json_safe(doc)


def host_record() -> dict:
    """The machine: what bench and doctor already call it (the CPU name from /proc/cpuinfo)."""
    return {"hostname": socket.gethostname(), "cpu": cpu_name(), "os": platform.platform()}


def git_commit(start: Path | None = None) -> str | None:
    """HEAD's commit of the git repository holding ``start`` (the current folder), read from
    .git without running git; None outside a repository or where it cannot be read."""
    try:
        folder = Path(start or Path.cwd()).resolve()
        for candidate in (folder, *folder.parents):
            gitdir = _gitdir(candidate / ".git")
            if gitdir is not None:
                return _head_commit(gitdir)
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _gitdir(dot_git: Path) -> Path | None:
    """A repository's .git folder, or a worktree's/submodule's (.git is then a file naming it)."""
    if dot_git.is_dir():
        return dot_git
    if dot_git.is_file():
        text = dot_git.read_text().strip()
        if text.startswith("gitdir:"):
            return (dot_git.parent / text[len("gitdir:"):].strip()).resolve()
    return None


def _head_commit(gitdir: Path) -> str | None:
    head = (gitdir / "HEAD").read_text().strip()
    if not head.startswith("ref:"):
        return head if _SHA.match(head) else None  # a detached HEAD holds the commit itself
    ref = head[len("ref:"):].strip()
    common = gitdir / "commondir"  # a worktree keeps its branches in the main repository
    common = (gitdir / common.read_text().strip()).resolve() if common.is_file() else gitdir
    for base in (gitdir, common):
        if (base / ref).is_file():
            commit = (base / ref).read_text().strip()
            return commit if _SHA.match(commit) else None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            commit, _, name = line.partition(" ")
            if name == ref and _SHA.match(commit):
                return commit
    return None  # a branch with no commit yet


def artifact_record(entry: dict, *, status: str | None = None, parity: dict | None = None, reason: str = "") -> dict:
    """One artefact as a result: where (relative to the workdir, as the manifest names it), what,
    its verdict and its gate numbers. ``status``/``parity`` replace the entry's (verify's new
    verdict); the parity record is the manifest's, each input with ``floor_ratio`` (x floor)."""
    parity = parity if parity is not None else entry.get("parity")
    record = {"path": entry["path"], "format": entry["format"], "precision": entry["precision"],
              "status": status or entry.get("status"), "sha256": entry.get("sha256"), "bytes": entry.get("bytes"),
              "parity": with_floor_ratio(parity)}  # fmt: skip
    if reason:
        record["reason"] = reason
    # the .bin of an IR; INT8's Dice vs truth; why a TorchScript model was traced, not scripted; the envelope
    for key in ("export_size", "weights", "accuracy", "real_images", "traced", "envelope"):
        if entry.get(key) is not None:
            record[key] = entry[key]
    search = entry.get("fallback") or (entry.get("quantization") or {}).get("search")
    if search:  # --fallback auto: the FP32 layer search (flows/fallback.py)
        record["fallback"] = search
    return record


def with_floor_ratio(parity: dict | None) -> dict | None:
    """The parity record with each input's error against float64 in units of its noise floor (the
    tables' "x floor"), which the manifest leaves to be computed."""
    if not parity:
        return parity
    cases = []
    for case in parity.get("cases", []):
        err, floor = case.get("max_err_fp64"), case.get("noise_floor")
        ratio = err / floor if isinstance(err, (int, float)) and floor else None
        cases.append(case | {"floor_ratio": ratio})
    return parity | {"cases": cases}


def json_safe(value):
    """NaN and infinities (an output with no comparison, an empty batch) as null: strict JSON,
    which jq, JavaScript and every JSON schema validator read."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def check_writable(path: Path, option: str = "--json") -> None:
    """Refuse, before any work, a --json (--report, --junit) PATH that cannot be written: a folder,
    a folder that is a file, or a place this user may not write. Nothing is created here."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{option} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path.parent, os.W_OK)):
        raise UserError(f"{option} {path}: {folder} is not writable")
