"""`unet-export doctor`: what this machine can run, and why not.

Each check returns rows and never raises: a missing package, a missing driver or a check's own
bug becomes a row that says why, so a broken machine still gets a whole report (the command
always exits 0). Heavy packages are imported inside the checks, never at import time.
"""

import platform
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from unet_export import lockcheck
from unet_export.errors import UserError

OK, MISSING, WARN = "ok", "missing", "warn"
OPENVINO_INSTALL = 'pip install "unet-export[openvino]"'
SMP_INSTALL = 'pip install "unet-export[smp]"'
ORT_GPU_INSTALL = 'pip install "unet-export[gpu]"'
TOOLCHAIN_INSTALL = "apt-get install cmake g++"  # the line build_example gives


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, MISSING or WARN
    detail: str  # the value when OK, else why not and what to do

    def to_dict(self) -> dict:
        return asdict(self)


# --- Python and the machine ---


def check_python() -> list[Check]:
    impl = platform.python_implementation()
    return [
        Check("python", OK, f"{platform.python_version()} ({impl}, {sys.executable})"),
        Check("platform", OK, platform.platform()),
    ]


def check_cpu() -> list[Check]:
    import os

    from unet_export.device import cpu_name, physical_cores  # loads torch, which check_torch reports on

    return [Check("cpu", OK, f"{cpu_name()}, {physical_cores()} physical cores ({os.cpu_count()} logical)")]


# --- torch and CUDA ---


def check_torch() -> list[Check]:
    import torch

    rows = [Check("torch", OK, torch.__version__)]
    if not torch.version.cuda:
        rows.append(Check("cuda", MISSING, "torch is a CPU-only build: no CUDA, TensorRT or GPU benchmarks here"))
    elif torch.cuda.is_available():
        rows.append(Check("cuda", OK, f"CUDA {torch.version.cuda} build, {torch.cuda.device_count()} GPU(s) visible"))
    else:
        rows.append(Check("cuda", MISSING, f"CUDA {torch.version.cuda} build, but no GPU: {_no_gpu_reason(torch)}"))
    return rows + _gpu_rows(torch) + [_cudnn_row(torch)]


def _no_gpu_reason(torch) -> str:
    """torch.cuda.is_available() only says False; initialising says why (no driver, hidden devices)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.cuda.init()
        except Exception as exc:  # RuntimeError "Found no NVIDIA driver on your system. Please check ..."
            return str(exc).split(". ")[0].strip().rstrip(".")
    return "torch.cuda.is_available() is False"


def _gpu_rows(torch) -> list[Check]:
    if not torch.cuda.is_available():
        return [Check("gpu", MISSING, "no CUDA GPU visible")]
    rows = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        major, minor = torch.cuda.get_device_capability(index)
        detail = f"{props.name}, compute capability {major}.{minor}, {props.total_memory / 2**30:.1f} GiB"
        rows.append(Check(f"gpu {index}", OK, detail))
    return rows


def _cudnn_row(torch) -> Check:
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if not version:
        return Check("cudnn", MISSING, "torch has no cuDNN (a CPU-only build)")
    # cuDNN 9 encodes major*10000 + minor*100 + patch; cuDNN 8 and older major*1000 + minor*100 + patch.
    major, rest = divmod(version, 10000 if version >= 90000 else 1000)
    return Check("cudnn", OK, f"{major}.{rest // 100}.{rest % 100}")


def _gpu_name() -> str | None:
    """The first GPU's name and sm, or None: TensorRT and ORT's rows depend on it."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{torch.cuda.get_device_name(0)} (sm {major}.{minor})"
    except Exception:
        pass
    return None


# --- runtimes ---


def check_tensorrt() -> list[Check]:
    from unet_export.runtimes.tensorrt.build import import_tensorrt

    try:
        trt = import_tensorrt()
    except UserError as exc:
        return [Check("tensorrt", MISSING, str(exc))]
    gpu = _gpu_name()
    if gpu is None:
        return [Check("tensorrt", WARN, f"TensorRT {trt.__version__} is installed, but there is no CUDA GPU: "
                      "engines cannot be built or run here")]  # fmt: skip
    return [Check("tensorrt", OK, f"TensorRT {trt.__version__}, builds engines for {gpu}")]


def check_onnxruntime() -> list[Check]:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    detail = f"{ort.__version__}, providers: {', '.join(providers)}"
    if _gpu_name() and "CUDAExecutionProvider" not in providers:
        return [Check("onnxruntime", WARN, f"{detail}; no CUDAExecutionProvider for this GPU: {ORT_GPU_INSTALL}")]
    return [Check("onnxruntime", OK, detail)]


def check_openvino() -> list[Check]:
    try:
        import openvino as ov
    except ImportError as exc:
        return [Check("openvino", MISSING, f"not installed ({exc}): {OPENVINO_INSTALL}")]
    # "2026.4.1-22982-e213a147257-releases/2026/4": the release is what the lock pins
    version = (getattr(ov, "__version__", None) or ov.get_version()).split("-", 1)[0]
    return [Check("openvino", OK, f"{version}, devices: {', '.join(ov.Core().available_devices) or 'none'}")]


