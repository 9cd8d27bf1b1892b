"""`unet-export data synth|labelme`: make a dataset to train on."""

import re
from pathlib import Path
from typing import Annotated

import typer

from unet_export.api import convert_labelme, make_synth
from unet_export.cli.common import cli_errors, console
from unet_export.data.synth import MAX_IMAGES, MAX_SIDE
from unet_export.errors import UserError
from unet_export.text import counted

app = typer.Typer(help="Make datasets: synthetic shapes, or labelme annotations.", no_args_is_help=True)


def parse_size(text: str) -> tuple[int, int]:
    """'128x160' -> (128, 160) as height x width."""
    match = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", text.lower())
    if not match:
        raise UserError(f"--size {text!r} is not HxW, e.g. 128x128 (height x width)")
    return int(match.group(1)), int(match.group(2))


@app.command("synth")
@cli_errors
def synth_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write imgs/ and masks/ into.")],
    n: Annotated[int, typer.Option("--n", help=f"Number of images (1 to {MAX_IMAGES}).")] = 64,
    size: Annotated[str, typer.Option(help=f"Image size HxW, each side 32 to {MAX_SIDE}.")] = "128x128",
    classes: Annotated[int, typer.Option(help="Classes, background included.")] = 3,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a dataset already in OUT_DIR.")] = False,
) -> None:
    """A deterministic synthetic set in milesial's layout: shapes over textured, noisy backgrounds.
    Each file is written atomically; a write error (a full disk) exits 2 naming the file."""
    summary = make_synth(out_dir, n=n, size=parse_size(size), classes=classes, seed=seed, overwrite=overwrite)
    written = counted(summary.images, "image and mask", "images and masks")
    console.print(f"wrote {written} to {out_dir} (imgs/, masks/ *_mask.png); {classes} classes, "
                  f"mask values {summary.mask_values}")  # fmt: skip


@app.command("labelme")
@cli_errors
def labelme_cmd(
    json_dir: Annotated[Path, typer.Argument(help="Folder of labelme .json files.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write JPEGImages/ and SegmentationClass/ into.")],
    labels: Annotated[str, typer.Option(help="Comma-separated classes, background first: background,cat,dog.")],
) -> None:
    """labelme shapes (polygon, rectangle, circle) -> class-index PNG masks plus the images, in the VOC
    layout. The first label is class 0, the background: pixels no shape covers. Every file is
    checked first (labels, shape types, finite coordinates near the image) and nothing is written
    if one is wrong."""
    summary = convert_labelme(json_dir, out_dir, [name.strip() for name in labels.split(",")])
    counts = ", ".join(f"{k} {v}" for k, v in summary.pixels_per_class.items())
    console.print(f"wrote {counted(summary.images, 'image')}, {counted(summary.shapes, 'shape')} to {out_dir}; "
                  f"pixels per class: {counts}")


COMMANDS = {"data": app}  # a group: `unet-export data synth|labelme`
