"""A checkpoint that is a pickled whole model (torch.save(model)), read by the real commands in a
real process. Issue 25, rough edge 9 (helper i25-help; was tests/test_rough_edges.py)."""

import os
import subprocess
import sys

from typer.testing import CliRunner

from unet_export.cli.main import app

runner = CliRunner()

# torch.save(model) pickles the model's classes by module path: these "projects" are packages on disk,
# importable only in a subprocess that puts them on its path, as in the project that made the file.


MILESIAL_PROJECT = {"unet/__init__.py": "from .unet_model import UNet\n",
                    "unet/unet_model.py": "from unet_export.models import milesial\n\n\nclass UNet(milesial.UNet):\n"
                                          "    pass\n"}  # fmt: skip


SMP_LIKE_PROJECT = {"segnet/__init__.py": "", "segnet/model.py": (
    "import torch.nn as nn\n\n\nclass FPNLike(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
    "        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())\n"
    "        self.segmentation_head = nn.Conv2d(8, 2, 1)\n\n    def forward(self, x):\n"
    "        return self.segmentation_head(self.encoder(x))\n")}  # fmt: skip


def _in_project(tmp_path, files: dict, code: str) -> None:
    import os
    import subprocess
    import sys

    project = tmp_path / "project"
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(project), os.getcwd()])}
    proc = subprocess.run([sys.executable, "-c", "import torch\n" + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_a_pickled_supported_model_is_told_to_resave_its_state_dict_and_that_then_exports(tmp_path):
    _in_project(tmp_path, MILESIAL_PROJECT, "from unet import UNet\ntorch.save(UNet(3, 2, width=8), 'whole.pth')")
    whole = tmp_path / "whole.pth"
    result = runner.invoke(app, ["onnx", str(whole), "-w", str(tmp_path / "exports"), "--device", "cpu"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    message = result.stderr
    assert "unet.unet_model.UNet" in message and "a milesial model" in message, message
    advice = "torch.save(model.state_dict(), 'weights.pth')"
    assert advice in message
    # The advice, followed literally in the project that made the file, leads to an export that passes.
    _in_project(tmp_path, MILESIAL_PROJECT, f"model = torch.load('whole.pth', weights_only=False)\n{advice}")
    result = runner.invoke(app, ["onnx", str(tmp_path / "weights.pth"), "-w", str(tmp_path / "exports"),
                                 "--height", "32", "--width", "32", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_pickled_model_of_an_unsupported_architecture_is_no_dead_end(tmp_path):
    _in_project(tmp_path, SMP_LIKE_PROJECT, "from segnet.model import FPNLike\ntorch.save(FPNLike(), 'whole.pth')")
    result = runner.invoke(app, ["onnx", str(tmp_path / "whole.pth"), "-w", str(tmp_path / "exports")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    message = result.stderr
    assert "segnet.model.FPNLike" in message and "an architecture no --model names" in message, message
    # the way in: its state_dict with the function that builds it (--model-factory), in one whole line
    assert "torch.save(model.state_dict(), 'weights.pth')" in message and "--model-factory" in message
    assert message.rstrip().endswith("the function that builds the model")
    assert "encoder.0.weight" in message  # what its keys are, so the user sees why
    # and it is true: the state_dict, re-saved, is refused as an unknown architecture
    _in_project(tmp_path, SMP_LIKE_PROJECT, "m = torch.load('whole.pth', weights_only=False)\n"
                                            "torch.save(m.state_dict(), 'weights.pth')")  # fmt: skip
    resaved = runner.invoke(app, ["onnx", str(tmp_path / "weights.pth"), "-w", str(tmp_path / "exports")])
    assert resaved.exit_code == 2 and "not a checkpoint of a known architecture" in resaved.stderr
    # and the advice holds: with the factory that builds it, the re-saved weights export and verify
    factory = f"{tmp_path / 'project' / 'segnet' / 'model.py'}:FPNLike"
    done = runner.invoke(app, ["onnx", str(tmp_path / "weights.pth"), "-w", str(tmp_path / "exports"),
                               "--model-factory", factory, "--height", "64", "--width", "64"])  # fmt: skip
    assert done.exit_code == 0, done.output


def test_reading_a_pickled_model_imports_and_runs_none_of_it(tmp_path):
    """The class names and shapes come from the pickle's opcodes: the module that would be imported
    to unpickle it leaves a mark when imported, and it is on the path here."""
    import sys

    from unet_export.pickled import read_pickled_model

    files = dict(SMP_LIKE_PROJECT)
    files["segnet/model.py"] = "import pathlib\npathlib.Path('imported').write_text('x')\n" + files["segnet/model.py"]
    _in_project(tmp_path, files, "from segnet.model import FPNLike\ntorch.save(FPNLike(), 'whole.pth')")
    (tmp_path / "imported").unlink()
    sys.path.insert(0, str(tmp_path / "project"))
    try:
        found = read_pickled_model(tmp_path / "whole.pth", "zip", "whole")
    finally:
        sys.path.remove(str(tmp_path / "project"))
    assert "segnet" not in sys.modules and not (tmp_path / "imported").exists()
    assert found.cls == "segnet.model.FPNLike" and found.complete
    assert found.shapes["encoder.0.weight"] == (8, 3, 3, 3) and found.shapes["encoder.1.num_batches_tracked"] == ()
    assert list(found.shapes)[-1] == "segmentation_head.bias"
