"""Rich rendering of library results; no logic beyond formatting."""

from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from unet_export.api import ExportResult
from unet_export.cli.common import console
from unet_export.text import counted
from unet_export.parity.gate import ParityReport


def whole_column(table: Table, header: str, cells, **kwargs) -> None:
    """A column whose cells are never cut or wrapped (CI logs are 160 columns wide and `parity_failed`
    read `parity…`): at least as wide as its longest cell and longest header word; only headers wrap."""
    widest = max((Text.from_markup(str(c)).cell_len for c in cells), default=0)
    width = max(widest, *map(len, header.split()))
    # A fixed width: Rich squeezes even no_wrap columns below their min_width when the table is too wide
    # (FittedTable keeps it from being too wide); the header alone wraps between its words.
    words = Text(header, no_wrap=False, overflow="fold")
    table.add_column(words, no_wrap=True, min_width=width, width=width, **kwargs)


class FittedTable:
    """A table built for the width it is printed at: when even its narrowest layout would cut words,
    optional columns are left out (in the order given) until it fits, and the caption says which."""

    def __init__(self, build, optional: tuple[str, ...]):
        self.build, self.optional = build, optional

    def __rich_console__(self, console, options):
        dropped: list[str] = []
        table = self.build(dropped)
        for column in self.optional:
            # measured unbounded: Measurement.get clamps the minimum to the width it is given
            if Measurement.get(console, options.update_width(10_000), table).minimum <= options.max_width:
                break
            dropped.append(column)
            table = self.build(dropped)
        if dropped:
            note = f"left out at {options.max_width} columns: {', '.join(dropped)} (a wider terminal or --markdown shows them)"
            table.caption = f"{table.caption}\n{note}" if table.caption else note
        yield table


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def _dims(shape) -> str:
    return "x".join(map(str, shape))


def gate_rule(limits: dict | None, name: str) -> str:
    """The rule a parity report was judged by, in words."""
    if limits and (limits.get("rtol") is not None or limits.get("atol") is not None):
        return (f"{name} tolerance: max |err vs float64| <= {limits.get('rtol') or 0:g} x noise floor + "
                f"{limits.get('atol') or 0:g} x max(1, |logit|), no class change outside float64 ties")  # fmt: skip
    if limits:
        dice = f", Dice >= {limits['min_dice']:g}" if limits.get("min_dice") is not None else ""
        return f"{name} tolerance: class change vs float64 <= {limits['max_class_change']:.2%} (ties excluded){dice}"
    return f"{name} tolerance"


def _sci(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}e}"


def _times(ratio) -> str:
    """An error in units of the noise floor: 0.79, 1.00, 169, 3.6e+07."""
    if ratio is None:
        return "-"
    return f"{ratio:.2f}" if ratio < 100 else f"{ratio:.0f}" if ratio < 1e5 else f"{ratio:.1e}"


def parity_table(result: ExportResult | ParityReport) -> Table:
    """One row per input: the artefact's error against float64 next to eager fp32's own (the
    noise floor), their ratio, the bound in force, and the decisions."""
    parity = result.parity if isinstance(result, ExportResult) else result
    table = Table(title=f"Parity: {parity.runner}, {gate_rule(parity.limits, parity.tolerance)}", title_justify="left")
    # The input column never shrinks (at 80 columns it was cut to "2x3x2…"): the headers wrap instead.
    widest = max((len(_input_label(case)) for case in parity.cases), default=5)
    table.add_column("input", justify="left", no_wrap=True, min_width=widest)
    for column in ("err vs f64", "noise floor", "x floor", "allowed", "vs eager fp32", "class diff", "Dice", "result"):
        table.add_column(column, justify="right")
    for case in parity.cases:
        differing = f"{case.argmax_disagreement:.4%}"
        if case.tie_pixels:
            differing += f" (+{case.tie_pixels} ties)"
        ratio = case.floor_ratio
        table.add_row(
            _input_label(case), _sci(case.max_err_fp64), _sci(case.noise_floor),
            _times(ratio), _sci(case.atol, 1), _sci(case.max_abs_err), differing,
            f"{case.dice_vs_eager:.6f}", "[green]pass[/]" if case.passed else "[red]FAIL[/]",
        )  # fmt: skip
    return table


