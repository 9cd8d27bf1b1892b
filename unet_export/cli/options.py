"""The option types every command shares, defined once as Annotated aliases, the version option,
and the help style (flags without a type, arguments as Click shows them)."""

import functools
import inspect
import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from unet_export.errors import UserError
from unet_export.models import ModelChoice, choices


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
    "Checkpoint (.pth or .safetensors, a state_dict) of a supported architecture, found from its keys: "
    "milesial/Pytorch-UNet's U-Net (what unet-export train writes), the 2015 U-Net, the bilibili tutorial's, a plain "
    "one, a ResNet-50 U-Net, torchvision DeepLabV3; --model names them all. Or a segmentation_models_pytorch "
    "model: its save_pretrained folder, or its state_dict with --arch and --encoder."))]  # fmt: skip
ModelOpt = Annotated[str | None, typer.Option("--model", help=(
    f"Architecture, when the keys cannot tell it: {', '.join(choices())}."))]  # fmt: skip
ArchOpt = Annotated[str | None, typer.Option("--arch", rich_help_panel="segmentation_models_pytorch", help=(
    "The smp architecture of a bare state_dict (Unet, UnetPlusPlus or Unet++, FPN, DeepLabV3Plus, Segformer, ...; "
    "what the installed smp offers); implies --model smp."))]  # fmt: skip
EncoderOpt = Annotated[str | None, typer.Option("--encoder", rich_help_panel="segmentation_models_pytorch",
                                                help="The smp encoder of a bare state_dict (resnet34, mit_b0, "
                                                "tu-<timm name>, ...); built without downloading weights.")]  # fmt: skip
ModelArgOpt = Annotated[list[str] | None, typer.Option("--model-arg", rich_help_panel="segmentation_models_pytorch",
                        metavar="KEY=VALUE", help="Another smp constructor argument of a bare state_dict (VALUE as "
                        "JSON, else text), e.g. decoder_channels=[128,64,32,16,8]; repeatable. Classes and input "
                        "channels are read from the weights. With --model-factory: a keyword argument of the factory.")]  # fmt: skip
MeanOpt = Annotated[str | None, typer.Option("--mean", rich_help_panel="segmentation_models_pytorch", metavar="R,G,B",
                    help="Normalise images to (x/255 - mean) / std with this mean (default: the smp encoder's).")]
StdOpt = Annotated[str | None, typer.Option("--std", rich_help_panel="segmentation_models_pytorch", metavar="R,G,B",
                   help="... and this std (default: the smp encoder's).")]  # fmt: skip


# Any nn.Module: a factory builds it, the checkpoint supplies its weights. Importing a factory
# runs its code, so a workdir's recorded one is imported only when the command names it again.
_FACTORY = "Any nn.Module (--model-factory)"
FactoryOpt = Annotated[str | None, typer.Option("--model-factory", rich_help_panel=_FACTORY, metavar="MODULE:CALLABLE",
                       help="Build the model by calling CALLABLE (--model-arg KEY=VALUE as its keyword arguments) "
                       "from the module MODULE (the current folder is on sys.path) or from path/to/file.py; the "
                       "checkpoint's state_dict must fit it exactly. Its classes and input sizes are asked of the "
                       "model; recorded in the manifest.")]  # fmt: skip
RebuildFactoryOpt = Annotated[str | None, typer.Option("--model-factory", rich_help_panel=_FACTORY,
                              metavar="MODULE:CALLABLE", help="The --model-factory the workdir's model was exported "
                              "with: a factory runs code, so it is imported (to rebuild the eager model) only when "
                              "named here, and a file must be unchanged since (sha256).")]  # fmt: skip
MinSizeOpt = Annotated[int | None, typer.Option("--min-size", min=1, rich_help_panel=_FACTORY, help=(
    "--model-factory: the smallest height and width the model takes (default: an smp-style encoder's output "
    "stride, else found by trying sizes)."))]  # fmt: skip
