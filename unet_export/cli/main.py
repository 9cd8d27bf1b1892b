"""`unet-export`: thin commands that parse options, call unet_export.api, and render."""

from pathlib import Path
from typing import Annotated

import typer

from unet_export.api import export_artifact
from unet_export.cli.common import DeviceOpt, ModelOpt, Weights, Workdir, cli_errors, console
from unet_export.cli.render import export_report
from unet_export.demo import write_random_checkpoint
from unet_export.export import FORMATS
from unet_export.export.onnx import DEFAULT_OPSET

app = typer.Typer(
    help="Export U-Net checkpoints to verified deployment artefacts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Height = Annotated[int, typer.Option(help="Export and first parity size: height.")]
Width = Annotated[int, typer.Option(help="Export and first parity size: width.")]


def _export(fmt: str, weights: Path, workdir: Path, **options) -> None:
    result = export_artifact(weights, fmt, workdir, **options)
    export_report(result, workdir)
    raise typer.Exit(0 if result.passed else 1)


@app.command("onnx")
@cli_errors
def onnx_cmd(
    weights: Weights,
    workdir: Workdir = Path("exports"),
    opset: Annotated[int, typer.Option(help="ONNX opset (at most 18 keeps ORT's CUDA Resize).")] = DEFAULT_OPSET,
    height: Height = 256,
    width: Width = 256,
    static: Annotated[bool, typer.Option("--static", help="Fix batch and size to the export shape.")] = False,
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
) -> None:
    """Checkpoint -> DIR/<stem>.onnx, checked against the eager model (exit 1 if parity fails)."""
    _export("onnx", weights, workdir, opset=opset, height=height, width=width, static=static,
            device=device.value, model=model)  # fmt: skip


@app.command("torchscript")
@cli_errors
def torchscript_cmd(
    weights: Weights,
    workdir: Workdir = Path("exports"),
    height: Height = 256,
    width: Width = 256,
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
) -> None:
    """Checkpoint -> DIR/<stem>.ts (torch.jit.load / libtorch), checked against the eager model."""
    _export("torchscript", weights, workdir, height=height, width=width, device=device.value, model=model)


@app.command("demo")
@cli_errors
def demo_cmd(workdir: Workdir = Path("exports/demo"), device: DeviceOpt = "auto") -> None:
    """The whole job on the shipped default model, offline: export every format, verify each."""
    weights = workdir / "demo_unet.pth"
    console.print(
        "[bold]demo[/]: full-size milesial U-Net (ConvTranspose, 3 -> 2 classes, 31.0M parameters) "
        "with [yellow]random seeded weights[/]: the trained demo model is not shipped yet"
    )
    write_random_checkpoint(weights, seed=0)
    passed = True
    for fmt in FORMATS:
        result = export_artifact(weights, fmt, workdir, device=device.value)
        export_report(result, workdir)
        passed &= result.passed
    raise typer.Exit(0 if passed else 1)


def main() -> None:
    app()
