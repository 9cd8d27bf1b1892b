"""The shipped default model and the seeded random models that tests and benchmarks use.

The default: a small milesial U-Net trained with `unet-export train` on `unet-export data synth`
data (scripts/train_demo_model.sh has the exact commands), shipped with its labelled
validation set in unet_export/assets/.
"""

import io
from pathlib import Path

import torch

from unet_export.fileio import atomic_path
from unet_export.flows.int8 import quantize_int8
from unet_export.models.milesial import UNet

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # unet_export/assets
DEMO_WEIGHTS = ASSETS / "demo_unet.pth"  # + demo_unet.json, the training sidecar
DEMO_VAL = ASSETS / "demo_val"  # imgs/ + masks/, never seen in training
DEMO_SIZE = (128, 128)  # the size it was trained at
# INT8: the demo calibrates on the last half of its validation set and judges the INT8 artefacts
# (gate, Dice vs ground truth, benchmark batch) on the first half, which calibration never saw.
DEMO_CALIB_IMAGES = 12
DEMO_INT8_BACKENDS = ["openvino-int8", "onnxruntime-int8"]
DEMO_CONFIG = dict(n_channels=3, n_classes=2, bilinear=False, width=64)  # milesial v3.0's shape


def random_milesial(seed: int = 0, **config) -> UNet:
    """A seeded milesial UNet whose BatchNorm layers carry trained-looking running statistics."""
    torch.manual_seed(seed)
    model = UNet(**(DEMO_CONFIG | config))
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
    return model.eval()


def write_random_checkpoint(dest: Path, seed: int = 0, mask_values=None, **config) -> Path:
    """Save it the way milesial's train.py does: state_dict plus ``mask_values``."""
    state = random_milesial(seed, **config).state_dict()
    state["mask_values"] = mask_values if mask_values is not None else [0, 1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # torch.save names the archive after the file; a buffer keeps the bytes
    torch.save(state, buffer)  # (and so the sha256 the manifest keys on) the same on every run
    with atomic_path(dest) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return dest


def demo_calibration() -> list[Path]:
    """The demo's calibration images: the last DEMO_CALIB_IMAGES of DEMO_VAL (sorted by name), so
    the first ones, which `unet-bench --data DEMO_VAL` batches, stay held out."""
    images = sorted(p for p in (DEMO_VAL / "imgs").iterdir() if p.suffix == ".png")
    return images[-DEMO_CALIB_IMAGES:]


def demo_int8(workdir: Path, device: str = "auto", on_result=None) -> list:
    """INT8 artefacts of the demo model (OpenVINO IR via NNCF, ONNX via ONNX Runtime), calibrated
    on demo_calibration() and gated on the rest of DEMO_VAL: class change and Dice vs eager, and
    Dice vs ground truth within 0.005 of eager (flows.int8.quantize_int8)."""
    height, width = DEMO_SIZE
    return quantize_int8(DEMO_WEIGHTS, demo_calibration(), workdir, val=DEMO_VAL, device=device, height=height,
                         width=width, on_result=on_result)  # fmt: skip
