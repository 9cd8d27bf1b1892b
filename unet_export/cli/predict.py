"""`unet-export predict`: thin command over unet_export.predict.batch (local threads, or Ray Data)."""

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from unet_export.api import resolve_device
from unet_export.cli.common import cli_errors, console, stop_on_signals, working
from unet_export.cli.options import ModelOpt, RunDeviceOpt, with_model_flags
from unet_export.data.images import DEFAULT_MAX_PIXELS
from unet_export.fileio import write_json
from unet_export.predict.batch import PredictOptions, prepare, run
from unet_export.predict.report import Report
from unet_export.text import counted

SHOWN_FAILURES = 20  # on the terminal; the report lists them all


@cli_errors
@with_model_flags("architecture")
def predict_cmd(
    model: Annotated[Path, typer.Argument(help="Checkpoint (.pth), artefact (.onnx, .ts, .pt2, .xml, .engine) or a "
                                          "workdir: then --runtime picks among its verified artefacts.")],  # fmt: skip
    inputs: Annotated[list[Path], typer.Argument(help="Images, folders (searched recursively) or .txt files listing "
                                                 "image paths, one per line.")],  # fmt: skip
    out: Annotated[Path, typer.Option(help="Folder for the masks: <path under the inputs' common folder>_mask.png.")] = Path("predictions"),
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images of one preprocessed size per runtime call "
                                                   "(default 8, or the largest batch the artefact was proven at). "
                                                   "More than it was proven at is refused.")] = None,  # fmt: skip
    workers: Annotated[int, typer.Option(min=1, help="Threads decoding images, and threads writing masks.")] = 2,
    mode: Annotated[str, typer.Option(help="throughput: the runtime runs several batches at once, as it is fastest for a "
                                      "stream (OpenVINO's async infer queue; ONNX Runtime's concurrent runs or one run on every core, "
                                      "whichever the first batches measure faster); latency: "
                                      "one batch at a time. The masks are the same. --ray runs one batch at a time.")] = "throughput",  # fmt: skip
    runtime: Annotated[str, typer.Option(help="With a workdir: auto (the fastest verified artefact, timed here) or "
                                         "one of onnxruntime, openvino, openvino-int8, onnxruntime-int8, torchscript, "
                                         "aoti, tensorrt-fp16, ...")] = "auto",  # fmt: skip
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write the mask blended over the image.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Skip inputs whose mask (and overlay) is already complete.")] = False,
    report: Annotated[Path | None, typer.Option(help="Write a JSON report: counts, images/s, runtime, every mask's "
                                                "sha256, every failure.")] = None,  # fmt: skip
    ray: Annotated[bool, typer.Option("--ray", help="Run on Ray Data: the cluster at --ray-address or $RAY_ADDRESS, "
                                      "else a local Ray instance (needs the extra: pip install 'unet-export\\[ray]').")] = False,  # fmt: skip
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join (host:port); implies --ray.")] = None,
    max_pixels: Annotated[int, typer.Option(min=1, help="Refuse images with more pixels than this (checked from the "
                                            "header, before decoding).")] = DEFAULT_MAX_PIXELS,  # fmt: skip
    architecture: ModelOpt = None,
    device: RunDeviceOpt = "auto",
) -> None:
    """Masks for many images, streamed: decoding and writing run in threads around the runtime,
    same-size images are batched. An image that cannot be read is reported and skipped (exit 1 at
    the end); every mask is written whole (temp + rename), so --resume can pick up a killed run."""
    use_ray = ray or ray_address is not None
    address = (ray_address or os.environ.get("RAY_ADDRESS")) if use_ray else None
    options = PredictOptions(batch_size, workers, overlay, resume, max_pixels, mode)
    with stop_on_signals():  # from the start: choosing a runtime times each one
        prepared = prepare(model, inputs, out, options, device=resolve_device("cpu" if use_ray else device.value),
                           runtime=runtime, architecture=architecture, ray_address=address, use_ray=use_ray,
                           timing=lambda labels: working("predict", f"timing {', '.join(labels)} to choose the fastest"))  # fmt: skip
        if prepared.note:
            console.print(prepared.note)
        try:
            with _progress(len(prepared.jobs)) as bar:
                task = bar.add_task("predict", total=len(prepared.jobs), rate="")
                result = run(prepared, lambda outcome: _advance(bar, task, prepared.report), address, use_ray)
        finally:
            if report is not None:
                write_json(report, prepared.report.to_dict())
    _summary(result, report)
    if result.failed:
        raise typer.Exit(1)


def _progress(total: int) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal)  # fmt: skip


def _advance(bar: Progress, task, report: Report) -> None:
    elapsed = time.perf_counter() - report.started
    bar.update(task, advance=1, rate=f"{len(report.outcomes) / max(elapsed, 1e-9):.1f} img/s")


def _summary(result: Report, report_path: Path | None) -> None:
    line = (f"wrote {counted(len(result.written), 'mask')} to {result.out} in {result.seconds:.1f} s ({result.images_per_s:.1f} img/s, "
            f"{result.runtime}, batch {result.batch_size}, {result.engine})")  # fmt: skip
    if result.skipped:
        line += f"; {len(result.skipped)} already done (--resume)"
    console.print(line)
    if result.setting:  # what the runtime ran, a stream or one batch at a time ("": it did not run)
        console.print(f"{result.mode} mode: {result.setting}")
    if report_path is not None:
        console.print(f"report: {report_path}")
    if result.failed:
        _failures(result.failed)


def _failures(failed: list) -> None:
    """On stderr, so `predict ... > log` keeps them in sight and a script reading stdout gets only
    the summary; plain print, not Rich, so a reason such as "[Errno 2] ..." is not read as markup."""
    print(f"{len(failed)} failed:", file=sys.stderr)
    for outcome in failed[:SHOWN_FAILURES]:
        print(f"  {outcome.job.src}: {outcome.reason}", file=sys.stderr)
    if len(failed) > SHOWN_FAILURES:
        print(f"  ... and {len(failed) - SHOWN_FAILURES} more (all in the report)", file=sys.stderr)


COMMANDS = {"predict": predict_cmd}
