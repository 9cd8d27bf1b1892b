"""Streaming predict on one machine: reader threads decode and preprocess, the calling thread
batches images of one preprocessed size and runs the runtime, writer threads encode and write.
Queues are bounded (``depth`` images in flight per stage), so memory does not grow with the
number of inputs, and the runtime has the next batch ready when it finishes one.

Threads, not processes: PIL decodes and encodes PNG, and the runtimes run, with the GIL released;
measured on this 2-core machine the stages overlap (see benchmarks/predict.py)."""

import itertools
import os
import threading
from collections import deque
from contextlib import closing, suppress
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

from unet_export.errors import UserError
from unet_export.fileio import environment_error, os_error_message
from unet_export.inference.predictor import TILE
from unet_export.predict.inputs import Job
from unet_export.predict.probe import ThroughputProbe
from unet_export.predict.report import Report
from unet_export.predict.stages import Loaded, Outcome, Stages, infer, infer_stream, load, write


DEFAULT_BATCH = 8  # --batch-size when none is given (or the artefact's largest proven batch, if smaller)
# --mode: the runner's stream of batches (Runner.for_throughput, its setting measured: probe.py), or one call at a time
MODES = ("throughput", "latency")


@dataclass
class PredictOptions:
    batch_size: int | None = None  # None: DEFAULT_BATCH, or the largest batch the artefact was proven at
    workers: int = 2
    overlay: bool = False
    resume: bool = False
    max_pixels: int | None = None
    mode: str = "throughput"  # throughput: the runner's stream (Runner.for_throughput); latency: one call at a time


def stages_of(predictor, options: PredictOptions) -> Stages:
    return Stages(predictor.preprocess, predictor.n_channels, tuple(map(_plain, predictor.mask_values)),
                  options.max_pixels, options.overlay)  # fmt: skip


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


def run_local(predictor, jobs: list[Job], out: Path, options: PredictOptions, report: Report,
              tick: Callable[[Outcome], None] = lambda outcome: None) -> Report:  # fmt: skip
    """Every job's outcome into ``report``. An unreadable image is that image's failure; a write
    error (full disk) or Ctrl-C ends the run with every finished mask whole and no temp file."""
    stages, depth = stages_of(predictor, options), 2 * options.batch_size + options.workers
    runner = predictor.runner
    runner.shares_cpu = True
    # throughput mode: the runner set up for a stream, its setting measured on the first calls
    probe = ThroughputProbe(runner) if options.mode == "throughput" else None
    batcher = Batcher(predictor.max_batch(options.batch_size), limit=2 * options.batch_size, alone=TILE)
    with ThreadPoolExecutor(options.workers, "load", _background) as readers, \
            ThreadPoolExecutor(options.workers, "write", _background) as writers:
        writes: deque[Future] = deque()

        def finish(outcome: Outcome) -> None:
            report.add(outcome)
            tick(outcome)

        def refused(batch: list[Loaded], exc: UserError) -> None:
            for item in batch:
                finish(Outcome(item.job, reason=str(exc)))

        try:
            loading = prefetch(readers, partial(load, stages=stages, out=Path(out), resume=options.resume), jobs, depth)
            with runner, closing(loading):
                for batch, classes in _inferred(predictor, _batches(loading, batcher, finish), refused, probe):
                    for item, mask in zip(batch, classes):
                        writes.append(writers.submit(_write_and_record, report, item, mask, stages, Path(out)))
                    while len(writes) > depth or (writes and writes[0].done()):
                        tick(_written(writes.popleft()))
            while writes:
                tick(_written(writes.popleft()))
        except BaseException:  # Ctrl-C or a fatal write error: started writes finish whole (pool exit)
            report.interrupted = True
            for future in writes:
                future.cancel()
            raise
        finally:
            report.mode, report.setting = options.mode, probe.setting() if probe else "one batch at a time"
    return report


def _batches(loading: Iterator, batcher: "Batcher", finish: Callable[[Outcome], None]) -> Iterator[list[Loaded]]:
    """The loaded images in batches; an image that could not be loaded (or is done) is finished here."""
    for item in loading:
        if isinstance(item, Outcome):
            finish(item)
            continue
        yield from batcher.add(item)
    yield from batcher.flush()


def _inferred(predictor, batches: Iterator[list[Loaded]], refused,
              probe: ThroughputProbe | None) -> Iterator[tuple[list[Loaded], list]]:  # fmt: skip
    """Each batch with its classes, in order: streamed in throughput mode (stages.infer_stream,
    through the probe that chooses the setting), else one runtime call at a time."""
    if probe is not None:
        yield from infer_stream(predictor, batches, refused, probe.stream)
        return
    for batch in batches:
        try:
            classes = infer(predictor, batch)
        except UserError as exc:  # this batch's size is one the model cannot take (a static model)
            refused(batch, exc)
            continue
        yield batch, classes


def _write_and_record(report: Report, item: Loaded, classes, stages: Stages, out: Path) -> Outcome:
    """The writer thread records its own mask, right after the rename: a Ctrl-C lands in the main
    thread at any bytecode, and a mask on disk missing from the report (or counted twice) was
    possible when the main thread did the bookkeeping (a SIGTERM test found 6 masks, 5 reported)."""
    outcome = write(item, classes, stages, out)
    report.add(outcome)  # list.append: one step under the GIL
    return outcome


def _background() -> None:
    """Reader and writer threads run at the lowest priority (nice 19, per thread on Linux): the
    runtime splits each call evenly over its threads, so one of them preempted by a decode stalls
    the whole call; niced, the stages fill the runtime's idle moments instead (measured here).
    Where per-thread priority is not available the threads run as they are."""
    with suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _written(future: Future) -> Outcome:
    try:
        return future.result()
    except OSError as exc:  # a full disk or read-only --out: every later write would fail too
        if environment_error(exc) is None:
            raise
        raise UserError(os_error_message(exc)) from None


def prefetch(pool: ThreadPoolExecutor, fn, items: Iterable, depth: int) -> Iterator:
    """fn(item) for every item, run in ``pool``, yielded in order, at most ``depth`` ahead."""
    items, pending = iter(items), deque()
    try:
        pending.extend(pool.submit(fn, item) for item in itertools.islice(items, depth))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(fn, item) for item in itertools.islice(items, 1))
            yield result
    finally:
        for future in pending:
            future.cancel()


class Batcher:
    """Groups images by preprocessed shape into batches of ``size``. When more than ``limit``
    images wait in part-filled groups (many sizes), the fullest group runs as it is, so memory
    stays bounded; flush() runs what is left at the end. An image larger than ``alone`` on a side
    runs by itself: it is tiled, and a batch of them would hold several in memory at once."""

    def __init__(self, size: int, limit: int, alone: int | None = None):
        self.size, self.limit, self.alone = size, max(limit, size), alone
        self.groups: dict[tuple, list[Loaded]] = {}

    def add(self, item: Loaded) -> list[list[Loaded]]:
        if self.alone and max(item.x.shape[-2:]) > self.alone:
            return [[item]]
        group = self.groups.setdefault(item.x.shape, [])
        group.append(item)
        ready = []
        if len(group) >= self.size:
            ready.append(self.groups.pop(item.x.shape))
        if sum(map(len, self.groups.values())) > self.limit:
            fullest = max(self.groups, key=lambda shape: len(self.groups[shape]))
            ready.append(self.groups.pop(fullest))
        return ready

    def flush(self) -> list[list[Loaded]]:
        ready, self.groups = list(self.groups.values()), {}
        return ready
