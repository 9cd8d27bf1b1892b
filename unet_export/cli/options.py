"""The option types every command shares, defined once as Annotated aliases, the version option,
and the help style (flags without a type, arguments as Click shows them)."""

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from unet_export.errors import UserError
from unet_export.models import MODELS


def _click_style_usage() -> None:
    """Typer 0.29 prints `<bool>` beside every flag (a flag takes no value) and required
    arguments as `{weights}` in usage lines; both puzzled users. Help here shows flags bare and
    arguments as Click does (WEIGHTS, [OPTIONAL], INPUTS...). Private Typer methods: if a Typer
    upgrade renames them, help falls back to Typer's own style (tests/cli/test_cli_contract.py notices)."""
    from typer import core
    option, argument = getattr(core, "TyperOption", None), getattr(core, "TyperArgument", None)
    if not (hasattr(option, "display_type_rich") and hasattr(argument, "_usage_display_name")):
        return
    typed = option.display_type_rich

    def display_type_rich(self, ctx):
        return None if self.is_flag and not self.count else typed(self, ctx)

    def usage_name(self) -> str:
        name = self.metavar or self.name.upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    option.display_type_rich, argument._usage_display_name = display_type_rich, usage_name
    _list_types_as_their_items(core)


def _list_types_as_their_items(core) -> None:
    """Typer shows a repeatable option or a variadic argument as `<list[Path]>`, a Python type:
    help shows the item (`inputs... <path>`); the name's `...` or the help says it repeats."""
    parameter = getattr(core, "_TyperParameter", None)
    if not hasattr(parameter, "display_type"):
        return
    typed = parameter.display_type

    def display_type(self, ctx):
        shown = typed(self, ctx)
        if shown.startswith("<list[") and shown.endswith("]>"):
            return f"<{shown[len('<list['):-2].lower()}>"
        return shown

    parameter.display_type = display_type


_click_style_usage()


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def package_version() -> str:
    """The installed distribution's version (pyproject's), so it cannot drift from what pip shows."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unet-export")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from unet_export import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        print(f"unet-export {package_version()}")
        raise typer.Exit(0)


VersionOpt = Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, expose_value=False,
                                          help="Print the version and exit.")]  # fmt: skip
Workdir = Annotated[Path, typer.Option("--workdir", "-w", help="Directory for artefacts and manifest.json.")]
DeviceOpt = Annotated[Device, typer.Option(help="Where parity runs: CUDA when there is a GPU, else CPU.")]
RunDeviceOpt = Annotated[Device, typer.Option("--device", help="Where the model runs: CUDA when there is a GPU, else CPU.")]
Weights = Annotated[Path, typer.Argument(help=(
    "Checkpoint (.pth, a state_dict) of a supported architecture, found from its keys: milesial/Pytorch-UNet's "
    "U-Net (what unet-export train writes), the 2015 U-Net, the bilibili tutorial's, a plain one, a ResNet-50 "
    "U-Net, torchvision DeepLabV3; --model names them all."))]  # fmt: skip
ModelOpt = Annotated[str | None, typer.Option("--model", help=(
    f"Architecture, when the keys cannot tell it: {', '.join(MODELS)}."))]  # fmt: skip
# train and evaluate read the same datasets
MaskSuffix = Annotated[str, typer.Option(help="milesial layout: mask file = masks/<image stem><suffix>.<ext>.")]
MaxPixels = Annotated[int, typer.Option(min=1, help="Refuse images with more pixels (width x height) than this, "
                                        "checked from the header before decoding (decompression bombs).")]  # fmt: skip


def parse_mask_values(text: str | None) -> list | None:
    """'0,128,255' -> [0, 128, 255]; '0:0:0,255:0:0' -> [[0, 0, 0], [255, 0, 0]] (RGB masks)."""
    if text is None:
        return None
    try:
        values = [[int(c) for c in item.split(":")] if ":" in item else int(item) for item in text.split(",")]
    except ValueError:
        raise UserError(f"--mask-values {text!r}: give integers, e.g. 0,128,255 (or r:g:b for RGB masks)") from None
    grey, rgb = all(isinstance(v, int) for v in values), all(isinstance(v, list) and len(v) == 3 for v in values)
    if len(values) < 2 or not (grey or rgb):
        raise UserError(f"--mask-values {text!r}: at least two values, all grey integers or all r:g:b triplets")
    if len({str(v) for v in values}) != len(values):
        raise UserError(f"--mask-values {text!r}: values must be distinct")
    return values
