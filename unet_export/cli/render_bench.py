"""What unet-bench (and demo's benchmark) prints: a line per backend as it finishes, the table
that fits the log, its Markdown, and the artefacts exported first."""

from pathlib import Path

from rich.table import Table

from unet_export.cli.common import console
from unet_export.cli.render import FittedTable, cell, gate_rule, whole_column, x_floor


BENCH_COLUMNS = ("backend", "precision", "status", "img/s", "mean ms", "p50 ms", "p99 ms", "CV", "speed-up",
                 "peak MB", "max abs err", "err vs f64", "x floor", "class diff", "Dice vs eager")  # fmt: skip
STATUS_STYLE = {"ok": "green", "parity_failed": "red", "error": "red", "unavailable": "yellow", "not_judged": "yellow"}


def bench_cells(row) -> list[str]:
    """``max abs err`` is against eager fp32, ``err vs f64`` against the float64 model, ``x floor``
    the latter in units of eager fp32's own error against float64 (the eager row shows the floor)."""
    lat, parity = row.latency_ms or {}, row.parity or {}
    err64, floor = parity.get("max_err_fp64"), parity.get("noise_floor")
    return [
        row.backend, row.precision, row.status, cell(row.img_per_s, ".2f"), cell(lat.get("mean"), ".1f"),
        cell(lat.get("p50"), ".1f"), cell(lat.get("p99"), ".1f"), cell(row.cv, ".1%"),
        cell(row.speedup_vs_eager, ".2f") + ("x" if row.speedup_vs_eager else ""), cell(row.peak_mem_mb, ".0f"),
        cell(parity.get("max_abs_err"), ".1e"), cell(err64, ".1e"),
        x_floor(err64 / floor if err64 is not None and floor else None), cell(parity.get("argmax_disagreement"), ".3%"),
        cell(parity.get("dice_vs_eager"), ".5f"),
    ]  # fmt: skip


def row_line(row) -> str:
    """One progress line as each backend finishes."""
    style = STATUS_STYLE[row.status]
    speed = f"{row.img_per_s:.2f} img/s" if row.img_per_s else ""
    detail = f" ({row.reason})" if row.reason else ""
    where = f" on {row.runs_on}" if row.runs_on else ""
    return f"[{style}]{row.status:>13}[/] {row.backend:<20} {speed}{where}{detail}"


# Left out first when a narrow log cannot hold every column: spread and memory before speed and error.
BENCH_OPTIONAL = ("CV", "peak MB", "p50 ms", "mean ms", "max abs err", "class diff", "x floor")


def bench_table(report) -> FittedTable:
    return FittedTable(lambda dropped: _bench_table(report, dropped), BENCH_OPTIONAL)


def _bench_table(report, dropped=()) -> Table:
    cfg, dev = report.config, report.device
    title = (f"unet-bench: {dev['name']} ({dev['type']}), batch {cfg['batch']} x {cfg['height']}x{cfg['width']} "
             f"({cfg['inputs']}), speed-up vs eager fp32 in the same run")  # fmt: skip
    table = Table(title=title, title_justify="left")
    keep = [i for i, column in enumerate(BENCH_COLUMNS) if column not in dropped]
    cells = [bench_cells(row) for row in report.rows]
    for i in keep:
        column = BENCH_COLUMNS[i]
        # names, status words and numbers whole; a narrow log loses optional columns instead (FittedTable)
        whole_column(table, column, [c[i] for c in cells], justify="left" if i < 3 else "right")
    for row, row_cells in zip(report.rows, cells):
        row_cells[2] = f"[{STATUS_STYLE[row.status]}]{row_cells[2]}[/]"
        table.add_row(*(row_cells[i] for i in keep))
    table.caption = _floor_caption(report)
    for row in report.rows:
        for warning in row.warnings:
            table.caption = (table.caption + "\n" if table.caption else "") + f"{row.backend}: {warning}"
    return table


def _floor_caption(report) -> str:
    floors = (r.parity.get("noise_floor") for r in report.rows if r.parity)
    floor = next((f for f in floors if f is not None), None)
    if floor is None:
        return ""
    limits = report.config.get("tolerances", {}).get("fp32") or {}
    return (f"noise floor (eager fp32 vs float64 on this batch) {floor:.1e}; fp32 rows: "
            f"{gate_rule(limits, 'fp32')}")  # fmt: skip


def bench_markdown(report) -> str:
    dev, cfg = report.device, report.config
    lines = [
        f"Device: {dev['name']} ({dev['type']}); batch {cfg['batch']} x {cfg['height']}x{cfg['width']}; "
        f"torch {report.versions.get('torch')}",
        "",
        "| " + " | ".join(BENCH_COLUMNS) + " |",
        "|" + "---|" * len(BENCH_COLUMNS),
    ]
    lines += ["| " + " | ".join(bench_cells(row)) + " |" for row in report.rows]
    reasons = [f"- {row.backend}: runs on {row.runs_on}" for row in report.rows if row.runs_on]
    reasons += [f"- {row.backend}: {row.reason}" for row in report.rows if row.reason]
    return "\n".join(lines + ([""] + reasons if reasons else []))


def export_line(result) -> None:
    """One line per artefact exported before the benchmark (the export commands print a table)."""
    verdict = "[green]verified[/]" if result.passed else f"[red]FAILED[/] ({'; '.join(result.parity.failures()[:2])})"
    console.print(f"exported {result.path} ({result.entry['format']} {result.entry['precision']}): {verdict} "
                  f"in {result.seconds:.1f} s")  # fmt: skip


def prepared_lines(prepared, workdir: Path) -> None:
    if prepared.reused:
        names = ", ".join(entry["path"] for entry in prepared.reused)
        console.print(f"reused from {workdir}/manifest.json (verified from this checkpoint): {names}")
    if prepared.skipped:
        console.print(f"not exported here: {'; '.join(prepared.skipped)}")
