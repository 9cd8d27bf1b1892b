"""What unet-bench (and demo's benchmark) prints: a line per backend as it finishes, the table
that fits the log (one per --mode: latency, throughput), its Markdown, and the artefacts exported first."""

from pathlib import Path

from rich.table import Table

from unet_export.bench.stats import Throughput
from unet_export.cli.common import console
from unet_export.cli.render import FittedTable, cell, gate_rule, whole_column, x_floor


BENCH_COLUMNS = ("backend", "precision", "status", "img/s", "mean ms", "p50 ms", "p99 ms", "CV", "speed-up",
                 "peak MB", "max abs err", "err vs f64", "x floor", "class diff", "Dice vs eager")  # fmt: skip
THROUGHPUT_COLUMNS = ("backend", "precision", "status", "img/s", "p50 ms", "p90 ms", "p99 ms", "streams", "speed-up",
                      "vs latency", "peak MB", "max abs err", "err vs f64", "x floor", "class diff",
                      "Dice vs eager")  # fmt: skip
STATUS_STYLE = {"ok": "green", "parity_failed": "red", "error": "red", "unavailable": "yellow", "not_judged": "yellow"}


def bench_cells(row) -> list[str]:
    """``max abs err`` is against eager fp32, ``err vs f64`` against the float64 model, ``x floor``
    the latter in units of eager fp32's own error against float64 (the eager row shows the floor)."""
    lat = row.latency_ms or {}
    return [
        row.backend, row.precision, row.status, cell(row.img_per_s, ".2f"), cell(lat.get("mean"), ".1f"),
        cell(lat.get("p50"), ".1f"), cell(lat.get("p99"), ".1f"), cell(row.cv, ".1%"), _times(row.speedup_vs_eager),
        cell(row.peak_mem_mb, ".0f"), *_parity_cells(row.parity),
    ]  # fmt: skip


def throughput_cells(row) -> list[str]:
    """THROUGHPUT_COLUMNS: the row's throughput-mode run; its parity is the gate on the stream's
    output farthest from eager's."""
    fast = row.throughput or Throughput(streams=None, setting="")
    lat = fast.latency_ms or {}
    return [
        row.backend, row.precision, row.status, cell(fast.img_per_s, ".2f"), cell(lat.get("p50"), ".1f"),
        cell(lat.get("p90"), ".1f"), cell(lat.get("p99"), ".1f"), cell(fast.streams, "d"),
        _times(fast.speedup_vs_eager), _times(fast.vs_latency), cell(fast.peak_mem_mb, ".0f"),
        *_parity_cells(fast.parity),
    ]  # fmt: skip


def _times(ratio) -> str:
    return cell(ratio, ".2f") + ("x" if ratio else "")


def _parity_cells(parity: dict | None) -> list[str]:
    """max abs err, err vs f64, x floor, class diff, Dice vs eager."""
    parity = parity or {}
    err64, floor = parity.get("max_err_fp64"), parity.get("noise_floor")
    return [
        cell(parity.get("max_abs_err"), ".1e"), cell(err64, ".1e"),
        x_floor(err64 / floor if err64 is not None and floor else None), cell(parity.get("argmax_disagreement"), ".3%"),
        cell(parity.get("dice_vs_eager"), ".5f"),
    ]  # fmt: skip


def row_line(row) -> str:
    """One progress line as each backend finishes."""
    style = STATUS_STYLE[row.status]
    speed = f"{row.img_per_s:.2f} img/s" if row.img_per_s else ""
    if row.throughput and row.throughput.img_per_s:
        speed = f"{speed}, " if speed else ""
        speed += f"{row.throughput.img_per_s:.2f} img/s streamed ({row.throughput.setting})"
    detail = f" ({row.reason})" if row.reason else ""
    where = f" on {row.runs_on}" if row.runs_on else ""
    return f"[{style}]{row.status:>13}[/] {row.backend:<20} {speed}{where}{detail}"


# Left out first when a narrow log cannot hold every column: spread and memory before speed and error.
BENCH_OPTIONAL = ("CV", "peak MB", "p50 ms", "mean ms", "max abs err", "class diff", "x floor")


THROUGHPUT_OPTIONAL = ("peak MB", "p90 ms", "p50 ms", "max abs err", "class diff", "x floor", "vs latency")


def mode_of(report) -> str:
    return report.config.get("mode", "latency")


def bench_tables(report) -> list[FittedTable]:
    """The tables of the run's --mode: latency, throughput, or both (latency first)."""
    mode = mode_of(report)
    tables = [bench_table(report)] if mode != "throughput" else []
    if mode != "latency":
        tables.append(FittedTable(lambda dropped: _throughput_table(report, dropped), THROUGHPUT_OPTIONAL))
    return tables


