"""Where the ``tritonserver`` binary comes from.

NVIDIA publishes no tritonserver on the package registry except inside the ``nvidia-pytriton``
wheel (Triton 2.51, Python backend only). That wheel pins numpy<2 and this project locks numpy 2,
so it is never installed: ``pip download`` fetches the wheel, its sha256 is checked against the
one recorded here, and only the server, the Python backend, its stubs and the bundled shared
libraries are extracted into the cache. ``--tritonserver PATH`` (or UNET_EXPORT_TRITONSERVER)
uses an existing binary instead, e.g. /opt/tritonserver/bin/tritonserver in Triton's container.
"""

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from unet_export.errors import UserError
from unet_export.fileio import sha256_file

PYTRITON_VERSION = "0.7.0"
PYTRITON_WHEEL = "nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl"
PYTRITON_SHA256 = "21f063ff93bb426d0c06b7a55e7eb9efcfe62c0dddd9a908e9877e18710128df"
TRITON_VERSION = "2.51"  # the tritonserver that nvidia-pytriton 0.7.0 bundles
BINARY_ENV = "UNET_EXPORT_TRITONSERVER"
CACHE_ENV = "UNET_EXPORT_CACHE"

# What the server needs from the wheel; the rest (pytriton's own Python code) is never extracted.
_MEMBERS = ("pytriton/tritonserver/bin/", "pytriton/tritonserver/backends/python/",
            "pytriton/tritonserver/python_backend_stubs/", "nvidia_pytriton.libs/")  # fmt: skip
_STUB = "triton_python_backend_stub"
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path  # holds one folder per backend (python/, onnxruntime/, ...)
    origin: str  # where it came from, for reports
    version: str | None = None
    backends: frozenset[str] = field(default_factory=frozenset)


def cache_dir() -> Path:
    """$UNET_EXPORT_CACHE, else the XDG cache: survives `make clean` and is shared by checkouts."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unet-export"


def locate_tritonserver(path: str | Path | None = None, fetch: bool = True) -> TritonInstall:
    """``path``, else $UNET_EXPORT_TRITONSERVER, else the cached nvidia-pytriton server (fetched
    on first use when ``fetch``)."""
    given = path or os.environ.get(BINARY_ENV)
    if given:
        binary = Path(given).expanduser().resolve()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise UserError(f"tritonserver {given} is not an executable file")
        return _install_for(binary, f"{given}")
    root = cache_dir() / f"tritonserver-{TRITON_VERSION}"
    if not (root / "pytriton/tritonserver/bin/tritonserver").is_file():
        if not fetch:
            raise UserError(f"no tritonserver in {root}: run `unet-export serve` once with the package registry "
                            f"reachable, or pass --tritonserver PATH")  # fmt: skip
        fetch_pytriton(root)
    return _install_for(root / "pytriton/tritonserver/bin/tritonserver", f"nvidia-pytriton {PYTRITON_VERSION}",
                        TRITON_VERSION)  # fmt: skip


def _install_for(binary: Path, origin: str, version: str | None = None) -> TritonInstall:
    """A Triton install keeps the stub in backends/python/; the pytriton layout keeps it apart,
    so a backend folder of symlinks is made (copies break the libraries' relative RPATHs)."""
    home = binary.parent.parent
    if (home / "backends/python" / _STUB).is_file():
        backend_dir = home / "backends"
    elif (home / "backends/python/libtriton_python.so").is_file():
        backend_dir = _symlinked_backends(home)
    else:
        raise UserError(f"no Python backend beside {binary} (looked for {home / 'backends/python'}); pass the "
                        f"tritonserver of a Triton install or of the nvidia-pytriton wheel")  # fmt: skip
    backends = frozenset(p.name for p in backend_dir.iterdir() if p.is_dir())
    return TritonInstall(binary, backend_dir, origin, version, backends)


def _symlinked_backends(home: Path) -> Path:
    """backends-py3.X/python/ -> the backend library, its utils and the stub for this Python
    (the stub runs the model code in this interpreter's environment)."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / py / _STUB
    if not stub.is_file():
        raise UserError(f"{home} has no Python backend stub for Python {py}; run unet-export with Python 3.8-3.13")
    folder = home / f"backends-py{py}"
    target = folder / "python"
    if not (target / _STUB).exists():
        target.mkdir(parents=True, exist_ok=True)
        links = {name: home / "backends/python" / name for name in _PYTHON_BACKEND_FILES} | {_STUB: stub}
        for name, source in links.items():
            link = target / name
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(source, target))
    return folder


def fetch_pytriton(root: Path) -> None:
    """Download the wheel with pip, check its sha256, extract what the server needs into ``root``
    (a temp folder renamed into place; concurrent fetches wait on a lock)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".tritonserver.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "pytriton/tritonserver/bin/tritonserver").is_file():
            return  # another process fetched it while this one waited
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
            wheel = download_wheel(Path(tmp))
            staged = Path(tmp) / "extracted"
            extract_server(wheel, staged)
            shutil.rmtree(root, ignore_errors=True)
            os.replace(staged, root)


def download_wheel(dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", f"nvidia-pytriton=={PYTRITON_VERSION}", "-d", str(dest)]  # fmt: skip
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        proc = None
    wheel = dest / PYTRITON_WHEEL
    if proc is None or proc.returncode != 0 or not wheel.is_file():
        why = "timed out" if proc is None else (proc.stderr.strip().splitlines() or ["no wheel for this platform"])[-1]
        raise UserError(f"cannot fetch nvidia-pytriton {PYTRITON_VERSION} (which bundles tritonserver "
                        f"{TRITON_VERSION}) from the package registry: {why}; pass --tritonserver PATH or set "
                        f"{BINARY_ENV}")  # fmt: skip
    verify_wheel(wheel)
    return wheel


def verify_wheel(wheel: Path, expected: str = PYTRITON_SHA256) -> None:
    found = sha256_file(wheel)
    if found != expected:
        raise UserError(f"{wheel.name} has sha256 {found}, not the recorded {expected}: refusing to run it")


def extract_server(wheel: Path, dest: Path) -> None:
    """The members the server needs, with their executable bits (zipfile drops them)."""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.is_dir() or not info.filename.startswith(_MEMBERS):
                continue
            target = dest / info.filename
            if not target.resolve().is_relative_to(dest.resolve()):
                raise UserError(f"{wheel.name}: member {info.filename} escapes the extraction folder")
            archive.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o755  # the wheel marks the binary world-writable
            if mode:
                os.chmod(target, mode | stat.S_IRUSR)

