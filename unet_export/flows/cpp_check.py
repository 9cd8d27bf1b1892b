"""The libtorch C++ example (examples/cpp): build it against the libtorch inside the installed
torch wheel, feed it the same batch as Python, and compare its logits with the eager model's.

Tensor files shared with the C++ side: 8 magic bytes "UNETTNS1", int32 dtype (0 float32, 1 uint8),
int32 ndim, int64 dims, then the data in C order."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from unet_export.checkpoint import build_model
from unet_export.device import resolve_device
from unet_export.errors import UserError
from unet_export.models import mask_threshold
from unet_export.parity.gate import FP32, compare, seeded_inputs
from unet_export.runtimes import EagerRunner
from unet_export.workdir.lookup import manifest_checkpoint
from unet_export.workdir.manifest import checked_path, load_manifest

MAGIC = b"UNETTNS1"
DTYPES = {0: np.float32, 1: np.uint8}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cpp"


def write_tensor(path: Path, tensor: torch.Tensor) -> None:
    arr = tensor.detach().cpu().contiguous().numpy()
    code = {np.dtype(np.float32): 0, np.dtype(np.uint8): 1}[arr.dtype]
    header = MAGIC + np.array([code, arr.ndim], np.int32).tobytes() + np.array(arr.shape, np.int64).tobytes()
    Path(path).write_bytes(header + arr.tobytes())


def read_tensor(path: Path) -> torch.Tensor:
    data = Path(path).read_bytes()
    if data[:8] != MAGIC:
        raise UserError(f"{path} is not a tensor file written by unet_infer")
    code, ndim = np.frombuffer(data, np.int32, 2, 8)
    shape = np.frombuffer(data, np.int64, ndim, 16)
    return torch.from_numpy(np.frombuffer(data, DTYPES[int(code)], offset=16 + 8 * ndim).reshape(shape).copy())


def cmake_args() -> list[str]:
    """Point CMake at the wheel's libtorch; a CUDA build of torch also needs the CUDA toolkit
    (headers, cudart) and libnvrtc, which the pip wheels of NVIDIA's libraries provide."""
    import torch.utils

    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DCMAKE_BUILD_TYPE=Release"]
    if torch.version.cuda:
        root = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if Path("/usr/local/cuda/include").is_dir() else None)
        if root is None:
            raise UserError("torch is a CUDA build, so building against its libtorch needs the CUDA toolkit: "
                            "install it (apt-get install nvidia-cuda-toolkit) or set CUDA_HOME")  # fmt: skip
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={root}")
        nvrtc = _find_nvrtc(Path(root))
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
    return args


def _find_nvrtc(root: Path) -> Path | None:
    candidates = list((root / "lib64").glob("libnvrtc.so*"))
    try:
        import nvidia

        for base in nvidia.__path__:
            candidates += sorted(Path(base).glob("*/lib/libnvrtc.so*"))
    except ImportError:
        pass
    return next((c for c in candidates if "builtins" not in c.name), None)


