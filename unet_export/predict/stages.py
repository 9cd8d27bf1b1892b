"""The three stages of batch prediction, shared by the local pipeline and the Ray job so that
both write byte-identical masks: load (decode + preprocess, or skip a finished mask), infer (one
batch of same-size images through the runner, back to class indices at each image's size) and
write (PNG encode, temp + rename, sha256). infer_stream is the infer stage for a stream of
batches (the local pipeline's throughput mode)."""

import hashlib
import io
import itertools
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from unet_export.data.dataset import Preprocess, image_array  # image_array: image_to_tensor in numpy
from unet_export.data.images import load_image
from unet_export.errors import UserError
from unet_export.fileio import atomic_path
from unet_export.inference.predictor import Fit, fit_input, mask_to_image_array, overlay, to_classes
from unet_export.predict.inputs import Job


@dataclass(frozen=True)
class Stages:
    """What loading and writing need of the model: plain data, picklable to Ray workers."""

    preprocess: Preprocess
    n_channels: int
    mask_values: tuple
    max_pixels: int | None = None
    overlay: bool = False


@dataclass
class Loaded:
    job: Job
    x: np.ndarray  # CHW float32, preprocessed
    size: tuple[int, int]  # the image's (width, height): the mask is written at this size
    image: Image.Image | None = None  # kept for --overlay only


@dataclass
class Outcome:
    """One input's end: written (mask, sha256), skipped (--resume found it done) or failed (reason)."""

    job: Job
    mask: Path | None = None
    sha256: str | None = None
    skipped: bool = False
    reason: str | None = None


def load(job: Job, stages: Stages, out: Path, resume: bool = False) -> Loaded | Outcome:
    """Decode and preprocess one image; an image that cannot be read is this input's failure,
    never the run's."""
    if resume and is_complete(job, out, stages.overlay):
        return Outcome(job, job.mask(out), skipped=True)
    try:
        img = load_image(job.src, stages.n_channels, stages.max_pixels)
        x = image_array(img, stages.preprocess, stages.n_channels)
    except UserError as exc:
        return Outcome(job, reason=str(exc))
    except OSError as exc:  # unreadable file (permissions, I/O error) after the header was read
        return Outcome(job, reason=f"cannot read image {job.src}: {exc.strerror or exc}")
    return Loaded(job, x, img.size, img if stages.overlay else None)


def is_complete(job: Job, out: Path, overlay: bool) -> bool:
    """A mask that exists was renamed into place whole; verify() also reads its chunks' CRCs, so
    a file truncated or damaged by something else is done again."""
    paths = [job.mask(out)] + ([job.overlay(out)] if overlay else [])
    try:
        for path in paths:
            with Image.open(path) as img:
                img.verify()
    except Exception:  # missing or damaged, whatever PIL raises
        return False
    return True


def infer(predictor, batch: list[Loaded]) -> list[np.ndarray]:
    """Class indices per pixel, at each image's own size, for images of one preprocessed size."""
    fit = fitted(predictor, batch)
    return classes_of(predictor, batch, fit.logits(map(predictor.runner.infer, fit.calls)))


def infer_stream(predictor, batches: Iterable[list[Loaded]], refused: Callable[[list[Loaded], UserError], None],
                 stream: Callable | None = None) -> Iterator[tuple[list[Loaded], list[np.ndarray]]]:  # fmt: skip
    """infer() for a stream of batches, through the runner's stream() (set up by for_throughput():
    several calls in flight) or ``stream`` (predict/probe.py: the same, choosing the setting on the
    way), each batch with its classes in the batches' order. Every call of a
    batch goes into the one stream (its tiles and envelope parts too), so the runtime stays busy
    across batches; a batch refused before it runs (fit_input) goes to ``refused`` instead. The
    stream holds the runner's few calls in flight and the batches they belong to, no more."""
    pending: deque[tuple[list[Loaded], Fit]] = deque()

    def calls():
        for batch in batches:
            try:
                fit = fitted(predictor, batch)
            except UserError as exc:  # this batch's size is one the model cannot take (a static model)
                refused(batch, exc)
                continue
            pending.append((batch, fit))
            yield from fit.calls

    outputs = (out for out, _ in (stream or predictor.runner.stream)(calls()))
    for first in outputs:
        batch, fit = pending.popleft()
        logits = fit.logits(itertools.chain([first], itertools.islice(outputs, len(fit.calls) - 1)))
        yield batch, classes_of(predictor, batch, logits)


def fitted(predictor, batch: list[Loaded]) -> Fit:
    x = torch.from_numpy(np.stack([item.x for item in batch]))
    return fit_input(x, predictor.sizes, predictor.halo, fixed=predictor.fixed, envelope=predictor.envelope)


def classes_of(predictor, batch: list[Loaded], logits: torch.Tensor) -> list[np.ndarray]:
    logits = logits.float().cpu()
    return [to_classes(logits[i : i + 1], item.size, predictor.preprocess, predictor.threshold)
            for i, item in enumerate(batch)]  # fmt: skip


def mask_png(classes: np.ndarray, mask_values) -> bytes:
    """The mask as milesial's predict.py stores it (grey levels or RGB triplets), PNG-encoded."""
    return _png(Image.fromarray(mask_to_image_array(classes, list(mask_values))))


def write(item: Loaded, classes: np.ndarray, stages: Stages, out: Path) -> Outcome:
    """Write the mask (and overlay) under ``out``: temp + rename, so a killed run leaves whole
    files or none. OSError (a full disk) is raised: it ends the run, not just this image."""
    data = mask_png(classes, stages.mask_values)
    dest = item.job.mask(out)
    if stages.overlay:
        save_atomic(item.job.overlay(out), _png(overlay(item.image, classes)))
    save_atomic(dest, data)
    return Outcome(item.job, dest, hashlib.sha256(data).hexdigest())


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def save_atomic(dest: Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
