"""What every command shares: the console, the progress lines of long steps, and the error
boundary (one line, an exit code, no traceback). The option types live in cli/options.py."""

import errno
import functools
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager

import typer
from rich.console import Console

from unet_export.errors import UnetExportError
from unet_export.fileio import ENVIRONMENT_ERRNOS, os_error_message

# Logs in CI are not terminals; Rich would wrap them at 80 columns and split paths and tables.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
DEBUG_ENV = "UNET_EXPORT_DEBUG"
INTERNAL_ERROR = 3  # a bug, not the user's input: never mistaken for a parity failure (1)


@contextmanager
def working(step: str, what: str, spinner: bool = True):
    """A long step (compiling, calibrating, building, timing) is never silent. On a terminal: a
    transient spinner. Elsewhere (a CI log) a spinner shows nothing, and `verify` sat silent for
    80 s: a plain line when the step starts and one with its duration when it ends. Both on stdout,
    with everything else the command says: stderr keeps the contract's one error line, and no
    command that prints JSON on stdout runs a step through here. ``spinner=False``: the step draws
    its own live display on a terminal (train's progress bar), so only the plain lines."""
    if console.is_terminal:
        if not spinner:
            yield
            return
        with console.status(f"{what}...", spinner="dots"):
            yield
        return
    _plain(f"{step}: {what} ...")
    began = time.perf_counter()
    try:
        yield
    except BaseException:
        _plain(f"{step}: stopped after {time.perf_counter() - began:.1f} s")
        raise
    _plain(f"{step}: done in {time.perf_counter() - began:.1f} s")


def _plain(line: str) -> None:
    """Printed and flushed at once: a piped stdout is block-buffered, and a start line that reaches
    the log only when the step ends says nothing."""
    console.print(line, markup=False)
    console.file.flush()


MAX_MESSAGE = 600  # characters: a CI log line, not a dump


def one_line(message: str) -> str:
    """Whatever a library or runtime put in an error, the user gets one line of bounded length."""
    line = " ".join(str(message).split())
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."


def fail(message: str, code: int) -> None:
    """Print one line on stderr and leave with ``code`` (inside a command: through Typer)."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise typer.Exit(code)


def _leave(message: str, code: int) -> None:
    """``fail`` outside any command, where there is no Typer to turn Exit into a status."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def _traceback_if_debug() -> None:
    """UNET_EXPORT_DEBUG=1 shows the traceback, and the exit code stays the contract's (a bug
    still exits 3, not Python's 1)."""
    if os.environ.get(DEBUG_ENV):
        traceback.print_exc()


def _click_exceptions():
    """Typer >= 0.22 vendors Click as typer._click; older releases use Click itself."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _closed_pipe(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EPIPE


def _leave_quietly_after_a_closed_pipe() -> None:
    """Help (or another print of Click's own, which writes past sys.stdout) into `| head -1`: the
    reader took what it wanted and left. No message, exit 0: nothing was judged. stdout goes to
    devnull, as the Python docs advise, so the flush at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(0)


class _StdoutReaderMayLeave:
    """sys.stdout for a reader that may leave early (`unet-bench | head`): after EPIPE the rest of
    the output goes to devnull and the command runs on to its own exit code. Ending at the closed
    pipe with exit 0 would let a gate that `head` cut short read as passed."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # what is still buffered is flushed there, harmlessly
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def run_app(app: typer.Typer) -> None:
    """Run a Typer app with usage errors (a bad option value, a missing argument) as one line and
    exit 2, like every other bad input, instead of a multi-line box; a closed stdout is no error:
    the command runs on (its output to devnull) to its own exit code."""
    if sys.stdout is not None and not isinstance(sys.stdout, _StdoutReaderMayLeave):
        sys.stdout = _StdoutReaderMayLeave(sys.stdout)
    try:
        _run(app)
    except BrokenPipeError:  # from our own prints here (a bare command's help)
        _leave_quietly_after_a_closed_pipe()
    except SystemExit as exc:
        # Typer turns EPIPE while printing (help, or a command's output) into exit 1.
        if exc.code == 1 and _closed_pipe(exc.__context__):
            _leave_quietly_after_a_closed_pipe()
        raise


def _run(app: typer.Typer) -> None:
    errors = _click_exceptions()
    try:
        code = app(standalone_mode=False)  # returns typer.Exit's code instead of exiting
    except errors.UsageError as exc:
        if type(exc).__name__.startswith("NoArgsIsHelp"):  # a bare command prints its help
            print(exc.format_message())
            sys.exit(exc.exit_code)
        hint = f" (see {exc.ctx.command_path} --help)" if getattr(exc, "ctx", None) else ""
        _leave(f"{exc.format_message()}{hint}", 2)
    except errors.ClickException as exc:
        _leave(exc.format_message(), exc.exit_code)
    except typer.Abort:
        _leave("aborted", 130)
    sys.exit(code if isinstance(code, int) else 0)


class Stopped(KeyboardInterrupt):
    """SIGTERM, or Ctrl-C, arriving as KeyboardInterrupt so the command's cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def stop_on_signals():
    """Inside the block Ctrl-C and SIGTERM (kill PID, docker stop, a CI job cancelled) stop a long
    run the way Ctrl-C does: started writes finish, the report is written, exit 128 + signal.
    Installed explicitly: a launcher that starts us with SIGINT ignored (`cmd &` in a script)
    leaves Python no Ctrl-C handler, and predict then ran to the end (tests/predict/test_predict_pipeline.py)."""

    def stop(signum, _frame):
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exit_status(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line the error boundary gives ``exc`` (typer.Exit: its own code,
    no line). One mapping, read by cli_errors and by a command's --json result alike."""
    if isinstance(exc, typer.Exit):
        return exc.exit_code, ""
    if isinstance(exc, UnetExportError):
        return exc.exit_code, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        signum = getattr(exc, "signum", signal.SIGINT)
        return 128 + signum, "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:  # disk full, read-only, not a dir
        return 2, os_error_message(exc)
    if isinstance(exc, _click_exceptions().ClickException):  # typer.BadParameter from a command's check
        return 2, exc.format_message()
    return INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)"


def cli_errors(fn):
    """Turn expected errors into one line and their exit code; bugs into exit 3."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:  # stdout closed by its reader: run_app ends quietly, not a bug
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if not isinstance(exc, KeyboardInterrupt):
                _traceback_if_debug()
            code, message = exit_status(exc)
            fail(message, code)

    return wrapper