def build_example(build_dir: Path = Path("build/cpp")) -> Path:
    """Configure and build examples/cpp; returns the unet_infer binary."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise UserError(f"{tool} is not installed: apt-get install cmake g++ to build the C++ example")
    _run(["cmake", "-S", str(EXAMPLE), "-B", str(build_dir), *cmake_args()], "configuring the C++ example")
    _run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)], "building the C++ example")
    return Path(build_dir) / "unet_infer"


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower()]
        raise UserError(f"{what} failed: {(errors or ['see ' + ' '.join(cmd)])[0].strip()[:300]}")
    return proc.stdout


def run_example(binary: Path, model: Path, batch: torch.Tensor, work: Path, device: str = "cpu", iters: int = 5) -> dict:
    """Run unet_infer on ``batch``; returns its logits, mask and reported latency."""
    work.mkdir(parents=True, exist_ok=True)
    write_tensor(work / "input.tensor", batch)
    prefix = work / model.name
    started = time.perf_counter()
    out = _run([str(binary), str(model), str(work / "input.tensor"), str(prefix), "--device", device,
                "--iters", str(iters)], f"running {binary.name} on {model.name}")  # fmt: skip
    latency = re.search(r"latency mean ([\d.]+) ms, min ([\d.]+) ms", out)
    return {
        "logits": read_tensor(f"{prefix}.logits.tensor"),
        "mask": read_tensor(f"{prefix}.mask.tensor"),
        "mean_ms": float(latency.group(1)) if latency else None,
        "min_ms": float(latency.group(2)) if latency else None,
        "wall_s": time.perf_counter() - started,
        "stdout": out.strip(),
    }


def cpp_check(workdir: Path = Path("exports"), build_dir: Path = Path("build/cpp"), device: str = "cpu",
              seed: int = 0, model=None) -> list[dict]:  # fmt: skip
    """Build the example, run every TorchScript and AOTInductor artefact of ``workdir`` from C++
    on one seeded batch, and compare with the eager model (FP32 tolerances); ``model`` rebuilds a
    factory's eager model (--model-factory)."""
    workdir, dev = Path(workdir), resolve_device(device)
    manifest = load_manifest(workdir)
    entries = [a for a in manifest["artifacts"] if a["format"] in ("torchscript", "aoti")]
    if not entries or not manifest.get("model"):  # C++ runs these two formats only: say so, not "export ONNX"
        raise UserError(f"no TorchScript or AOTInductor artefact in {workdir}: run `unet-export torchscript WEIGHTS "
                        f"--workdir {workdir}` or `unet-export aoti WEIGHTS --workdir {workdir}` first")  # fmt: skip
    net = build_model(manifest_checkpoint(manifest, model=model))
    binary = build_example(Path(build_dir))
    height, width = entries[0]["export_size"]
    common = (2, int(entries[0]["inputs"][0]["shape"][1]), height, width)
    shapes = {_run_shape(entry, common) for entry in entries}
    with EagerRunner(net, dev) as eager:
        cases = {shape: (batch, eager.infer(batch).cpu()) for shape in shapes for batch in seeded_inputs([shape], seed)}
    rows = []
    for entry in entries:
        row = {"format": entry["format"], "path": entry["path"]}
        if entry["format"] == "aoti" and entry.get("device", "cpu") != dev.type:
            rows.append(row | {"status": "unavailable", "reason": f"compiled for {entry.get('device')}"})
            continue
        batch, reference = cases[_run_shape(entry, common)]
        result = run_example(binary, checked_path(workdir, entry), batch, Path(build_dir) / "runs", dev.type)
        case = compare(result["logits"], reference, FP32, threshold=mask_threshold(manifest["model"]["config"]))
        rows.append(row | {"status": "ok" if case.passed else "parity_failed", "case": case,
                           "mean_ms": result["mean_ms"], "min_ms": result["min_ms"]})  # fmt: skip
    return rows


def _run_shape(entry: dict, common: tuple) -> tuple:
    """The batch an artefact runs from C++: the common one, except that a static artefact (--static,
    or TorchScript that had to be traced) takes only its own 1xCxHxW."""
    return tuple(entry["inputs"][0]["shape"]) if entry.get("size_rule", {}).get("static") else common


# Guards that stop a too-old -std with #error, newest first: torch >= 2.14's ATen.h demands C++20,
# older ATen.h and c10 headers C++17. CMake (examples/cpp/CMakeLists.txt) reads the same guard.
CXX_GUARD_HEADERS = ("ATen/ATen.h", "c10/util/C++17.h", "c10/macros/Macros.h")
CXX_GUARD = re.compile(r"__cplusplus\s*<\s*(\d{6})L\)?\s*\n\s*#\s*error")


def required_cxx_standard(include_dir: Path | None = None) -> int:
    """The C++ standard (17, 20, ...) that torch's installed headers require of a libtorch build.

    Read from the headers' own ``#if __cplusplus < 202002L / #error`` guard rather than from the
    torch version, so it stays right for builds we have not seen; finding the headers through the
    import system's spec does not import torch. C++17 when no header has a guard (torch 2.1+)."""
    include_dir = Path(include_dir) if include_dir is not None else _torch_include_dir()
    for name in CXX_GUARD_HEADERS:
        header = include_dir / name
        if header.is_file():
            guard = CXX_GUARD.search(header.read_text(errors="replace"))
            if guard:
                return int(guard.group(1)) // 100 % 100  # 202002 -> 2020 -> 20
    return 17


def _torch_include_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("torch is not installed, so there are no libtorch headers to read")
    include = Path(next(iter(spec.submodule_search_locations))) / "include"
    if not include.is_dir():
        raise UserError(f"torch at {include.parent} ships no C++ headers ({include} is missing)")
    return include
