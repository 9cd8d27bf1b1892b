"""Optional heavy dependencies never load at import time, and a missing one is a one-line
UserError with the install command."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import unet_export
from unet_export.errors import UserError, require

MODULES = sorted(m.name for m in pkgutil.walk_packages(unet_export.__path__, "unet_export.") if m.name != "unet_export.__main__")


def test_every_module_imports_without_onnx_onnxruntime_tensorrt_or_the_report_extra():
    """Each module imports with these packages unavailable, and none of them even tries to import
    one at import time (a top-level ``try: import onnx`` would pass the first check, not this one)."""
    blocked = ["onnx", "onnxruntime", "onnxscript", "tensorrt", "torchvision", "segmentation_models_pytorch", "timm",
               "huggingface_hub", "matplotlib", "jinja2"]
    code = (
        "import importlib, importlib.abc, sys\n"
        f"BLOCKED, tried = {blocked!r}, []\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            tried.append(name)\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked)', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "assert not tried, f'imported at import time: {sorted(set(tried))}'\n"
        "print(len(sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) > len(MODULES)  # the loop ran: every module is in sys.modules


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
    """MODULES (what the import test walks) is every .py file of the package: a folder that lost
    its __init__.py, or a walk that stops early, would leave modules out of the test unseen."""
    root = Path(unet_export.__path__[0])
    on_disk = {
        ".".join(("unet_export", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for p in root.rglob("*.py")
    } - {"unet_export.__main__", "unet_export"}
    assert set(MODULES) == on_disk
    assert "unet_export.runtimes.onnx.runner" in MODULES and "unet_export.cli.main" in MODULES
