"""Batch prediction over many images: `unet-export predict MODEL INPUTS...`.

prepare() resolves inputs and the runtime; run() streams them through the local pipeline
(predict.local) or Ray Data (predict.ray_data), both built of the same stages (predict.stages),
so they write the same masks; the Report says what happened to every input."""

import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from unet_export.errors import UserError
from unet_export.fileio import sweep_stale_temps
from unet_export.predict.choose import open_model
from unet_export.predict.inputs import Job, collect_jobs
from unet_export.predict.local import PredictOptions, run_local
from unet_export.predict.ray_data import check_cluster, run_ray
from unet_export.predict.report import Report
from unet_export.predict.stages import Outcome, is_complete


@dataclass
class Prepared:
    predictor: object
    jobs: list[Job]
    out: Path
    options: PredictOptions
    report: Report
    note: str  # how the runtime was chosen (runtime auto), or ''
    model: str
    created_out: bool


def prepare(model, inputs: list[Path], out: Path, options: PredictOptions, *, device="cpu", runtime: str = "auto",
            architecture: str | None = None, ray_address: str | None = None, use_ray: bool = False,
            timing=lambda labels: nullcontext()) -> Prepared:  # fmt: skip
    """Everything that can be refused before a mask is written (exit 2): the options, the
    output folder, the inputs and their output paths, the Ray cluster, the model and its runtime.
    The cheap checks come first: choosing a runtime may time each one (seconds), and a run with
    nothing left to do (--resume) or an unreachable cluster is known without it."""
    if options.batch_size < 1 or options.workers < 1:
        raise UserError("--batch-size and --workers must be at least 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    jobs = collect_jobs(inputs)
    for folder, _, _ in os.walk(out):  # temp files of a killed run (its writer is dead)
        sweep_stale_temps(Path(folder))
    done = [job for job in jobs if is_complete(job, out, options.overlay)] if options.resume else []
    if use_ray and len(done) < len(jobs):
        check_cluster(ray_address)
    predictor, note = open_model(model, device, runtime, architecture, measure=len(done) < len(jobs), timing=timing)
    report = Report(str(model), predictor.label, str(out), predictor.max_batch(options.batch_size), options.workers,
                    inputs=len(jobs), positions={job.rel: i for i, job in enumerate(jobs)})  # fmt: skip
    for job in done:
        report.add(Outcome(job, job.mask(out), skipped=True))
    finished = {job.rel for job in done}
    todo = [job for job in jobs if job.rel not in finished]
    return Prepared(predictor, todo, out, options, report, note, str(model), not out.exists())


def run(prepared: Prepared, tick=lambda outcome: None, ray_address: str | None = None, use_ray: bool = False) -> Report:
    """Run every job; the report is complete even when a fatal error or Ctrl-C ends the run."""
    try:
        if not prepared.jobs:  # every mask was done (--resume): no runtime to load, no cluster to join
            return prepared.report
        if use_ray:
            return run_ray(prepared, ray_address, tick)
        return run_local(prepared.predictor, prepared.jobs, prepared.out, prepared.options, prepared.report, tick)
    finally:
        prepared.report.finish()
        if prepared.created_out and prepared.out.is_dir() and not any(files for _, _, files in os.walk(prepared.out)):
            shutil.rmtree(prepared.out, ignore_errors=True)  # nothing written: leave nothing behind


def run_predict(model, inputs, out, options: PredictOptions, **kwargs) -> Report:
    return run(prepare(model, inputs, out, options, **kwargs))


__all__ = ["PredictOptions", "Prepared", "Report", "prepare", "run", "run_predict"]
