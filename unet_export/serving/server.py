"""One tritonserver process on 127.0.0.1: start it on free ports, wait until it is ready, stop it.

Only the process this module started is ever signalled (by its PID, then its own process group,
which holds the Python-backend stubs it spawned). Its environment follows what was measured on
the nvidia-pytriton build (REFERENCE.md 9): this interpreter's bin first on PATH (the stub takes
site-packages from the first ``python3``), LD_LIBRARY_PATH at this Python's lib (a pyenv Python
otherwise meets the system libpython), and GPU metrics off (NVML errors on a CPU-only box).
"""

import ctypes
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
from pathlib import Path

from unet_export.errors import UserError
from unet_export.serving import configs
from unet_export.serving.install import TritonInstall, locate_tritonserver

HOST = "127.0.0.1"
_GLOG_ERROR = re.compile(r'^E\d{4} [\d:.]+\s+\d+ \S+\] "?(.*?)"?$')


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
                 exit_timeout: int = 10):  # fmt: skip
        self.install, self.repo, self.models = install, Path(repo).resolve(), models
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.metrics_port = free_port()
        self.startup_timeout, self.exit_timeout = startup_timeout, exit_timeout
        self.proc: subprocess.Popen | None = None
        self.log_dir: Path | None = None
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
        return args

    def start(self) -> "TritonServer":
        started = time.perf_counter()
        self.log_dir = Path(tempfile.mkdtemp(prefix="unet-export-triton-"))
        with open(self.log_path, "wb") as log:
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
        """The log's first model-load failure, else its last error line, else its last line."""
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        # CUDA lines are logged as errors on every GPU-less start and are harmless there
        errors = [m.group(1) for m in map(_GLOG_ERROR.match, lines) if m and "CUDA" not in m.group(1)
                  and "CudaDriverHelper" not in m.group(1)]  # fmt: skip
        failed = [e for e in errors if "failed to load" in e or "Invalid argument" in e]
        return (failed or errors or lines[-1:] or ["no log output"])[0][:300]

    def stop(self, keep_log: bool = False) -> None:
        """SIGINT (Triton's graceful shutdown), then SIGKILL to its process group if it hangs."""
        if self.proc is None:
            return
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
        if self.log_dir and not keep_log:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, exc_type, *_) -> None:
        self.stop(keep_log=exc_type is not None)


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
    from unet_export.serving.validate import check_repository

    found = check_repository(repo)
    install = locate_tritonserver(tritonserver)
    served, missing = servable(found, install)
    if not served:
        reasons = "; ".join(missing.values())
        raise UserError(f"this Triton build ({install.origin}) can load none of {repo}'s models: {reasons}")
    return TritonServer(install, repo, served, http_port=http_port, grpc_port=grpc_port), found, missing
