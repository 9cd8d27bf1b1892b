"""What `predict` runs over: INPUTS (images, folders searched recursively, dataset folders for
their images only, text files listing paths) -> jobs, each an image and the mask path it writes under --out, mirroring the input tree
so that no two inputs share an output."""

import os
from dataclasses import dataclass
from pathlib import Path

from unet_export.data.dataset import images_folder
from unet_export.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"}
LIST_SUFFIXES = {".txt", ".lst"}  # one path per line ('#' comments); relative paths from the current folder


@dataclass(frozen=True)
class Job:
    src: Path  # the image as given
    rel: str  # its path under --out without the suffix, '/'-separated: "a/x" -> a/x_mask.png

    def mask(self, out: Path) -> Path:
        return Path(out) / f"{self.rel}_mask.png"

    def overlay(self, out: Path) -> Path:
        return Path(out) / f"{self.rel}_overlay.png"


def collect_jobs(inputs: list[Path]) -> list[Job]:
    """Every image INPUTS name, in the order given (folders sorted), each once. A path that does
    not exist on the command line is bad input; one a list file names is a failure of that image
    only (reported, skipped). Output paths are relative to the deepest folder holding every input."""
    images: dict[str, Path] = {}
    bases: list[str] = []
    for arg in map(Path, inputs):
        if not arg.exists():
            raise UserError(f"input not found: {arg}")
        if arg.is_dir():
            # A dataset folder (imgs/ + masks/, JPEGImages/ + SegmentationClass/) means its images:
            # predicting on its ground-truth masks too would write masks of masks.
            arg = images_folder(arg) or arg
            found = sorted(p for p in arg.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(arg).parts))  # fmt: skip
            bases.append(os.path.abspath(arg))
            images.update((os.path.abspath(p), p) for p in found)
        elif arg.suffix.lower() in LIST_SUFFIXES:
            listed = _read_list(arg)
            bases += [os.path.dirname(os.path.abspath(p)) for p in listed]
            images.update((os.path.abspath(p), p) for p in listed)
        else:
            bases.append(os.path.dirname(os.path.abspath(arg)))
            images[os.path.abspath(arg)] = arg
    if not images:
        raise UserError(f"no images in {', '.join(map(str, inputs))} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    root = os.path.commonpath(bases)
    return _unique([Job(path, Path(os.path.splitext(os.path.relpath(key, root))[0]).as_posix())
                    for key, path in images.items()])  # fmt: skip


def _read_list(path: Path) -> list[Path]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the list {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _unique(jobs: list[Job]) -> list[Job]:
    """x.png and x.jpg in one folder would write one x_mask.png: refuse before anything is written."""
    seen: dict[str, Path] = {}
    for job in jobs:
        if job.rel in seen:
            raise UserError(f"{seen[job.rel]} and {job.src} would both write {job.rel}_mask.png: rename one")
        seen[job.rel] = job.src
    return jobs
