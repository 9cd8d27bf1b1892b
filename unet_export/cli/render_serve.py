"""What `triton` prints: the repository written, and with --check what the running server
answered (parity per model and protocol, pipeline masks, the over-max-batch answer, the load test)."""

from rich.markup import escape
from rich.table import Table

from unet_export.cli.common import console
from unet_export.cli.render import dims, whole_column
from unet_export.text import counted


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
                      f"latency at {dims(result.runtime.shape)}: {timings})")  # fmt: skip
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
            table.add_row(model, protocol, dims(case.shape), f"{case.judged_err:.2e}",
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
    split = load.server_ms
    server = (f"; in the server per request: queue {split['queue']:.1f} ms, input {split['compute_input']:.1f}, execute "
              f"{split['compute_infer']:.1f}, output {split['compute_output']:.1f}") if split else ""  # fmt: skip
    judged = f"{load.mismatched} mismatched" if load.judged else "answers not judged"
    names = {"http": "HTTP", "grpc": "gRPC"}
    protocols = "half HTTP, half gRPC" if len(load.protocols) > 1 else names[load.protocols[0]]
    return (f"load test {load.model}: {load.clients} clients ({protocols}) x {load.requests} requests of "
            f"{dims(load.shape)} ({load.inputs}) in {load.seconds:.1f} s: {load.answered}/{load.expected} answered, "
            f"{judged}; {timing}{server}; batches formed (size: executions) {batches}{errors}: {verdict}")  # fmt: skip
