"""`--json PATH` for every command that judges something: the option, and the block that writes
the result document (unet_export/flows/results.py) when the command ends, however it ends.

Written temp + rename (never half a file), also on exit 1 (a failed gate is the result CI wants)
and on exit 2/3 (the document then carries ``error``, the line printed on stderr, and whatever
results were reached): a file at PATH always describes the latest run that got past option
parsing. A PATH that cannot be written is refused (exit 2) before any work starts.
"""

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator

import typer

from unet_export.cli.common import exit_status
from unet_export.errors import UserError
from unet_export.fileio import write_json
from unet_export.flows.results import artifact_record, check_writable, envelope, finish, with_floor_ratio
from unet_export.workdir.manifest import load_manifest

JsonOpt = Annotated[
    Path | None,
    typer.Option("--json", metavar="PATH", help="Also write the result as JSON to PATH (schema: docs/json.md), "
                 "also when the command fails."),
]  # fmt: skip


class Result:
    """The document a command fills while it runs; without --json every call does nothing."""

    def __init__(self, path: Path | None, schema: str, command: str):
        self.path = path
        self.doc = envelope(schema, command) if path is not None else {}

    def __setitem__(self, key: str, value) -> None:
        if self.path is not None:
            self.doc[key] = value

    def update(self, values: dict) -> None:
        if self.path is not None:
            self.doc |= values

    def add_export(self, result) -> None:
        """One published artefact (an api.ExportResult), as its manifest entry records it."""
        if self.path is not None:
            self.doc.setdefault("artifacts", []).append(artifact_record(result.entry) | {"seconds": round(result.seconds, 3)})

    def add_verify(self, report) -> None:
        """verify's verdicts (a flows.verify.VerifyReport): this run's status and gate numbers per
        artefact; one that was not judged here (unavailable, not_judged, changed) has no parity."""
        if self.path is None:
            return
        entries = {(e["format"], e["precision"]): e for e in load_manifest(report.workdir)["artifacts"]}
        self.doc["inputs"], self.doc["device"] = report.inputs, report.host["device"]
        for v in report.verdicts:
            entry = entries.get((v.format, v.precision), {}) | {"format": v.format, "precision": v.precision,
                                                                 "path": v.path, "sha256": v.sha256}  # fmt: skip
            parity = v.parity.to_dict() | {"device": report.host["device"]} if v.parity is not None else None
            self.doc["artifacts"].append(artifact_record(entry, status=v.status, reason=v.reason) |
                                         {"parity": with_floor_ratio(parity)})  # fmt: skip

    def add_evaluate(self, report: dict, workdir: Path) -> None:
        """evaluate's report as it always was (eager, images, artifacts), each artefact row with
        its file's sha256 from the manifest."""
        if self.path is None:
            return
        hashes = {}
        if (workdir / "manifest.json").is_file() and report["artifacts"]:
            hashes = {e["path"]: e.get("sha256") for e in load_manifest(workdir)["artifacts"]}
        self.doc |= {"eager": report["eager"], "images": report["images"],
                     "artifacts": [row | {"sha256": hashes.get(row["path"])} for row in report["artifacts"]]}  # fmt: skip


@contextmanager
def json_result(path: Path | None, schema: str, command: str, workdir: Path | None = None) -> Iterator[Result]:
    """A Result for the command's block, written to ``path`` when the block ends: its exit code
    comes from the typer.Exit it raises, or from the error boundary's mapping of its exception."""
    if path is not None:
        check_writable(path)
    result = Result(path, schema, command)
    if workdir is not None:
        result["workdir"] = str(workdir)
        result["artifacts"] = []
    try:
        yield result
    except BaseException as exc:
        if path is not None and not isinstance(exc, BrokenPipeError):
            code, message = exit_status(exc)
            _write(path, finish(result.doc, code, result.doc.pop("error", "") or message))
        raise
    else:
        if path is not None:
            _write(path, finish(result.doc, 0))


def _write(path: Path, doc: dict) -> None:
    try:
        write_json(path, doc)
    except OSError as exc:  # checked writable at the start; the disk filled up or it changed since
        raise UserError(f"cannot write --json {path}: {exc.strerror or exc}") from None

