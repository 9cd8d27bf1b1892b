"""`unet-export`: the Typer app, assembled from one module per command family. Each family module
names its commands in COMMANDS (name -> command function, or a Typer group); the commands live
there, what they print in cli/render_<family>.py."""

import typer

from unet_export.cli import data, export, predict, serve, system, train, verify
from unet_export.cli.common import run_app
from unet_export.cli.options import VersionOpt

app = typer.Typer(
    help="Export U-Net checkpoints to verified deployment artefacts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(version: VersionOpt = False) -> None:
    """Export U-Net checkpoints to verified deployment artefacts."""


FAMILIES = (export, verify, train, predict, serve, data, system)
# The order `unet-export --help` lists the commands in, as it always has (Typer lists a group such
# as `data` after the commands, wherever it is added).
HELP_ORDER = ("onnx", "torchscript", "aoti", "cpp-check", "doctor", "trt", "verify", "demo", "train", "evaluate",
              "predict", "triton", "serve", "openvino", "int8", "inspect", "report", "data")  # fmt: skip


def _attach(name: str, command) -> None:
    if isinstance(command, typer.Typer):
        app.add_typer(command, name=name)
    else:
        app.command(name)(command)


COMMANDS = {name: command for family in FAMILIES for name, command in family.COMMANDS.items()}
# sorted by HELP_ORDER.index: a command left out of HELP_ORDER stops the import, it is never dropped
for _name in sorted(COMMANDS, key=HELP_ORDER.index):
    _attach(_name, COMMANDS[_name])


def main() -> None:
    run_app(app)
