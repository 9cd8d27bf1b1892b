"""The job summary: where ``GITHUB_STEP_SUMMARY`` names a file (GitHub Actions sets it for every
step), a command that judges something appends a short Markdown account of its verdict there:
one table row per artefact (or bench row), the reports it wrote linked by name."""

import os
from pathlib import Path

from unet_export.parity.realimages import judged_on_images_only
from unet_export.text import x_floor

MARK = {"verified": "✅", "passed": "✅", "ok": "✅", "failed": "❌", "parity_failed": "❌", "error": "⚠️",
        "changed": "⚠️", "missing": "⚠️", "unreferenced": "⚠️"}  # fmt: skip


def summary_markdown(doc: dict, files: list[Path] | None = None) -> str:
    """The Markdown for ``doc``; ``files``: the reports written beside it (HTML, JUnit, JSON)."""
    code = doc.get("exit_code")
    word = {0: "passed", 1: "failed"}.get(code, "error")
    lines = [f"### {MARK.get(word, '⚠️')} `{doc.get('command', 'unet-export')}` {word} (exit code {code})", ""]
    if doc.get("error"):
        lines += [f"> {_cell(doc['error'])}", ""]
    workdir = doc.get("workdir")
    if doc.get("artifacts"):
        lines += ["| artefact | format | precision | verdict | worst x floor | worst class change |", "|---|---|---|---|---|---|"]
        for art in doc["artifacts"]:
            cases = (art.get("parity") or {}).get("cases") or []
            bounded = not judged_on_images_only(art.get("precision"))  # reduced precision has no error bound
            ratios = [c["floor_ratio"] for c in cases if c.get("floor_ratio") is not None and bounded]
            changes = [c["argmax_disagreement"] for c in cases if c.get("argmax_disagreement") is not None]
            name = f"`{Path(workdir) / art['path'] if workdir else art['path']}`"
            status = art.get("status") or ""
            lines.append(f"| {name} | {art.get('format')} | {art.get('precision')} | {MARK.get(status, '➖')} {status} | "
                         f"{x_floor(max(ratios)) if ratios else '-'} | {f'{max(changes):.4%}' if changes else '-'} |")  # fmt: skip
        lines.append("")
    if doc.get("results"):
        lines += ["| row | img/s | p50 ms | gate |", "|---|---|---|---|"]
        for row in doc["results"]:
            ips = f"{row['img_per_s']:.1f}" if row.get("img_per_s") is not None else "-"
            p50 = f"{row['latency_ms']['p50']:.2f}" if (row.get("latency_ms") or {}).get("p50") is not None else "-"
            lines.append(f"| {row['backend']} {row['precision']} | {ips} | {p50} | {MARK.get(row.get('status'), '➖')} "
                         f"{row.get('status')} |")  # fmt: skip
        lines.append("")
    if files:
        lines += ["Reports: " + ", ".join(f"`{f}`" for f in files), ""]
    run = run_url()
    if run:
        lines += [f"Artefacts uploaded by this run: [{run}#artifacts]({run}#artifacts)", ""]
    return "\n".join(lines) + "\n"


def run_url() -> str:
    """The GitHub Actions run's page (its uploaded artefacts are listed there), from the variables
    GitHub sets in every step; empty elsewhere."""
    parts = [os.environ.get(k, "") for k in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID")]
    return f"{parts[0]}/{parts[1]}/actions/runs/{parts[2]}" if all(parts) else ""


def append_summary(doc: dict, files: list[Path] | None = None) -> Path | None:
    """Append the summary to the file ``GITHUB_STEP_SUMMARY`` names, if it names one; a summary
    that cannot be written is skipped (it is a courtesy to the reader, not a result)."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    try:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(summary_markdown(doc, files))
    except OSError:
        return None
    return Path(target)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
