"""A Ray cluster of several nodes on this machine, on loopback only, for the tests and
benchmarks/predict.py, and the loopback pinning `predict --ray` uses for a local instance.

Why not `ray start`: Ray 2.60 rewrites 127.0.0.1 to the machine's routable address wherever a
node or a bootstrap address is given (services.resolve_ip_for_localhost), so `ray start
--node-ip-address=127.0.0.1` nodes advertise (and listen on) the other address, and a worker
told to join 127.0.0.1 dials the routable one and hangs (measured here). Ray keeps to loopback
only in its single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, what it does on macOS),
where `ray start` refuses worker nodes. So the nodes are started with ray.cluster_utils.Cluster,
the utility Ray's own multi-node tests use: a head and workers, each its own raylet and object
store, all at 127.0.0.1, owned by one keeper process (`python -m unet_export.predict.ray_local`).
On exit the keeper shuts them down, then every process that carries the cluster's private HOME
is stopped by PID."""

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

START_TIMEOUT = 180  # seconds for the whole cluster to come up
SOCKET_ROOM = 40  # the longest --temp-dir path that leaves Ray's socket paths under 108 bytes
SINGLE_MACHINE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray's loopback-only mode


def pin_to_loopback() -> None:
    """Ray in this process (and what it starts) uses 127.0.0.1 as its node address. The
    constant is read at call time; the environment carries it to the processes Ray starts."""
    os.environ.update(SINGLE_MACHINE)
    if "ray" in sys.modules:
        import ray._private.ray_constants as constants

        constants.ENABLE_RAY_CLUSTER = False


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_env(home: Path, token: str | None = None) -> dict:
    """Token auth with a fresh token, loopback only, and a private HOME: nothing shared with
    another Ray on this machine, and what the cluster started is known by its HOME."""
    Path(home).mkdir(parents=True, exist_ok=True)
    return {**os.environ, **SINGLE_MACHINE, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token or secrets.token_hex(16),
            "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip


@contextmanager
def loopback_cluster(tmp: Path, nodes: int = 2, cpus: int = 2) -> Iterator[tuple[str, dict]]:
    """(address, env for a driver) of a head plus ``nodes - 1`` workers, each at 127.0.0.1."""
    import psutil

    env = ray_env(tmp / "home")
    before = {p.pid for p in psutil.process_iter()}
    sessions = _sessions_dir()
    log = open(tmp / "keeper.log", "w")
    keeper = subprocess.Popen([sys.executable, "-m", "unet_export.predict.ray_local", "--nodes", str(nodes), "--cpus",
                               str(cpus), "--temp-dir", str(sessions)], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    try:
        address = _address(keeper, tmp / "keeper.log")
        yield address, env
    finally:
        keeper.stdin.close()  # the keeper's cue to shut the cluster down
        try:
            keeper.wait(timeout=60)
        except subprocess.TimeoutExpired:
            keeper.kill()
        _stop([p for p in psutil.process_iter() if p.pid not in before and _ours(p, env)])
        log.close()
        shutil.rmtree(sessions, ignore_errors=True)


def _sessions_dir() -> Path:
    """A fresh folder for everything Ray writes (the keeper's --temp-dir), under $TMPDIR when its
    path is short enough: Ray's session folders hold Unix sockets, whose paths stay under 108 bytes
    ("<here>/session_<26-char date>_<pid>/sockets/plasma_store.1" leaves about 40 for <here>)."""
    root = tempfile.gettempdir()
    fits = len(root) + len("/ray-12345678") <= SOCKET_ROOM  # mkdtemp adds 8 random characters
    return Path(tempfile.mkdtemp(prefix="ray-", dir=root if fits else "/tmp"))


def _address(keeper: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        line = keeper.stdout.readline()
        if line.startswith("address "):
            return line.split()[1]
        if not line and keeper.poll() is not None:
            tail = " ".join(log.read_text().split()[-60:])
            raise RuntimeError(f"the Ray cluster keeper exited {keeper.returncode} before the cluster was up: {tail}")
    raise RuntimeError(f"the Ray cluster was not up after {START_TIMEOUT} s")


def _ours(proc, env: dict) -> bool:
    import psutil

    try:
        return proc.pid != os.getpid() and proc.environ().get("HOME") == env["HOME"]
    except psutil.Error:
        return False


def _stop(started) -> None:
    """SIGTERM what is left of the cluster, then SIGKILL what is left after 20 s."""
    import psutil

    for proc in started:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(started, timeout=20)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _keep() -> None:
    """The keeper: start the nodes, print the address, hold them until stdin closes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--temp-dir", required=True)
    args = parser.parse_args()
    pin_to_loopback()
    _own_default_temp_dir(Path(args.temp_dir))
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus, "include_dashboard": False,
                                                            "temp_dir": args.temp_dir})  # fmt: skip
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.cpus)
        cluster.wait_for_nodes()
        print(f"address {cluster.address}", flush=True)
        sys.stdin.read()  # until the owner closes it (or dies)
    finally:
        cluster.shutdown()


def _own_default_temp_dir(temp_dir: Path) -> None:
    """Cluster writes `ray_current_cluster` under Ray's machine-wide default temp dir
    ($RAY_TMPDIR, else $TMPDIR, else /tmp, plus `ray/`), whatever temp_dir its nodes get: on a
    machine where that folder does not exist yet it died (FileNotFoundError), and where it does,
    any plain ray.init() there would join the test cluster. Pointed at the keeper's own folder,
    the file is private and goes when the folder does."""
    os.environ["RAY_TMPDIR"] = str(temp_dir)
    (temp_dir / "ray").mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    _keep()