def _input_label(case) -> str:
    label = f" {case.label}" if getattr(case, "label", "") and case.label != "seeded" else ""
    return "x".join(map(str, case.shape)) + label


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
        nodes = entry["fp32_nodes"]
        console.print(f"kept in FP32: {counted(len(nodes), 'node')} ({', '.join(nodes[:6])})")
    if result.dropped:
        dropped = counted(result.dropped, "entry", "entries")
        console.print(f"manifest: new checkpoint, {dropped} of the previous one dropped")
    if result.parity.cases:
        console.print(parity_table(result))
    if result.passed:
        console.print(f"[green]verified[/] in {result.seconds:.1f} s, recorded in {workdir / 'manifest.json'}")
    else:
        for failure in result.parity.failures():
            console.print(f"[red]parity failed[/] {failure}")
        console.print(f"[red]FAILED[/]: {result.path} recorded as failed in {workdir / 'manifest.json'}")


BENCH_COLUMNS = ("backend", "precision", "status", "img/s", "mean ms", "p50 ms", "p99 ms", "CV", "speed-up",
                 "peak MB", "max abs err", "err vs f64", "x floor", "class diff", "Dice vs eager")  # fmt: skip
STATUS_STYLE = {"ok": "green", "parity_failed": "red", "error": "red", "unavailable": "yellow", "not_judged": "yellow"}


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def bench_cells(row) -> list[str]:
    """``max abs err`` is against eager fp32, ``err vs f64`` against the float64 model, ``x floor``
    the latter in units of eager fp32's own error against float64 (the eager row shows the floor)."""
    lat, parity = row.latency_ms or {}, row.parity or {}
    err64, floor = parity.get("max_err_fp64"), parity.get("noise_floor")
    return [
        row.backend, row.precision, row.status, _num(row.img_per_s, ".2f"), _num(lat.get("mean"), ".1f"),
        _num(lat.get("p50"), ".1f"), _num(lat.get("p99"), ".1f"), _num(row.cv, ".1%"),
        _num(row.speedup_vs_eager, ".2f") + ("x" if row.speedup_vs_eager else ""), _num(row.peak_mem_mb, ".0f"),
        _num(parity.get("max_abs_err"), ".1e"), _num(err64, ".1e"),
        _times(err64 / floor if err64 is not None and floor else None), _num(parity.get("argmax_disagreement"), ".3%"),
        _num(parity.get("dice_vs_eager"), ".5f"),
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


VERIFY_STYLE = {"verified": "green", "failed": "red", "changed": "red", "missing": "red", "unavailable": "yellow",
                "not_judged": "yellow"}


def verify_report(report) -> None:
    """`unet-export verify`: each artefact's parity table, then one line per artefact."""
    host = report.host
    console.print(f"[bold]verify[/] {report.workdir} on {host['host']} ({host['device']}: {host['device_name']}), "
                  f"inputs: {report.inputs}")  # fmt: skip
    for v in report.verdicts:
        if v.parity is not None and v.parity.cases:
            console.print(parity_table(v.parity))
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
                      _times(max(ratios)) if ratios else "-", escape(detail))  # fmt: skip
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


def _backend_label(config) -> str:
    return f"platform {config.platform}" if config.platform else f"backend {config.backend}"


def triton_repository_report(result) -> None:
    """`triton`: one row per model written, then what the Python model runs and what was left out."""
    table = Table(title=f"Triton repository {result.repo} (written in {result.seconds:.1f} s; every config.pbtxt "
                  f"parsed against ModelConfig and checked)", title_justify="left")  # fmt: skip
    for column in ("model", "serves", "max batch", "instances", "notes"):
        table.add_column(column, justify="right" if column in ("max batch", "instances") else "left")
    for plan in result.plans:
        artifact = plan.record.get("artifact")
        source = f"{artifact['path']} ({artifact['format']} {artifact['precision']})" if artifact else "-"
        instances = sum(g.count for g in plan.config.instance_group) or "-"
        table.add_row(plan.name, f"{_backend_label(plan.config)}: {source}", str(plan.config.max_batch_size),
                      str(instances), escape("; ".join(plan.notes)))  # fmt: skip
    console.print(table)
    if result.runtime:
        timings = ", ".join(f"{k} {v:.1f} ms" for k, v in result.runtime.timings_ms.items())
        console.print(f"Python model runtime: {result.runtime.runtime} on {result.runtime.entry['path']} (median "
                      f"latency at {_dims(result.runtime.shape)}: {timings})")  # fmt: skip
    for line in result.skipped:
        console.print(f"[yellow]not published[/] {escape(line)}")


