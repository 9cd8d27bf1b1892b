"""One tritonserver process on 127.0.0.1: start it on free ports, wait until it is ready, stop it.

Only the process this module started is ever signalled (by its PID, then its own process group,
which holds the Python-backend stubs it spawned). Its environment follows what was measured on
the nvidia-pytriton build (REFERENCE.md 9): this interpreter's bin first on PATH (the stub takes
site-packages from the first ``python3``), LD_LIBRARY_PATH at this Python's lib (a pyenv Python
otherwise meets the system libpython), and GPU metrics off (NVML errors on a CPU-only box).

One request can abort tritonserver 2.51 (REFERENCE.md 13): HTTP/JSON inputs are allocated at the
size their shape declares before the data is read, so ``[1,3,100000,100000]`` with one element
asks for 120 GB (std::bad_alloc, SIGABRT). That build has no option that bounds a request's
input (``--http-max-input-size`` came with later releases; it is passed where the binary lists
it), and the binary and gRPC paths already refuse a size that does not match the data. So
``keep_serving`` restarts a server that exits on its own, on the same ports, within seconds.
"""

import ctypes
import functools
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from unet_export.errors import UserError
from unet_export.serving import configs
from unet_export.serving.install import TritonInstall, locate_tritonserver
from unet_export.serving.validate import check_repository

HOST = "127.0.0.1"
_GLOG_ERROR = re.compile(r'^E\d{4} [\d:.]+\s+\d+ \S+\] "?(.*?)"?$')
_FATAL = re.compile(r"^(terminate called .*|\s*what\(\):.*)$")  # an uncaught C++ exception's last words
RESTART_DELAYS_S = (0.5, 1.0, 2.0, 4.0)  # before each restart of a series of quick crashes; the last repeats
STABLE_S = 60.0  # a server that served this long before exiting starts the series again
HTTP_DEFAULT_MAX_INPUT = 64 << 20  # the later releases' own default for --http-max-input-size


def free_port() -> int:
    """A port nothing listens on right now (the kernel picks it; the server binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
    return env


def _die_with_parent() -> None:
    """In the child: SIGTERM it when the process that started it dies (even by SIGKILL), so a
    killed `unet-export` never leaves a server behind."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class TritonServer:
    """``with TritonServer(install, repo, models) as server:`` serves ``models`` (all that
    ``repo`` holds when None) and always stops, also when the block fails."""

    def __init__(self, install: TritonInstall, repo: Path, models: list[str] | None = None, *,
                 http_port: int | None = None, grpc_port: int | None = None, startup_timeout: float = 120.0,
                 exit_timeout: int = 10, max_input_bytes: int | None = None):  # fmt: skip
        self.install, self.repo, self.models = install, Path(repo).resolve(), models
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.metrics_port = free_port()
        self.startup_timeout, self.exit_timeout = startup_timeout, exit_timeout
        self.max_input_bytes = max_input_bytes
        self.proc: subprocess.Popen | None = None
        self.log_dir: Path | None = None
        self.log_from = 0  # where this run's lines start in the log (a restart appends to it)
        self.started_in: float | None = None
        self.stopped_in: float | None = None

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / "tritonserver.log"

    def command(self) -> list[str]:
        args = [str(self.install.binary), f"--model-repository={self.repo}",
                f"--backend-directory={self.install.backend_dir}", f"--http-address={HOST}",
                f"--http-port={self.http_port}", f"--grpc-address={HOST}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={HOST}", f"--metrics-port={self.metrics_port}", "--allow-gpu-metrics=false",
                f"--exit-timeout-secs={self.exit_timeout}", "--strict-readiness=true"]  # fmt: skip
        if self.models is not None:  # only these: the others need backends this build may lack
            args += ["--model-control-mode=explicit"] + [f"--load-model={name}" for name in self.models]
        if self.max_input_bytes and "--http-max-input-size" in help_flags(self.install.binary):
            args.append(f"--http-max-input-size={self.max_input_bytes}")  # refused before it is allocated
        return args

    def start(self) -> "TritonServer":
        started = time.perf_counter()
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="unet-export-triton-"))
        with open(self.log_path, "ab") as log:
            self.log_from = log.tell()
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=server_env(),
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_log=True)
            raise
        self.started_in = time.perf_counter() - started
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"tritonserver exited during start-up (code {self.proc.returncode}): "
                                f"{self.first_error()} (log: {self.log_path})")  # fmt: skip
            if self.is_ready():
                return
            time.sleep(0.2)
        raise UserError(f"tritonserver was not ready after {self.startup_timeout:.0f} s: {self.first_error()} "
                        f"(log: {self.log_path})")  # fmt: skip

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def first_error(self) -> str:
        """This run's first model-load failure, else its first error line, else the C++ exception
        that aborted it, else its last line."""
        lines = self._run_log().splitlines()
        # CUDA lines are logged as errors on every GPU-less start and are harmless there
        errors = [m.group(1) for m in map(_GLOG_ERROR.match, lines) if m and "CUDA" not in m.group(1)
                  and "CudaDriverHelper" not in m.group(1)]  # fmt: skip
        failed = [e for e in errors if "failed to load" in e or "Invalid argument" in e]
        fatal = " ".join(" ".join(m.group(1).split()) for m in map(_FATAL.match, lines) if m)
        return (failed or errors or [fatal] * bool(fatal) or lines[-1:] or ["no log output"])[0][:300]

    def _run_log(self) -> str:
        if self.log_dir is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(self.log_from)
            return log.read().decode(errors="replace")

    def exit_reason(self) -> str:
        """How the (exited) server ended, and the log line that says why."""
        code = self.proc.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return f"{how} ({self.first_error()})"

    def restart(self) -> "TritonServer":
        """A new server on the same ports and log, after this one exited on its own; what it
        left in its process group (Python-backend stubs) is killed first."""
        self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own group (start_new_session), never another
        except ProcessLookupError:
            pass  # the stubs followed their server out
        self.proc = None
        return self.start()

    def stop(self, keep_log: bool = False) -> None:
        """SIGINT (Triton's graceful shutdown), then SIGKILL to its process group if it hangs."""
        if self.proc is not None:
            began = time.perf_counter()
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=self.exit_timeout + 10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the group is the server's own (start_new_session)
                    self.proc.wait(timeout=10)
            self.stopped_in = time.perf_counter() - began
            self.proc = None
        if self.log_dir and not keep_log:  # also after a restart that was interrupted
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, exc_type, *_) -> None:
        self.stop(keep_log=exc_type is not None)


