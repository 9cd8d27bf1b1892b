"""`--json PATH`, `--report PATH.html` and `--junit PATH.xml` for every command that judges
something: the options, and the block that writes the result document (unet_export/flows/results.py)
when the command ends, however it ends, with the HTML and JUnit reports made from that same
document (unet_export/report) and, where GITHUB_STEP_SUMMARY names a file, the job summary.

Written temp + rename (never half a file), also on exit 1 (a failed gate is the result CI wants)
and on exit 2/3 (the document then carries ``error``, the line printed on stderr, and whatever
results were reached): a file at PATH always describes the latest run that got past option
parsing. A PATH that cannot be written is refused (exit 2) before any work starts.
"""

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator

import typer

from unet_export.cli.common import exit_status
from unet_export.errors import UserError
from unet_export.fileio import write_json
from unet_export.flows.results import artifact_record, check_writable, envelope, finish, with_floor_ratio
from unet_export.api import append_summary, write_html, write_junit
from unet_export.workdir.manifest import load_manifest

JsonOpt = Annotated[
    Path | None,
    typer.Option("--json", metavar="PATH", help="Also write the result as JSON to PATH (schema: docs/json.md), "
                 "also when the command fails."),
]  # fmt: skip


ReportOpt = Annotated[
    Path | None,
    typer.Option("--report", metavar="PATH.html", help="Also write an HTML report to PATH: verdicts, gate numbers "
                 "and pictures of where each artefact's masks differ (docs/reports.md), also when the command fails."),
]  # fmt: skip
JunitOpt = Annotated[
    Path | None,
    typer.Option("--junit", metavar="PATH.xml", help="Also write a JUnit XML report to PATH: a test case per "
                 "artefact and gate check, for CI's test view (docs/reports.md), also when the command fails."),
]  # fmt: skip
SUMMARY = "GITHUB_STEP_SUMMARY"


class Result:
    """The document a command fills while it runs; without --json, --report, --junit or a job
    summary to write, every call does nothing. ``images``: the real images the command was given
    (--data), which the HTML report's pictures use too."""

    def __init__(self, path: Path | None, schema: str, command: str, report: Path | None = None,
                 junit: Path | None = None):  # fmt: skip
        self.path, self.report, self.junit = path, report, junit
        self.active = any(p is not None for p in (path, report, junit)) or bool(os.environ.get(SUMMARY))
        self.doc = envelope(schema, command) if self.active else {}
        self.images: Path | None = None
        self.page: dict = {}  # write_html's options beyond the images: the page's note, pictures made already

    def __setitem__(self, key: str, value) -> None:
        if self.active:
            self.doc[key] = value

    def update(self, values: dict) -> None:
        if self.active:
            self.doc |= values

    def add_export(self, result) -> None:
        """One published artefact (an api.ExportResult), as its manifest entry records it."""
        if self.active:
            self.doc.setdefault("artifacts", []).append(artifact_record(result.entry) | {"seconds": round(result.seconds, 3)})

    def add_verify(self, report) -> None:
        """verify's verdicts (a flows.verify.VerifyReport): this run's status and gate numbers per
        artefact; one that was not judged here (unavailable, not_judged, changed) has no parity."""
        if not self.active:
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
        if not self.active:
            return
        hashes = {}
        if (workdir / "manifest.json").is_file() and report["artifacts"]:
            hashes = {e["path"]: e.get("sha256") for e in load_manifest(workdir)["artifacts"]}
        self.doc |= {"eager": report["eager"], "images": report["images"],
                     "artifacts": [row | {"sha256": hashes.get(row["path"])} for row in report["artifacts"]]}  # fmt: skip


@contextmanager
def json_result(path: Path | None, schema: str, command: str, workdir: Path | None = None, *,
                report: Path | None = None, junit: Path | None = None) -> Iterator[Result]:  # fmt: skip
    """A Result for the command's block, written to ``path`` (and ``report``, ``junit``, the job
    summary) when the block ends: its exit code comes from the typer.Exit it raises, or from the
    error boundary's mapping of its exception."""
    for option, target in (("--json", path), ("--report", report), ("--junit", junit)):
        if target is not None:
            check_writable(target, option)
    result = Result(path, schema, command, report, junit)
    if workdir is not None:
        result["workdir"] = str(workdir)
        result["artifacts"] = []
    try:
        yield result
    except BaseException as exc:
        if result.active and not isinstance(exc, BrokenPipeError):
            code, message = exit_status(exc)
            _write_all(result, finish(result.doc, code, result.doc.pop("error", "") or message))
        raise
    else:
        if result.active:
            _write_all(result, finish(result.doc, 0))


def _write_all(result: Result, doc: dict) -> None:
    """Every output the command was asked for, from the one finished document."""
    outputs = (("--json", result.path, lambda target: write_json(target, doc)),
               ("--junit", result.junit, lambda target: write_junit(doc, target)),
               ("--report", result.report, lambda target: write_html(doc, target, data=result.images, **result.page)))  # fmt: skip
    written = []
    for option, target, write in outputs:
        if target is None:
            continue
        try:
            write(target)
        except OSError as exc:  # checked writable at the start; the disk filled up or it changed since
            raise UserError(f"cannot write {option} {target}: {exc.strerror or exc}") from None
        written.append(target)
    append_summary(doc, written)