def check_smp() -> list[Check]:
    """segmentation_models_pytorch: what loads smp models (save_pretrained folders, --arch)."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError as exc:
        return [Check("smp", MISSING, f"not installed ({exc}): {SMP_INSTALL}")]
    return [Check("smp", OK, f"segmentation_models_pytorch {smp.__version__}, {len(smp.MODEL_ARCHITECTURES_MAPPING)} "
                  "architectures")]  # fmt: skip


# --- the libtorch C++ example (unet-export cpp-check) ---


def check_toolchain() -> list[Check]:
    standard, rows = _cxx_standard()
    for tool in ("cmake", "c++"):
        path = shutil.which(tool)
        if path is None:
            rows.append(Check(tool, MISSING, f"{tool} is not installed: {TOOLCHAIN_INSTALL} to build the C++ example"))
            continue
        row = Check(tool, OK, f"{_version_line(path)} ({path})")
        if tool == "c++" and standard:
            row = _check_standard(row, path, standard)
        rows.append(row)
    return rows


def _cxx_standard() -> tuple[int | None, list[Check]]:
    """Apart from the tools' rows, so a torch without headers still leaves cmake and c++ reported."""
    try:
        from unet_export.flows.cpp_check import required_cxx_standard

        standard = required_cxx_standard()
    except Exception as exc:
        return None, [Check("c++ standard", MISSING, f"cannot read it from torch's headers: {exc}")]
    return standard, [Check("c++ standard", OK, f"C++{standard}, as torch's installed headers require")]


def _version_line(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    return next((line.strip() for line in out.splitlines() if line.strip()), "version unknown")


def _check_standard(row: Check, compiler: str, standard: int) -> Check:
    """Compile the headers' own guard: the compiler must reach __cplusplus >= 20YY00 with -std=c++YY."""
    source = f"#if __cplusplus < {2000 + standard}00L\n#error too old\n#endif\nint main() {{ return 0; }}\n"
    proc = subprocess.run([compiler, f"-std=c++{standard}", "-fsyntax-only", "-x", "c++", "-"], input=source,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    if proc.returncode == 0:
        return Check(row.name, OK, f"{row.detail}, accepts -std=c++{standard}")
    return Check(row.name, WARN, f"{row.detail} does not compile C++{standard}, which torch's headers require: "
                 "install a newer g++ or clang++")  # fmt: skip


def check_cuda_toolkit() -> list[Check]:
    """Only a CUDA build of torch needs the toolkit; where it is looked for is cmake_args's business."""
    import torch

    from unet_export.flows.cpp_check import cmake_args

    if not torch.version.cuda:
        return [Check("cuda toolkit", OK, "not needed: torch is a CPU-only build")]
    try:
        args = dict(arg.removeprefix("-D").split("=", 1) for arg in cmake_args())
    except UserError as exc:
        return [Check("cuda toolkit", MISSING, str(exc))]
    root = Path(args["CUDA_TOOLKIT_ROOT_DIR"])
    detail = f"{root} ({_nvcc_release(root)}), for torch's CUDA {torch.version.cuda}"
    if "CUDA_nvrtc_LIBRARY" not in args:
        return [Check("cuda toolkit", WARN, f"{detail}; libnvrtc not found, so linking libtorch may fail")]
    return [Check("cuda toolkit", OK, f"{detail}; nvrtc {args['CUDA_nvrtc_LIBRARY']}")]


def _nvcc_release(root: Path) -> str:
    nvcc = root / "bin" / "nvcc"
    if not nvcc.is_file():
        return "no nvcc"
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
    release = re.search(r"release ([\d.]+)", out)
    return f"nvcc {release.group(1)}" if release else "nvcc, version unknown"


# --- the environment against requirements/lock.txt ---


def check_lock(path: Path | None = None) -> list[Check]:
    path = lockcheck.LOCK if path is None else Path(path)  # looked up now, so tests can point it elsewhere
    if not path.is_file():
        return [Check("lock", OK, "no lock file (installed from a package)")]
    problems = lockcheck.drift(path)
    if not problems:
        return [Check("lock", OK, f"environment matches {_shown(path)} ({len(lockcheck.read_lock(path))} packages)")]
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return [Check("lock", WARN, f"{len(problems)} package(s) differ from {_shown(path)}: {shown}; "
                  "rebuild the venv: rm -rf .venv && make test")]  # fmt: skip


def _shown(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"  # requirements/lock.txt


CHECKS: list[tuple[str, Callable[[], list[Check]]]] = [
    ("python", check_python),
    ("cpu", check_cpu),
    ("torch", check_torch),
    ("tensorrt", check_tensorrt),
    ("onnxruntime", check_onnxruntime),
    ("openvino", check_openvino),
    ("smp", check_smp),
    ("c++ toolchain", check_toolchain),
    ("cuda toolkit", check_cuda_toolkit),
    ("lock", check_lock),
]


def run_checks(checks: list[tuple[str, Callable[[], list[Check]]]] | None = None) -> list[Check]:
    """Every check's rows; a check that raises becomes one row named after it, saying why."""
    rows = []
    for name, check in CHECKS if checks is None else checks:
        try:
            rows += check()
        except ImportError as exc:
            rows.append(Check(name, MISSING, f"cannot import it: {exc}"))
        except Exception as exc:
            rows.append(Check(name, WARN, f"the check failed: {type(exc).__name__}: {exc}"))
    return rows
