"""Rich rendering of library results; no logic beyond formatting."""

from rich.markup import escape
from rich.table import Table

from unet_export.api import ExportResult
from unet_export.cli.common import console


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def _dims(shape) -> str:
    return "x".join(map(str, shape))


def parity_table(result: ExportResult) -> Table:
    parity = result.parity
    rule = "max abs err <= atol, no class change" if parity.tolerance == "fp32" else "class diff <= 0.1%, Dice >= 0.999"
    table = Table(title=f"Parity vs eager fp32: {parity.runner}, {parity.tolerance} tolerance ({rule})",
                  title_justify="left")  # fmt: skip
    for column in ("input", "max |err|", "mean |err|", "atol", "class diff", "Dice", "result"):
        table.add_column(column, justify="left" if column == "input" else "right")
    for case in parity.cases:
        allowed = f"{case.atol:.1e}" if case.atol is not None else "-"
        differing = f"{case.argmax_disagreement:.4%}"
        if case.tie_pixels:
            differing += f" (+{case.tie_pixels} ties)"
        table.add_row(
            "x".join(map(str, case.shape)), f"{case.max_abs_err:.2e}", f"{case.mean_abs_err:.2e}", allowed,
            differing, f"{case.dice_vs_eager:.6f}", "[green]pass[/]" if case.passed else "[red]FAIL[/]",
        )  # fmt: skip
    return table


def export_report(result: ExportResult, workdir) -> None:
    entry = result.entry
    shape = "static" if not entry["dynamic_axes"] else "dynamic batch/height/width"
    if "profile" in entry:  # a TensorRT engine: what built it, for which GPU, for which shapes
        p = entry["profile"]
        shape = (f"TensorRT {entry['tensorrt_version']}, {entry['gpu']} (sm {entry['compute_capability']}), "
                 f"profile min {_dims(p['min'])} opt {_dims(p['opt'])} max {_dims(p['max'])}")  # fmt: skip
    opset = f", opset {entry['opset']}" if "opset" in entry else ""
    label = f"{entry['format']} {entry['precision']}"
    console.print(f"[bold]{label}[/] {result.path} ({_mb(entry['bytes'])}{opset}, {shape})")
    if entry.get("fp32_nodes"):
        console.print(f"kept in FP32: {len(entry['fp32_nodes'])} nodes ({', '.join(entry['fp32_nodes'][:6])})")
    if result.dropped:
        console.print(f"manifest: new checkpoint, {result.dropped} entries of the previous one dropped")
    if result.parity.cases:
        console.print(parity_table(result))
    if result.passed:
        console.print(f"[green]verified[/] in {result.seconds:.1f} s, recorded in {workdir / 'manifest.json'}")
    else:
        for failure in result.parity.failures():
            console.print(f"[red]parity failed[/] {failure}")
        console.print(f"[red]FAILED[/]: {result.path} recorded as failed in {workdir / 'manifest.json'}")


BENCH_COLUMNS = ("backend", "precision", "status", "img/s", "mean ms", "p50 ms", "p99 ms", "CV", "speed-up",
                 "peak MB", "max abs err", "class diff", "Dice vs eager")  # fmt: skip
STATUS_STYLE = {"ok": "green", "parity_failed": "red", "error": "red", "unavailable": "yellow"}


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def bench_cells(row) -> list[str]:
    lat, parity = row.latency_ms or {}, row.parity or {}
    return [
        row.backend, row.precision, row.status, _num(row.img_per_s, ".2f"), _num(lat.get("mean"), ".1f"),
        _num(lat.get("p50"), ".1f"), _num(lat.get("p99"), ".1f"), _num(row.cv, ".1%"),
        _num(row.speedup_vs_eager, ".2f") + ("x" if row.speedup_vs_eager else ""), _num(row.peak_mem_mb, ".0f"),
        _num(parity.get("max_abs_err"), ".1e"), _num(parity.get("argmax_disagreement"), ".3%"),
        _num(parity.get("dice_vs_eager"), ".5f"),
    ]  # fmt: skip


def row_line(row) -> str:
    """One progress line as each backend finishes."""
    style = STATUS_STYLE[row.status]
    speed = f"{row.img_per_s:.2f} img/s" if row.img_per_s else ""
    detail = f" ({row.reason})" if row.reason else ""
    where = f" on {row.runs_on}" if row.runs_on else ""
    return f"[{style}]{row.status:>13}[/] {row.backend:<20} {speed}{where}{detail}"


def bench_table(report) -> Table:
    cfg, dev = report.config, report.device
    title = (f"unet-bench: {dev['name']} ({dev['type']}), batch {cfg['batch']} x {cfg['height']}x{cfg['width']} "
             f"({cfg['inputs']}), speed-up vs eager fp32 in the same run")  # fmt: skip
    table = Table(title=title, title_justify="left")
    for column in BENCH_COLUMNS:
        table.add_column(column, justify="left" if column in ("backend", "precision", "status") else "right")
    for row in report.rows:
        cells = bench_cells(row)
        cells[2] = f"[{STATUS_STYLE[row.status]}]{cells[2]}[/]"
        table.add_row(*cells)
    for row in report.rows:
        for warning in row.warnings:
            table.caption = (table.caption + "\n" if table.caption else "") + f"{row.backend}: {warning}"
    return table


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


def dice_table(report: dict, data) -> Table:
    """`evaluate`'s report: eager and every artefact, Dice against ground truth side by side."""
    table = Table(title=f"Dice on {data} ({report['images']} images, milesial's definition)", title_justify="left")
    for column in ("model", "precision", "Dice", "vs eager", "status"):
        table.add_column(column, justify="left" if column in ("model", "precision", "status") else "right")
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
        table.add_row(f"{row['format']} ({row['path']})", _num(row.get("mean_ms"), ".1f"), _num(row.get("min_ms"), ".1f"),
                      f"{case.max_abs_err:.2e}" if case else "-", f"{case.argmax_disagreement:.4%}" if case else "-",
                      status)  # fmt: skip
    return table


DOCTOR_STYLE = {"ok": "green", "warn": "yellow", "missing": "yellow"}


def doctor_table(rows) -> Table:
    """`doctor`: one row per check; a value when ok, else why not and the fix."""
    counts = {status: sum(r.status == status for r in rows) for status in DOCTOR_STYLE}
    caption = ", ".join(f"{n} {status}" for status, n in counts.items())
    table = Table(title="unet-export doctor: what this machine can run", title_justify="left", caption=caption,
                  caption_justify="left")  # fmt: skip
    for column in ("check", "status", "detail"):
        table.add_column(column, overflow="fold")
    for row in rows:
        # escape: install hints such as pip install "unet-export[trt]" would read as Rich markup
        table.add_row(escape(row.name), f"[{DOCTOR_STYLE.get(row.status, 'red')}]{row.status}[/]", escape(row.detail))
    return table
