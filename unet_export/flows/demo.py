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


OUTLIER_LAYER = "up4.up"  # the decoder layer whose input carries the outliers (outlier_demo)


def write_outlier_checkpoint(dest: Path, channel: int = 0, peak: float = 1e4, leak: float = 0.0) -> Path:
    """The demo model with a few extreme outliers in the input of its last decoder layer, up4.up
    (the output of up3.conv): one channel of up3.conv's last BatchNorm is rescaled so that only its
    top 0.1% of values on the demo images stay above zero after the ReLU, reaching ``peak``, and
    up4.up ignores that channel (its weights are zeroed). The FP32 model keeps its masks (it only
    lost one channel), but a per-tensor INT8 scale for that tensor spans 0..``peak`` and rounds
    every ordinary value to zero: the INT8 masks break (issue 28's test model). With ``peak`` above
    FP16's largest value (65504) and a tiny ``leak`` weight instead of zero, the FP16 model breaks
    too (inf times a tiny weight is inf) while FP32 barely moves. Written with the demo's sidecar
    (preprocessing, classes) as ``dest``."""
    from unet_export.checkpoint import build_model, load_checkpoint
    from unet_export.flows.int8_gate import calibration_images

    ckpt = load_checkpoint(DEMO_WEIGHTS)
    net = build_model(ckpt).eval()
    images = calibration_images(DEMO_VAL, ckpt, None)
    x = torch.stack([images.tensor(p) for p in images.paths])
    bn = net.up3.conv.double_conv[4]
    seen = []
    hook = bn.register_forward_hook(lambda module, args, out: seen.append(out[:, channel].detach().flatten()))
    with torch.no_grad():
        net(x)
    hook.remove()
    values = seen[0]
    cut = torch.quantile(values, 0.999)
    scale = peak / (values.max() - cut)  # y' = scale * (y - cut): positive on the top 0.1% only
    with torch.no_grad():
        bn.weight[channel] *= scale
        bn.bias[channel] = scale * (bn.bias[channel] - cut)
        net.up4.up.weight[channel] = leak
    state = net.state_dict()
    state["mask_values"] = ckpt.mask_values
    buffer = io.BytesIO()
    torch.save(state, buffer)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(buffer.getvalue())
    with atomic_path(dest.with_suffix(".json")) as tmp:
        tmp.write_bytes(DEMO_WEIGHTS.with_suffix(".json").read_bytes())
    return dest
