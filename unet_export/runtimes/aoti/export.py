"""AOTInductor package writer: torch.export + Inductor compiled ahead of time into DIR/<stem>.pt2,
which Python loads with torch._inductor.aoti_load_package and C++ with
torch::inductor::AOTIModelPackageLoader (TorchScript's successor for libtorch deployment)."""

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from unet_export.errors import ArtifactError
from unet_export.fileio import atomic_path, environment_error, write_bytes_checked
from unet_export.models.sizes import SizeRule


def quiet_cpp_extension() -> None:
    """Inductor's C++ toolchain logs "No CUDA runtime is found, using CUDA_HOME=..." on CPU-only
    machines when it loads or compiles a package: noise in a command's output, not a problem."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def export_aoti(model: nn.Module, dest: Path, sample: torch.Tensor, metadata: dict[str, str], *, dynamic: bool = True,
                sizes: SizeRule = SizeRule(), device: torch.device | str = "cpu", **_) -> dict:  # fmt: skip
    """Compile ``model`` for ``device`` into a .pt2 package; returns the I/O record with the
    size limits torch.export proved (the manifest keeps them)."""
    device = torch.device(device)
    model = model.eval().to(device)
    # A batch of 1 would be specialised (torch.export's 0/1 rule): trace with 2 for a dynamic batch.
    sample = sample.expand(2, *sample.shape[1:]).contiguous().to(device) if dynamic else sample.to(device)
    auto = torch.export.Dim.AUTO
    shapes = ({0: auto, 2: auto, 3: auto},) if dynamic else None
    quiet_cpp_extension()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (sample,), dynamic_shapes=shapes)
            limits = _limits(program)
            # Packaged in memory, written from Python, where a full disk is an OSError (exit 2).
            package = io.BytesIO()
            torch._inductor.aoti_compile_and_package(
                program, package_path=package, inductor_configs={"aot_inductor.metadata": metadata}
            )
    except Exception as exc:  # torch.export and Inductor raise many types
        if cause := environment_error(exc):  # a full or read-only disk, not the exporter: exit 2
            raise _named(cause) from exc
        first = " ".join(str(exc).split())[:300]
        raise ArtifactError(f"AOTInductor export failed: {type(exc).__name__}: {first}") from exc
    with atomic_path(dest) as tmp:
        write_bytes_checked(tmp, package.getvalue())
    names = ["batch", int(sample.shape[1]), "height", "width"] if dynamic else list(sample.shape)
    return {
        "inputs": [{"name": "input", "shape": names}],
        "outputs": [{"name": "logits", "shape": ["batch", "n_classes", "height", "width"]}],
        "dynamic_axes": {"input": {0: "batch", 2: "height", 3: "width"}} if dynamic else {},
        "limits": limits,
        "device": device.type,
    }


def _named(exc: OSError) -> OSError:
    """A failed write() names no file; Inductor's are all under its build folder: name that."""
    if exc.filename is None:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        exc.filename = f"a file in AOTInductor's build folder {cache_dir()}"
    return exc


def _limits(program) -> dict:
    """{dim name: [min, max or None]} for the input's dynamic dims, from torch.export's ranges."""
    user_input = [n for n in program.graph.nodes if n.op == "placeholder"][-1]
    limits = {}
    for index, name in ((0, "batch"), (2, "height"), (3, "width")):
        dim = user_input.meta["val"].shape[index]
        if isinstance(dim, torch.SymInt):
            rng = program.range_constraints[dim.node.expr]
            upper = _finite(rng.upper)
            # torch.export reports batch >= 2 (its 0/1 rule); the package runs batch 1 as well.
            limits[name] = [1 if name == "batch" else int(rng.lower), upper]
    return limits


def _finite(bound) -> int | None:
    """An int, or None for torch's symbolic infinity (whose is_finite is not to be trusted)."""
    try:
        value = int(bound)
    except (TypeError, ValueError, AttributeError):
        return None
    return value if value < 2**62 else None


def read_metadata(path: Path) -> dict[str, str]:
    return torch._inductor.aoti_load_package(str(path)).get_metadata()
