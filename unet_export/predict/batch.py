"""Batch prediction over many images: `unet-export predict MODEL INPUTS...`.

prepare() resolves inputs and the runtime; run() streams them through the local pipeline
(predict.local) or Ray Data (predict.ray_data), both built of the same stages (predict.stages),
so they write the same masks; the Report says what happened to every input."""

import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from unet_export.data.images import open_image
from unet_export.errors import UserError
from unet_export.fileio import sweep_stale_temps
from unet_export.inference.predictor import padded_size, proven_fit, proven_tile
from unet_export.parity.envelope import batch_for
from unet_export.predict.choose import open_model
from unet_export.predict.inputs import Job, collect_jobs
from unet_export.predict.local import DEFAULT_BATCH, MODES, PredictOptions, run_local
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
    if (options.batch_size is not None and options.batch_size < 1) or options.workers < 1:
        raise UserError("--batch-size and --workers must be at least 1")
    if options.mode not in MODES:
        raise UserError(f"--mode {options.mode!r}: choose one of {', '.join(MODES)}")
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
    options = replace(options, batch_size=batch_size(predictor, options.batch_size))
    finished = {job.rel for job in done}
    todo = [job for job in jobs if job.rel not in finished]
    check_inside(predictor, todo, options.max_pixels)
    report = Report(str(model), predictor.label, str(out), options.batch_size, options.workers,
                    inputs=len(jobs), positions={job.rel: i for i, job in enumerate(jobs)})  # fmt: skip
    for job in done:
        report.add(Outcome(job, job.mask(out), skipped=True))
    if not use_ray:  # the Ray job runs one batch at a time per worker (the report's default)
        report.mode, report.setting = options.mode, ""  # the setting once the runner ran (run_local); "": it did not
    return Prepared(predictor, todo, out, options, report, note, str(model), not out.exists())


def batch_size(predictor, requested: int | None) -> int:
    """The images per runtime call: a static artefact's one batch; else --batch-size (default
    DEFAULT_BATCH, or the largest batch the artefact was proven at if smaller). A --batch-size
    larger than that is refused (exit 2): the artefact is not run on batches it was not proven at."""
    if predictor.fixed_batch:
        return predictor.fixed_batch
    path = predictor.entry["path"] if predictor.entry else ""
    return batch_for(predictor.envelope, requested, DEFAULT_BATCH, "--batch-size", path)


def check_inside(predictor, jobs: list[Job], max_pixels: int | None) -> None:
    """Before anything runs: an image whose input the artefact's envelope holds neither whole nor
    in tiles (its halo included) is refused (exit 2), naming the image and the envelope. Only the
    headers are read; an unreadable image is left to fail on its own when it is loaded."""
    env = predictor.envelope
    if env is None or predictor.fixed is not None:  # a static artefact pads to its one size, or fails that image
        return
    seen: set[tuple[int, int]] = set()
    for job in jobs:
        try:
            with open_image(job.src, max_pixels) as img:
                width, height = predictor.preprocess.size(*img.size)
        except UserError:
            continue
        size = padded_size(predictor.sizes, height, width, env)
        if size in seen:
            continue
        seen.add(size)
        if not proven_fit(env, *size, predictor.halo):
            _refuse_image(job, env, size, predictor)


def _refuse_image(job: Job, env, size: tuple[int, int], predictor) -> None:
    tops = [max(box.height[1] for box in env.boxes), max(box.width[1] for box in env.boxes)]
    larger = size[0] > tops[0] or size[1] > tops[1]  # --largest proves larger sizes, not smaller ones
    hint = f"; export it with --largest {max(size[0], tops[0])}x{max(size[1], tops[1])} to prove it" if larger else ""
    try:
        env.check(1, *size, what=f"{job.src}: input")
    except UserError as exc:
        raise UserError(f"{exc}{hint}") from None
    tile = proven_tile(env, predictor.halo)
    raise UserError(f"{job.src}: input 1x{predictor.n_channels}x{size[0]}x{size[1]} runs in tiles of {tile} that the "
                    f"proven envelope ({env.describe()}) does not hold{hint}")  # fmt: skip


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