SizeMultipleOpt = Annotated[int | None, typer.Option("--size-multiple", min=1, rich_help_panel=_FACTORY, help=(
    "--model-factory: height and width must be multiples of this (default: as for --min-size)."))]  # fmt: skip
InChannelsOpt = Annotated[int | None, typer.Option("--in-channels", min=1, rich_help_panel=_FACTORY, help=(
    "--model-factory: input channels (default: the model's first convolution's)."))]  # fmt: skip


def model_choice(model: str | None, arch: str | None = None, encoder: str | None = None,
                 model_arg: list[str] | None = None, mean: str | None = None, std: str | None = None,
                 model_factory: str | None = None, min_size: int | None = None, size_multiple: int | None = None,
                 in_channels: int | None = None) -> ModelChoice:  # fmt: skip
    """--model, the smp flags and the factory's as one ModelChoice (what load_checkpoint takes);
    the parameters are named as MODEL_FLAGS names them."""
    _check_factory_flags(model, arch, encoder, model_factory, min_size=min_size, size_multiple=size_multiple,
                         in_channels=in_channels)  # fmt: skip
    options = {"arch": arch, "encoder": encoder, "smp_args": _model_args(model_arg),
               "mean": _floats("--mean", mean), "std": _floats("--std", std), "factory": model_factory,
               "min_size": min_size, "size_multiple": size_multiple, "in_channels": in_channels}  # fmt: skip
    return ModelChoice(model, {k: v for k, v in options.items() if v})


# The flags that configure a model its keys cannot name, in the order help lists them.
MODEL_FLAGS = {"arch": ArchOpt, "encoder": EncoderOpt, "model_arg": ModelArgOpt, "mean": MeanOpt, "std": StdOpt,
               "model_factory": FactoryOpt, "min_size": MinSizeOpt, "size_multiple": SizeMultipleOpt,
               "in_channels": InChannelsOpt}  # fmt: skip


def with_model_flags(var: str = "model"):
    """Give a command the MODEL_FLAGS after its ``var`` (--model) parameter, declared once here;
    the command receives ``var`` as the ModelChoice they make. Typer reads the signature."""

    def decorate(command):
        signature = inspect.signature(command)
        params = list(signature.parameters.values())
        at = [p.name for p in params].index(var) + 1
        flags = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=kind)
                 for name, kind in MODEL_FLAGS.items()]  # fmt: skip

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            given = {name: kwargs.pop(name, None) for name in MODEL_FLAGS}
            kwargs[var] = model_choice(kwargs.get(var), **given)
            return command(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=params[:at] + flags + params[at:])
        wrapper.__annotations__ = dict(command.__annotations__) | MODEL_FLAGS
        return wrapper

    return decorate


def _check_factory_flags(model, arch, encoder, factory, **sizes) -> None:
    given = [f"--{name.replace('_', '-')}" for name, value in sizes.items() if value]
    if given and not factory:
        verb = "apply" if len(given) > 1 else "applies"
        raise UserError(f"{' and '.join(given)} {verb} to a --model-factory model: smp and the known architectures "
                        "say their own")  # fmt: skip
    if factory and (arch or encoder):
        raise UserError("--arch and --encoder name an smp model; --model-factory builds its own: pass one of them")
    if factory and model not in (None, "factory"):
        raise UserError(f"--model {model} and --model-factory both name the model: pass one of them")


def _model_args(items: list[str] | None) -> dict:
    args = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--model-arg {item!r}: give KEY=VALUE, e.g. encoder_depth=4")
        try:
            args[key] = json.loads(text)
        except json.JSONDecodeError:
            args[key] = text
    return args


def _floats(flag: str, text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give numbers, one per channel, e.g. 0.485,0.456,0.406") from None
    if flag == "--std" and any(v <= 0 for v in values):
        raise UserError(f"--std {text!r}: every value must be above 0")
    return values
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
