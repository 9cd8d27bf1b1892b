"""The error types the CLI turns into an exit code and one line (no traceback).

Exit codes are the contract with release CI: 0 all verified, 1 an artefact failed parity or
accuracy (or could not be produced), 2 bad input or a missing runtime. Anything else that
escapes is a bug: exit 3, with the traceback shown when UNET_EXPORT_DEBUG=1.
"""

import importlib


class UnetExportError(Exception):
    """Base for expected failures; ``exit_code`` says how the CLI leaves."""

    exit_code = 2


class UserError(UnetExportError):
    """Bad input or environment: a missing or corrupt file, a wrong shape, a missing runtime."""

    exit_code = 2


class IntegrityError(UserError):
    """An artefact recorded in the manifest is missing or is not the file that was verified.
    Never a benchmark row marked unavailable: whatever reads it stops with exit 2."""


class EagerUnavailable(UserError):
    """The eager model cannot be rebuilt here (its factory is not importable or not trusted, smp is missing): artefacts are judged against their recorded references."""


class ArtifactError(UnetExportError):
    """An artefact could not be produced from valid input (the exporter itself failed)."""

    exit_code = 1


def require(module: str, pip_name: str | None = None, extra: str | None = None):
    """Import an optional dependency, or raise a UserError with the exact install line."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f'pip install "unet-export[{extra}]"' if extra else f"pip install {pip_name or module}"
        raise UserError(f"{module} is not installed ({exc}); install it with: {hint}") from exc
