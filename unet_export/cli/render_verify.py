"""What the verify family prints: verify's parity tables and verdicts, evaluate's Dice table,
cpp-check's C++ table."""

from rich.markup import escape
from rich.table import Table

from unet_export.cli.common import console
from unet_export.cli.render import cell, parity_table, whole_column, x_floor
from unet_export.text import counted


VERIFY_STYLE = {"verified": "green", "failed": "red", "changed": "red", "missing": "red", "unavailable": "yellow",
                "not_judged": "yellow", "unreferenced": "red"}


def verify_report(report) -> None:
    """`unet-export verify`: each artefact's parity table, then one line per artefact."""
    host = report.host
    console.print(f"[bold]verify[/] {report.workdir} on {host['host']} ({host['device']}: {host['device_name']}), "
                  f"inputs: {escape(report.inputs)}")  # fmt: skip
    for v in report.verdicts:
        if v.parity is not None and v.parity.cases:
            console.print(parity_table(v.parity))
        if v.envelope is not None:
            proven = "[green]proven[/]" if v.envelope["proven"] else "[red]not proven[/]"
            console.print(f"envelope of {v.path}: {v.envelope['describe']}: {proven} here "
                          f"at {counted(len(v.envelope['checked']), 'shape')}")  # fmt: skip
    table = Table(title="Verdicts", title_justify="left")
    table.add_column("artefact", overflow="fold")  # a path: wraps whole, never cut
    whole_column(table, "precision", [v.precision for v in report.verdicts])
    whole_column(table, "status", [v.status for v in report.verdicts])
    table.add_column("worst x floor", justify="right", overflow="fold")
    table.add_column("detail", overflow="fold")
    for v in report.verdicts:
        cases = v.parity.cases if v.parity is not None else []  # a report is falsy when it failed
        ratios = [c.floor_ratio for c in cases if c.floor_ratio is not None]
        detail = "; ".join(v.parity.failures()) if v.parity is not None and not v.parity.passed else v.reason
        table.add_row(f"{v.format} ({v.path})", v.precision, f"[{VERIFY_STYLE[v.status]}]{v.status}[/]",
                      x_floor(max(ratios)) if ratios else "-", escape(detail))  # fmt: skip
    console.print(table)
    if any(v.parity is not None for v in report.verdicts):
        console.print(f"verdicts recorded in {report.workdir / 'manifest.json'}")


def dice_table(report: dict, data) -> Table:
    """`evaluate`'s report: eager and every artefact, Dice against ground truth side by side."""
    title = f"Dice on {data} ({counted(report['images'], 'image')}, milesial's definition)"
    table = Table(title=title, title_justify="left")
    table.add_column("model", overflow="fold")
    whole_column(table, "precision", ["fp32"] + [a["precision"] for a in report["artifacts"]])
    table.add_column("Dice", justify="right")
    table.add_column("vs eager", justify="right")
    table.add_column("status", overflow="fold")  # a status word, or the reason there is no Dice
    table.add_row("eager", "fp32", f"{report['eager']['dice']:.4f}", "-", "ok")
    for a in report["artifacts"]:
        dice = "-" if a["dice"] is None else f"{a['dice']:.4f}"
        delta = "-" if a["delta_vs_eager"] is None else f"{a['delta_vs_eager']:+.4f}"
        table.add_row(f"{a['format']} ({a['path']})", a["precision"], dice, delta, a.get("reason") or a["status"])
    return table


def cpp_table(rows: list[dict]) -> Table:
    """`cpp-check`: each artefact run from C++ against the eager model in Python."""
    table = Table(title="C++ (examples/cpp, libtorch) vs eager fp32 in Python", title_justify="left")
    for column in ("artefact", "C++ mean ms", "C++ min ms", "max |err|", "class diff", "result"):
        table.add_column(column, justify="left" if column in ("artefact", "result") else "right")
    for row in rows:
        case = row.get("case")
        status = {"ok": "[green]pass[/]", "parity_failed": "[red]FAIL[/]"}.get(row["status"], row.get("reason", ""))
        table.add_row(f"{row['format']} ({row['path']})", cell(row.get("mean_ms"), ".1f"), cell(row.get("min_ms"), ".1f"),
                      f"{case.max_abs_err:.2e}" if case else "-", f"{case.argmax_disagreement:.4%}" if case else "-",
                      status)  # fmt: skip
    return table
