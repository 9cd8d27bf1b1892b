"""Optional heavy dependencies never load at import time, and a missing one is a one-line
UserError with the install command."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import unet_export
from unet_export.errors import UserError, require

MODULES = sorted(m.name for m in pkgutil.walk_packages(unet_export.__path__, "unet_export.") if m.name != "unet_export.__main__")


def test_every_module_imports_without_onnx_onnxruntime_or_tensorrt():
    blocked = ["onnx", "onnxruntime", "onnxscript", "tensorrt", "torchvision"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # makes 'import name' raise ImportError\n"
        f"import importlib\nfor m in {MODULES!r}: importlib.import_module(m)\n"
        f"assert not any(sys.modules.get(n) for n in {blocked!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_missing_runtime_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match=r'pip install "unet-export\[trt\]"'):
        require("tensorrt", extra="trt")


def test_onnx_export_without_onnx_is_a_user_error(make_checkpoint, tmp_path, monkeypatch):
    from unet_export.api import export_artifact

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(UserError, match="pip install onnx"):
        export_artifact(make_checkpoint("v3"), "onnx", tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_all_modules_found():
    assert "unet_export.runners.onnxruntime" in MODULES and "unet_export.cli.main" in MODULES
    assert all(importlib.util.find_spec(m) for m in MODULES)
