"""Writing the reports of a run: `--report PATH.html`, `--junit PATH.xml` and the job summary, all
from the command's result document (the one `--json` writes), so the four can never disagree; and
`unet-export report`, the same page for a whole workdir from its manifest.

The HTML's pictures re-run each judged artefact on a few real images (report/pictures.py): the
workdir's manifest gives the full entries and the eager model's checkpoint, ``data`` the images
(else those the manifest records).
"""

from pathlib import Path

from unet_export.checkpoint import build_model
from unet_export.errors import UnetExportError, UserError
from unet_export.fileio import atomic_path
from unet_export.flows.results import artifact_record
from unet_export.flows.verify import integrity_problem
from unet_export.report.html import render_html
from unet_export.report.junit import junit_xml
from unet_export.report.pictures import CANDIDATES, Pictures, workdir_pictures
from unet_export.workdir.lookup import manifest_checkpoint
from unet_export.workdir.manifest import MANIFEST_NAME, load_manifest

# verdicts reached on this artefact's file (evaluate's "ok": scored on it): the ones pictures can show
JUDGED = ("verified", "failed", "ok")


def write_html(doc: dict, path: Path, *, data: str | Path | None = None, model=None, weights=None,
               images: int = CANDIDATES, note: str = "", pictures: dict[str, Pictures] | None = None) -> None:  # fmt: skip
    """The HTML report of ``doc`` at ``path`` (temp + rename), with pictures of every judged
    artefact (``pictures``, else made here on ``images`` real images from ``data``)."""
    manifest = _manifest(doc)
    if pictures is None:
        pictures = _pictures(doc, manifest, data=data, model=model, weights=weights, images=images)
    entries = {e["path"]: e for e in (manifest or {}).get("artifacts", [])}
    page = render_html(doc, model=(manifest or {}).get("model"), entries=entries, pictures=pictures, note=note)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")


def artefact_pictures(doc: dict, *, data: str | Path | None = None, model=None, weights=None,
                      images: int = CANDIDATES) -> dict[str, Pictures]:  # fmt: skip
    """Pictures of each artefact of ``doc`` judged on its file (verified or failed): the workdir's
    manifest gives its full entry and the eager model's checkpoint; the rest say why there are none."""
    return _pictures(doc, _manifest(doc), data=data, model=model, weights=weights, images=images)


def _pictures(doc: dict, manifest: dict | None, *, data, model, weights, images: int) -> dict[str, Pictures]:
    entries = {e["path"]: e for e in (manifest or {}).get("artifacts", [])}
    pictures = {}
    judged = [entries[a["path"]] for a in doc.get("artifacts") or []
              if a.get("status") in JUDGED and _same_file(entries.get(a["path"]), a)]  # fmt: skip
    if judged and manifest.get("model"):
        net, why = _eager(manifest, weights, model)
        try:
            pictures = workdir_pictures(Path(doc["workdir"]), manifest, judged, net, data, why_no_model=why,
                                        candidates=images)  # fmt: skip
        except UnetExportError as exc:  # the images cannot be read as the model's: the page says so, the verdict stands
            pictures = {e["path"]: Pictures(note=f"no pictures: {exc}") for e in judged}
    for art in doc.get("artifacts") or []:
        if art.get("path") not in pictures:
            pictures[art.get("path")] = Pictures(note=f"no pictures: the artefact was not run here ({art.get('status')})")
    return pictures


def hold_against_recheck(artifacts: list[dict], pictures: dict[str, Pictures]) -> None:
    """`unet-export report`: an artefact recorded as verified that fails its gate when re-run here
    on the real images is reported failed (exit 1), with why: the page never shows a verdict the
    pictures beside it contradict, and it agrees with what verify on those images would find."""
    for art in artifacts:
        recheck = art["recheck"] = getattr(pictures.get(art.get("path")), "recheck", None)  # null: not re-run here
        if art.get("status") == "verified" and recheck and not recheck["passed"]:
            art["status"] = "failed"
            art["reason"] = (f"recorded as verified {art.get('judged', '')}, but re-run here on {recheck['images']} real "
                             f"images it fails its gate ({recheck['failures'][0]}): run unet-export verify")  # fmt: skip


def write_junit(doc: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(junit_xml(doc))


def workdir_artifacts(workdir: Path) -> list[dict]:
    """`unet-export report`: every artefact in the workdir as its manifest records it (as --json
    records an artefact): the latest verdict (verify's, where verify ran since the export) and
    its gate numbers. A file that is gone or changed is reported so, as verify reports it."""
    manifest = load_manifest(workdir)
    if not manifest.get("artifacts"):
        raise UserError(f"no artefacts in {workdir}/{MANIFEST_NAME}: run `unet-export onnx WEIGHTS "
                        f"--workdir {workdir}` first")  # fmt: skip
    records = []
    for entry in manifest["artifacts"]:
        latest = entry.get("verified_on") or {}
        record = artifact_record(entry, parity=latest.get("parity"))
        record["judged"] = f"by verify on {latest.get('host')} at {latest.get('time')}" if latest else "at export"
        problem = integrity_problem(entry, workdir)
        if problem is not None:
            record |= {"status": problem[0], "reason": problem[1]}
        records.append(record)
    return records


def workdir_exit_code(artifacts: list[dict]) -> int:
    """As verify's: 2 a file changed or is missing, 1 an artefact failed, 0 all verified."""
    statuses = {a.get("status") for a in artifacts}
    return 2 if statuses & {"changed", "missing"} else 1 if "failed" in statuses else 0


def _manifest(doc: dict) -> dict | None:
    """The manifest of the document's workdir, or None where there is none (or it is unreadable)."""
    workdir = Path(doc["workdir"]) if doc.get("workdir") else None
    if workdir is None or not (workdir / MANIFEST_NAME).is_file():
        return None
    try:
        return load_manifest(workdir)
    except UnetExportError:
        return None


def _same_file(entry: dict | None, artifact: dict) -> bool:
    return entry is not None and entry.get("sha256") == artifact.get("sha256")


def _eager(manifest: dict, weights, model):
    """(the eager model, "") or (None, why it cannot be rebuilt here)."""
    try:
        return build_model(manifest_checkpoint(manifest, weights, model)), ""
    except UnetExportError as exc:
        return None, str(exc)