def keep_serving(server: TritonServer, say: Callable[[str], None], *, poll_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Serve until interrupted (KeyboardInterrupt: Ctrl-C, or SIGTERM under stop_on_signals).
    A server that exits on its own (a request that aborts it, the OOM killer) is restarted on
    the same ports after RESTART_DELAYS_S, each step said; a restart that fails to start raises
    the UserError of its start-up."""
    crashes, up_since = 0, clock()
    while True:
        while server.proc.poll() is None:
            sleep(poll_s)
        crashes = 1 if clock() - up_since >= STABLE_S else crashes + 1
        delay = RESTART_DELAYS_S[min(crashes, len(RESTART_DELAYS_S)) - 1]
        say(f"tritonserver (pid {server.proc.pid}) exited on its own: {server.exit_reason()}; restarting in "
            f"{delay:g} s (log: {server.log_path})")  # fmt: skip
        sleep(delay)
        server.restart()
        up_since = clock()
        say(f"tritonserver restarted (pid {server.proc.pid}) in {server.started_in:.1f} s, serving "
            f"{', '.join(server.models or ['the repository'])}")  # fmt: skip


@functools.cache
def help_flags(binary: Path) -> frozenset[str]:
    """The options a tritonserver binary lists in its --help (which ones depends on its release)."""
    try:
        proc = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30, env=server_env())
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(re.findall(r"(?m)^\s*(--[a-z0-9-]+)", proc.stdout + proc.stderr))


_ITEM_BYTES = {"FP32": 4, "FP16": 2, "BF16": 2, "INT32": 4, "INT64": 8, "UINT8": 1, "UINT16": 2}


def max_input_bytes(configs_by_name: dict, served: list[str]) -> int:
    """The largest input a served model takes: its max batch of images of DEFAULT_MAX_PIXELS (the
    largest image any unet-export command decodes) where H and W are free, at least the later
    releases' default limit. Passed as --http-max-input-size where the binary has it."""
    from unet_export.data.images import DEFAULT_MAX_PIXELS  # loads torch: not at the server's import

    largest = HTTP_DEFAULT_MAX_INPUT
    pb, _ = configs.protobuf()
    for config in (configs_by_name[name] for name in served):
        total = 0
        for tensor in config.input:
            pixels = DEFAULT_MAX_PIXELS if -1 in tensor.dims else 1
            items = max(config.max_batch_size, 1) * math.prod(d for d in tensor.dims if d > 0) * pixels
            total += items * _ITEM_BYTES.get(pb.DataType.Name(tensor.data_type).removeprefix("TYPE_"), 8)
        largest = max(largest, total)
    return largest


def servable(found: dict, install: TritonInstall) -> tuple[list[str], dict[str, str]]:
    """(models this build can load, {model: why not}). An ensemble needs all its steps."""
    served, missing = [], {}
    for name, config in found.items():
        backend = configs.backend_of(config)
        if backend and backend not in install.backends:
            missing[name] = (f"backend {backend!r} is not in this Triton build ({install.origin}, backends: "
                             f"{', '.join(sorted(install.backends))}): serve it with Triton's container image")  # fmt: skip
        else:
            served.append(name)
    for name in [n for n in served if found[n].platform == "ensemble"]:
        absent = [s.model_name for s in found[name].ensemble_scheduling.step if s.model_name in missing]
        if absent:
            served.remove(name)
            missing[name] = f"its step {absent[0]} cannot be served by this build"
    return served, missing


def repository_server(repo: Path, tritonserver: str | Path | None = None, http_port: int | None = None,
                      grpc_port: int | None = None) -> tuple[TritonServer, dict, dict[str, str]]:  # fmt: skip
    """(a server, not started, for every model of the checked repository ``repo`` that this
    build can load; the parsed configs; {model: why it is not loaded})."""
    found = check_repository(repo)
    install = locate_tritonserver(tritonserver)
    served, missing = servable(found, install)
    if not served:
        reasons = "; ".join(missing.values())
        raise UserError(f"this Triton build ({install.origin}) can load none of {repo}'s models: {reasons}")
    server = TritonServer(install, repo, served, http_port=http_port, grpc_port=grpc_port,
                          max_input_bytes=max_input_bytes(found, served))  # fmt: skip
    return server, found, missing
