"""Rich rendering of library results; no logic beyond formatting."""

from rich.table import Table

from unet_export.api import ExportResult
from unet_export.cli.common import console


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def parity_table(result: ExportResult) -> Table:
    parity = result.parity
    table = Table(title=f"Parity vs eager fp32: {parity.runner}, tolerance {parity.tolerance}", title_justify="left")
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
    opset = f", opset {entry['opset']}" if "opset" in entry else ""
    console.print(f"[bold]{entry['format']}[/] {result.path} ({_mb(entry['bytes'])}{opset}, {shape})")
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
