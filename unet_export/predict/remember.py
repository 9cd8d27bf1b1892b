"""`predict --runtime auto` remembers what it timed: timing every verified artefact took ~10 s on
every run. The choice is kept in the workdir (CACHE), one record per machine and set of
artefacts, so a second run on the same workdir and machine starts at once, and a workdir on shared
storage keeps one choice per machine.

The file is read as untrusted input: anything that does not match this machine, these exact
artefacts (their manifest sha256, which opening an artefact checks against the file) and this
timing protocol, or is not self-consistent (the runtime named is the fastest of the timings it
records), is ignored and the runtimes are timed again. At worst an edited file names another
verified artefact of the same workdir: slower, never unverified."""

import hashlib
import json
import math
import platform
import time
from pathlib import Path

from unet_export.device import device_info
from unet_export.fileio import loads_json, write_json

CACHE = ".predict-runtime.json"
# What a timing means (predict.choose.per_image_ms): a change to it makes old records foreign.
PROTOCOL = "median of 3 calls at batch 1 and the export size, after one warm-up"
MAX_BYTES = 64 * 1024  # a handful of records; anything larger was not written here
MAX_RECORDS = 8  # machines remembered per workdir


def machine(device) -> dict:
    """This host and the device that ran the timings (CPU model, cores and torch threads; GPU name)."""
    return {"host": platform.node(), **device_info(device)}


def key_of(device, candidates: dict[str, dict]) -> dict:
    """What a remembered choice depends on: the machine, the protocol, each candidate's artefact."""
    artefacts = {label: entry.get("sha256") for label, entry in sorted(candidates.items())}
    return {"machine": machine(device), "protocol": PROTOCOL, "artefacts": artefacts}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def recall(workdir: Path, key: dict) -> dict | None:
    """The record for ``key`` ({"runtime", "ms", "measured"}), or None when there is none that
    can be believed."""
    try:
        path = Path(workdir) / CACHE
        if path.is_symlink() or path.stat().st_size > MAX_BYTES:  # a link may lead out of the workdir
            return None
        data = loads_json(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    record = (data.get("records") or {}).get(_digest(key)) if isinstance(data, dict) else None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    ms, runtime = record.get("ms"), record.get("runtime")
    if not isinstance(ms, dict) or set(ms) != set(key["artefacts"]) or not isinstance(record.get("measured"), str):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in ms.values()):
        return None
    if runtime not in ms or ms[runtime] != min(ms.values()):
        return None
    return record


def remember(workdir: Path, key: dict, runtime: str, ms: dict[str, float]) -> None:
    """Keep the choice (temp + rename). A workdir this user cannot write (read-only artefacts)
    only means the next run times again."""
    path = Path(workdir) / CACHE
    try:
        readable = path.is_file() and not path.is_symlink() and path.stat().st_size <= MAX_BYTES
        data = loads_json(path.read_text()) if readable else {}
    except (OSError, UnicodeDecodeError, ValueError):
        data = {}
    records = data.get("records") if isinstance(data, dict) and isinstance(data.get("records"), dict) else {}
    records = {k: v for k, v in records.items() if isinstance(v, dict)}
    records.pop(_digest(key), None)
    records[_digest(key)] = {"key": key, "runtime": runtime, "ms": {k: round(v, 3) for k, v in ms.items()},
                             "measured": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    kept = dict(list(records.items())[-MAX_RECORDS:])  # the most recent machines
    try:
        write_json(path, {"version": 1, "records": kept})
    except OSError:
        pass
