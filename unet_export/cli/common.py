"""What every command shares: the error boundary (one line, an exit code, no traceback) and the
option types, defined once as Annotated aliases."""

import functools
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from unet_export.errors import UnetExportError
from unet_export.fileio import ENVIRONMENT_ERRNOS, os_error_message

# Logs in CI are not terminals; Rich would wrap them at 80 columns and split paths and tables.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
DEBUG_ENV = "UNET_EXPORT_DEBUG"
INTERNAL_ERROR = 3  # a bug, not the user's input: never mistaken for a parity failure (1)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


Workdir = Annotated[Path, typer.Option("--workdir", "-w", help="Directory for artefacts and manifest.json.")]
DeviceOpt = Annotated[Device, typer.Option(help="Where parity runs: CUDA when there is a GPU, else CPU.")]
Weights = Annotated[Path, typer.Argument(help="Checkpoint (.pth) from milesial/Pytorch-UNet or unet-export train.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Architecture, when the keys cannot tell it.")]


MAX_MESSAGE = 600  # characters: a CI log line, not a dump


def one_line(message: str) -> str:
    """Whatever a library or runtime put in an error, the user gets one line of bounded length."""
    line = " ".join(str(message).split())
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."


def fail(message: str, code: int) -> None:
    """Print one line on stderr and leave with ``code``."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise typer.Exit(code)


def cli_errors(fn):
    """Turn expected errors into one line and their exit code; bugs into exit 3."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except UnetExportError as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:  # disk full, read-only, not a dir
                fail(os_error_message(exc), 2)
            fail(f"internal error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)", INTERNAL_ERROR)

    return wrapper
