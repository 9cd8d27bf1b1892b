"""`unet-bench`: every runtime on the workdir's model, parity-gated, timed side by side."""

from pathlib import Path
from typing import Annotated

import typer

from unet_export.api import benchmark, prepare_workdir
from unet_export.bench.backends import BACKENDS
from unet_export.bench.run import check_mode, exit_code
from unet_export.bench.stats import MODES
from unet_export.cli.common import cli_errors, console, run_app, working
from unet_export.cli.jsonout import JsonOpt, JunitOpt, ReportOpt, json_result
from unet_export.cli.options import DeviceOpt, FactoryOpt, VersionOpt, Workdir, model_choice
from unet_export.cli.render_bench import bench_markdown, bench_tables, export_line, prepared_lines, row_line
from unet_export.cli.tolerances import Atol, MaxClassChange, MinDice, Rtol
from unet_export.errors import UserError
from unet_export.fileio import atomic_path
from unet_export.flows.results import artifact_record
from unet_export.runtimes.torch.compiled import COMPILE_MODES

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
@cli_errors
def bench(
    checkpoint: Annotated[Path | None, typer.Argument(metavar="WEIGHTS", show_default=False,
                          help="A checkpoint (.pth): first export into DIR what the rows need and DIR lacks "
                          "(each gated), reusing what DIR holds verified from it.")] = None,  # fmt: skip
    workdir: Workdir = Path("exports"),
    batch: Annotated[int, typer.Option(help="Images per batch.")] = 8,
    height: Annotated[int | None, typer.Option(help="Input height (default: the export size).")] = None,
    width: Annotated[int | None, typer.Option(help="Input width (default: the export size).")] = None,
    backends: Annotated[str | None, typer.Option(help=f"Comma-separated subset of: {', '.join(BACKENDS)}.")] = None,
    warmup: Annotated[int, typer.Option(envvar="UNET_BENCH_WARMUP", help="Untimed calls before timing.")] = 3,
    iters: Annotated[int | None, typer.Option(envvar="UNET_BENCH_ITERS",
                                              help="Timed calls (default: as many as --min-time allows).")] = None,  # fmt: skip
    min_time: Annotated[float, typer.Option(envvar="UNET_BENCH_MIN_TIME",
                                            help="Seconds to time each backend (at least 5 calls).")] = 5.0,  # fmt: skip
    mode: Annotated[str, typer.Option(help=f"{', '.join(MODES)}: one batch at a time (the CI table), a stream of "
                                      "batches run as each runtime is fastest for one (a batch job, a server), "
                                      "or both side by side.")] = "latency",  # fmt: skip
    device: DeviceOpt = "auto",
    compile_mode: Annotated[str, typer.Option(help=f"torch.compile mode: {', '.join(COMPILE_MODES)}.")] = "default",
    weights: Annotated[Path | None, typer.Option(help="Checkpoint, if the manifest's has moved.")] = None,
    model_factory: FactoryOpt = None,
    data: Annotated[Path | None, typer.Option(help="Images for the batch (default: the held-out images the "
                                                   "manifest records, else seeded noise, on which FP16/BF16/INT8 "
                                                   "rows are timed but not judged).")] = None,
    json_path: JsonOpt = None,
    report_path: ReportOpt = None,
    junit_path: JunitOpt = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the table as Markdown.")] = None,
    gate: Annotated[bool, typer.Option("--gate/--no-gate", help="Exit 1 when a backend fails parity.")] = True,
    rtol: Rtol = None,
    atol: Atol = None,
    max_class_change: MaxClassChange = None,
    min_dice: MinDice = None,
    version: VersionOpt = False,
) -> None:
    """Time every runtime against eager fp32 after checking each one's output (exit 1 on mismatch).
    With WEIGHTS, export what is missing first (unet-bench weights.pth)."""
    names = [b.strip() for b in backends.split(",") if b.strip()] if backends else None
    check_mode(mode)  # before anything is exported
    if compile_mode not in COMPILE_MODES:
        raise typer.BadParameter(f"choose one of {', '.join(COMPILE_MODES)}", param_hint="--compile-mode")
    if checkpoint is not None and weights is not None:
        raise UserError("--weights names the workdir's moved checkpoint; with WEIGHTS given, leave it out")
    model = model_choice(None, model_factory=model_factory)
    with json_result(json_path, "bench", "unet-bench", report=report_path, junit=junit_path) as out:
        out.images = data  # the HTML report's pictures use the same images
        out["workdir"] = str(workdir)
        exports_passed = True
        if checkpoint is not None:
            with working("unet-bench", f"exporting into {workdir} what it lacks"):
                prepared = prepare_workdir(checkpoint, workdir, backends=names, device=device.value, height=height,
                                           width=width, data=data, model=model, on_export=export_line)  # fmt: skip
            prepared_lines(prepared, workdir)
            out["artifacts"] = [artifact_record(r.entry) for r in prepared.exported] + \
                [artifact_record(e) | {"reused": True} for e in prepared.reused]  # fmt: skip
            exports_passed = prepared.passed
        with working("unet-bench", f"checking and timing the runtimes of {workdir}, one row each"):
            report = benchmark(
                workdir, batch=batch, height=height, width=width, backends=names, device=device.value,
                weights=weights or checkpoint, compile_mode=compile_mode, data=data, warmup=warmup, iters=iters,
                min_time=min_time, on_row=lambda row: console.print(row_line(row)), rtol=rtol, atol=atol,
                max_class_change=max_class_change, min_dice=min_dice, model=model, mode=mode,
            )  # fmt: skip
        for table in bench_tables(report):
            console.print(table)
        out.update({key: value for key, value in report.to_dict().items() if key != "versions"})  # the envelope's are more
        if markdown:
            with atomic_path(markdown) as tmp:
                tmp.write_text(bench_markdown(report) + "\n")
            console.print(f"wrote {markdown}")
        if json_path:
            console.print(f"wrote {json_path}")  # when the block ends, with the exit code
        raise typer.Exit(max(exit_code(report.rows, gate), 0 if exports_passed else 1))


def main() -> None:
    run_app(app)
