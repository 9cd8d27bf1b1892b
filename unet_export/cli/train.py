"""`unet-export train`: a thin command over unet_export.flows.train."""

import inspect
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from unet_export.api import resolve_device, train, TrainConfig
from unet_export.cli.common import cli_errors, console, working
from unet_export.cli.options import MaskSuffix, MaxPixels, parse_mask_values, RunDeviceOpt
from unet_export.data.images import DEFAULT_MAX_PIXELS
from unet_export.errors import UserError
from unet_export.models import get_spec


def model_options(model: str, **options) -> dict:
    """The options this architecture's constructor takes; a flag it has no use for is an error."""
    params = inspect.signature(get_spec(model).build).parameters
    defaults = {"width": 64, "bilinear": False, "encoder_weights": None}
    chosen = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items() if v != defaults[k]}
    unused = [k for k in chosen if k not in params]
    if unused:
        raise UserError(f"--{unused[0].replace('_', '-')} does not apply to --model {model}")
    return {k: v for k, v in chosen.items() if k in params} | ({"width": options["width"]} if "width" in params else {})


@cli_errors
def train_cmd(
    data: Annotated[Path, typer.Argument(help="Dataset: imgs/ + masks/ (milesial) or JPEGImages/ + SegmentationClass/.")],
    model: Annotated[str, typer.Option(help="Architecture from the registry.")] = "milesial",
    width: Annotated[int, typer.Option(help="Base channel count (64 in the originals) of the U-Nets that have one.")] = 64,
    bilinear: Annotated[bool, typer.Option("--bilinear", help="milesial: bilinear up-sampling instead of ConvTranspose.")] = False,
    encoder_weights: Annotated[Path | None, typer.Option(help="resnet50: a local torchvision ResNet-50 state_dict to start from.")] = None,
    epochs: Annotated[int, typer.Option(help="Train up to this epoch (with --resume: in total).")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 4,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adam, or rmsprop as milesial (use --lr 1e-5).")] = "adam",
    scale: Annotated[float, typer.Option(help="milesial preprocessing: resize by this factor.")] = 1.0,
    square: Annotated[int | None, typer.Option(help="The bilibili tutorial's preprocessing: pad to square, resize to SIZE.")] = None,
    amp: Annotated[bool, typer.Option("--amp", help="Mixed precision (CUDA only).")] = False,
    val_fraction: Annotated[float, typer.Option(help="Share of images held out for validation.")] = 0.1,
    mask_suffix: MaskSuffix = "_mask",
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Directory for the checkpoints and their JSON "
                                          "sidecars (one per epoch) and the .state.pt to resume from.")] = Path("runs"),
    resume: Annotated[Path | None, typer.Option(help="Checkpoint to continue from (its .state.pt too).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for init, split and shuffling.")] = 0,
    mask_values: Annotated[str | None, typer.Option(help="The classes' mask values, background first "
                           "(0,128,255; r:g:b for RGB masks): any other value in a mask is an error. "
                           "Default: every value the masks hold, listed before training.")] = None,  # fmt: skip
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    device: RunDeviceOpt = "auto",
) -> None:
    """Train on a segmentation dataset; a milesial-format checkpoint + JSON sidecar per epoch."""
    config = model_options(model, width=width, bilinear=bilinear, encoder_weights=encoder_weights)
    cfg = TrainConfig(model, config, epochs, batch_size, lr, optimizer, scale, square, amp, val_fraction,
                      mask_suffix, seed, device.value, parse_mask_values(mask_values), max_pixels)  # fmt: skip
    if amp and resolve_device(device.value).type != "cuda":
        console.print("[yellow]note[/] --amp: mixed precision runs on CUDA only; training in FP32 on the CPU")
    columns = (TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn())  # fmt: skip
    with working("train", f"training {model} for {epochs} epochs on {data}", spinner=False), \
            Progress(*columns, console=console, transient=True) as progress:
        # Hidden until the first step: before it there is no step count and no loss to show.
        task = progress.add_task("train", total=None, epoch=0, loss=0.0, visible=False)

        def on_step(epoch, step, total, loss):
            progress.update(task, completed=step, total=total, epoch=epoch, loss=loss, visible=True)

        def on_epoch(h):
            console.print(f"epoch {h['epoch']}: loss {h['train_loss']:.4f}, val Dice {h['val_dice']:.4f}, "
                          f"lr {h['lr']:.1e}, {h['seconds']:.1f} s")  # fmt: skip

        def on_checked(check):
            console.print(f"checked {check.images} image/mask pairs: {check.channels}-channel input, mask values "
                          f"(masks holding each) {check.describe_values()}")  # fmt: skip

        result = train(data, workdir, cfg, resume=resume, on_step=on_step, on_epoch=on_epoch, on_checked=on_checked)
    if result.checkpoints:
        console.print(f"mask_values {result.mask_values}; last checkpoint {result.checkpoints[-1]}")
    else:
        console.print(f"nothing to do: {resume} is already at epoch {epochs}")


COMMANDS = {"train": train_cmd}