def bench_table(report) -> FittedTable:
    return FittedTable(lambda dropped: _bench_table(report, dropped), BENCH_OPTIONAL)


def _bench_table(report, dropped=()) -> Table:
    cfg, dev = report.config, report.device
    title = (f"unet-bench: {dev['name']} ({dev['type']}), batch {cfg['batch']} x {cfg['height']}x{cfg['width']} "
             f"({cfg['inputs']}), speed-up vs eager fp32 in the same run")  # fmt: skip
    notes = [f"{row.backend}: {warning}" for row in report.rows for warning in row.warnings]
    floor = _floor_caption(report, [row.parity for row in report.rows])
    return _table(report, BENCH_COLUMNS, bench_cells, title, [floor, *notes], dropped)


def _throughput_table(report, dropped=()) -> Table:
    cfg, dev = report.config, report.device
    title = (f"unet-bench throughput mode: {dev['name']} ({dev['type']}), batch {cfg['batch']} x {cfg['height']}x"
             f"{cfg['width']} streamed as each runtime runs a stream fastest; latency per batch under that load, "
             f"speed-up vs eager's throughput")  # fmt: skip
    if mode_of(report) != "both":
        dropped = [*dropped, "vs latency"]  # no latency run to compare with
    floor = _floor_caption(report, [row.throughput.parity for row in report.rows if row.throughput])
    return _table(report, THROUGHPUT_COLUMNS, throughput_cells, title, [floor, *_settings(report)], dropped)


def _table(report, columns, cells_of, title: str, notes: list[str], dropped) -> Table:
    table = Table(title=title, title_justify="left")
    keep = [i for i, column in enumerate(columns) if column not in dropped]
    cells = [cells_of(row) for row in report.rows]
    for i in keep:
        # names, status words and numbers whole; a narrow log loses optional columns instead (FittedTable)
        whole_column(table, columns[i], [c[i] for c in cells], justify="left" if i < 3 else "right")
    for row, row_cells in zip(report.rows, cells):
        row_cells[2] = f"[{STATUS_STYLE[row.status]}]{row_cells[2]}[/]"
        table.add_row(*(row_cells[i] for i in keep))
    table.caption = "\n".join(note for note in notes if note)
    return table


def _settings(report) -> list[str]:
    """What each row's throughput run was (the number of streams alone says too little)."""
    return [f"{row.backend}: {row.throughput.setting}" for row in report.rows if row.throughput]


def _floor_caption(report, records: list[dict | None]) -> str:
    """The noise floor and the FP32 rule, from the rows' parity ``records`` of the table's mode."""
    floors = (parity.get("noise_floor") for parity in records if parity)
    floor = next((f for f in floors if f is not None), None)
    if floor is None:
        return ""
    limits = report.config.get("tolerances", {}).get("fp32") or {}
    return (f"noise floor (eager fp32 vs float64 on this batch) {floor:.1e}; fp32 rows: "
            f"{gate_rule(limits, 'fp32')}")  # fmt: skip


def bench_markdown(report) -> str:
    dev, cfg, mode = report.device, report.config, mode_of(report)
    lines = [
        f"Device: {dev['name']} ({dev['type']}); batch {cfg['batch']} x {cfg['height']}x{cfg['width']}; "
        f"torch {report.versions.get('torch')}",
    ]
    if mode != "throughput":
        lines += ["", *_markdown_table(BENCH_COLUMNS, bench_cells, report.rows)]
    if mode != "latency":
        dropped = () if mode == "both" else ("vs latency",)
        lines += ["", "Throughput mode (batches streamed as each runtime runs a stream fastest; latency per batch "
                  "under that load):", "", *_markdown_table(THROUGHPUT_COLUMNS, throughput_cells, report.rows, dropped)]  # fmt: skip
    reasons = [f"- {row.backend}: runs on {row.runs_on}" for row in report.rows if row.runs_on]
    reasons += [f"- {row.backend}: throughput mode: {row.throughput.setting}" for row in report.rows if row.throughput]
    reasons += [f"- {row.backend}: {row.reason}" for row in report.rows if row.reason]
    return "\n".join(lines + ([""] + reasons if reasons else []))


def _markdown_table(columns, cells_of, rows, dropped=()) -> list[str]:
    keep = [i for i, column in enumerate(columns) if column not in dropped]
    lines = ["| " + " | ".join(columns[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    for row in rows:
        row_cells = cells_of(row)
        lines.append("| " + " | ".join(row_cells[i] for i in keep) + " |")
    return lines


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