def triton_check_report(report) -> None:
    """`triton --check`: what was served, parity per model and protocol, pipeline masks, the
    over-max-batch answer and the load test."""
    server = report.server
    console.print(f"tritonserver {report.install.version or ''} ({report.install.origin}, pid {server.get('pid')}): "
                  f"started in {server.get('started_s', 0):.1f} s, stopped in {server.get('stopped_s') or 0:.1f} s")  # fmt: skip
    for model, reason in report.not_served.items():
        console.print(f"[yellow]not served here[/] {model}: {escape(reason)}")
    for note in report.notes:
        console.print(note)
    if report.parity:
        console.print(_served_parity_table(report.parity))
    if report.masks:
        console.print(_mask_table(report.masks))
    over = report.overload
    if over.get("batch"):
        answers = "; ".join(f"{p.upper()}: {escape(a)}" for p, a in over["answers"].items())
        verdict = "[green]pass[/]" if over["passed"] else "[red]FAIL[/]"
        console.print(f"batch {over['batch']} to {over['model']} (max_batch_size {over['batch'] - 1}): {answers}; "
                      f"then {'answered' if over['recovered'] else 'NOT answered'} a valid request: {verdict}")  # fmt: skip
    if report.load:
        console.print(load_line(report.load))
    from unet_export.serving.check import summary  # serving's modules stay out of every other command

    for model, reason in report.not_checked.items():
        console.print(f"[yellow]not checked here[/] {model}: {escape(reason)}")
    verdict = "[green]served models match eager[/]" if report.passed else "[red]FAILED[/]: see the rows above"
    console.print(f"{verdict}: {escape(summary(report))}")


def _served_parity_table(rows) -> Table:
    table = Table(title="Served vs eager, over Triton: each artefact's own parity gate (error judged against "
                  "eager float64)", title_justify="left")  # fmt: skip
    whole_column(table, "model", [model for model, _, _ in rows])
    whole_column(table, "protocol", [protocol for _, protocol, _ in rows])
    for column in ("input", "max |err|", "allowed", "class diff", "result"):
        table.add_column(column, justify="left" if column == "input" else "right")
    for model, protocol, parity in rows:
        if parity.error:
            table.add_row(model, protocol, "-", "-", "-", "-", f"[red]FAIL[/] {escape(parity.error)}")
        for case in parity.cases:
            table.add_row(model, protocol, _dims(case.shape), f"{case.judged_err:.2e}",
                          f"{case.atol:.1e}" if case.atol is not None else "-", f"{case.argmax_disagreement:.4%}",
                          "[green]pass[/]" if case.passed else "[red]FAIL[/]")  # fmt: skip
    return table


def _mask_table(cases) -> Table:
    table = Table(title="Pipeline masks vs `predict` with the eager model", title_justify="left")
    whole_column(table, "model", [case.model for case in cases])
    whole_column(table, "protocol", [case.protocol for case in cases])
    for column in ("images", "pixels", "differing", "ties", "min Dice", "result"):
        table.add_column(column, justify="right")
    groups: dict[tuple, list] = {}
    for case in cases:
        groups.setdefault((case.model, case.protocol), []).append(case)
    for (model, protocol), group in groups.items():
        errors = [c.error for c in group if c.error]
        result = "[green]pass[/]" if all(c.passed for c in group) else "[red]FAIL[/]"
        result += f" {escape(errors[0])}" if errors else ""
        table.add_row(model, protocol, str(len(group)), str(sum(c.pixels for c in group)),
                      str(sum(c.differing for c in group)), str(sum(c.ties for c in group)),
                      f"{min(c.dice for c in group):.6f}", result)  # fmt: skip
    return table


def load_line(load) -> str:
    lat = load.latency_ms
    batches = ", ".join(f"{n}: {count}" for n, count in load.batches.items()) or "none"
    verdict = "[green]pass[/]" if load.passed else "[red]FAIL[/]"
    errors = f"; {counted(len(load.errors), 'error')}, first: {escape(load.errors[0])}" if load.errors else ""
    timing = (f"{load.requests_per_s:.1f} requests/s, latency p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, "
              f"p99 {lat['p99']:.1f} ms") if lat else "no answers"  # fmt: skip
    return (f"load test {load.model}: {load.clients} clients (half HTTP, half gRPC) x {load.requests} requests of "
            f"{_dims(load.shape)} in {load.seconds:.1f} s: {load.answered}/{load.expected} answered, "
            f"{load.mismatched} mismatched; {timing}; batches formed (size: executions) {batches}{errors}: {verdict}")  # fmt: skip
