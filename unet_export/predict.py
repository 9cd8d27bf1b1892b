"""Masks for images from a checkpoint or any artefact (ONNX, TorchScript, TensorRT engine), with
the preprocessing the model was trained with and milesial's mask_values restored."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unet_export.checkpoint import build_model, class_mask_values, load_checkpoint
from unet_export.data.dataset import Preprocess, image_to_tensor, load_image, mask_to_classes
from unet_export.errors import UserError
from unet_export.manifest import load_manifest
from unet_export.metrics import logits_to_mask
from unet_export.models import get_spec
from unet_export.models.sizes import SizeRule
from unet_export.runners import AotiRunner, EagerRunner, OnnxRuntimeRunner, Runner, TensorRTRunner, TorchScriptRunner

OVERLAY_COLOURS = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]])


@dataclass
class Predictor:
    runner: Runner
    mask_values: list
    preprocess: Preprocess
    sizes: SizeRule


def fit_and_run(runner: Runner, x: torch.Tensor, rule: SizeRule) -> torch.Tensor:
    """Pad the image to a size the model takes (mirror padding, as the 2015 paper's overlap-tile:
    half the shrink on the top/left so output pixel i is image pixel i), run, crop to the image."""
    height, width = x.shape[-2:]
    margin = rule.shrink // 2
    target_h, target_w = rule.at_least(height + rule.shrink), rule.at_least(width + rule.shrink)
    pads = [margin, target_w - width - margin, margin, target_h - height - margin]
    mode = "reflect" if max(pads) < min(height, width) else "replicate"  # reflect needs pad < size
    logits = runner.infer(F.pad(x, pads, mode=mode) if any(pads) else x)
    # The output is centred in the padded input: output j <-> image pixel j + (T - O) // 2 - margin.
    off_y = max(0, margin - (target_h - logits.shape[-2]) // 2)
    off_x = max(0, margin - (target_w - logits.shape[-1]) // 2)
    logits = logits[..., off_y : off_y + height, off_x : off_x + width]
    if logits.shape[-2:] != (height, width):  # a shrink the rule only approximates (valid-pad)
        logits = F.interpolate(logits, (height, width), mode="bilinear")
    return logits


def load_predictor(model_path: str | Path, device, model: str | None = None) -> Predictor:
    """A runner for MODEL by its suffix, and the model record its metadata carries."""
    path = Path(model_path)
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt"):
        ckpt = load_checkpoint(path, model)
        record, runner = ckpt.record(), EagerRunner(build_model(ckpt), device)
    elif suffix == ".onnx":
        from unet_export.export.onnx import read_metadata

        record, runner = _decode(read_metadata(path)), OnnxRuntimeRunner(path, device)
    elif suffix == ".ts":
        from unet_export.export.torchscript import read_metadata

        record, runner = _decode(read_metadata(path)), TorchScriptRunner(path, device)
    elif suffix == ".pt2":
        from unet_export.export.aoti import read_metadata

        record, runner = _decode(read_metadata(path)), AotiRunner(path, device)
    elif suffix == ".engine":
        entry, record = _engine_entry(path)
        runner = TensorRTRunner(path, device, entry["precision"], record=entry)
    else:
        raise UserError(f"{path.name}: MODEL must be a checkpoint (.pth) or an artefact (.onnx, .ts, .pt2, .engine)")
    config = record.get("config", {})
    n_classes = config.get("n_classes", 2)
    mask_values = class_mask_values(record.get("mask_values"), n_classes)
    rule = get_spec(record.get("architecture", "milesial")).sizes(config)
    return Predictor(runner, mask_values, Preprocess.from_dict(record.get("preprocess")), rule)


def _decode(metadata: dict) -> dict:
    """Artefact metadata holds JSON strings (and plain ones, like the architecture's name)."""
    decoded = {}
    for key, value in metadata.items():
        try:
            decoded[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            decoded[key] = value
    return decoded


def _engine_entry(path: Path) -> tuple[dict, dict]:
    manifest = load_manifest(path.parent)
    for entry in manifest["artifacts"]:
        if entry["format"] == "tensorrt" and entry["path"] == path.name:
            return entry, manifest["model"]
    raise UserError(f"{path.name} is not in {path.parent}/manifest.json: engines are run with their manifest record")


def predict_image(predictor: Predictor, image_path: Path) -> tuple[np.ndarray, Image.Image]:
    """(mask as milesial's predict.py writes it, the original image)."""
    img = load_image(image_path)
    x = image_to_tensor(img, predictor.preprocess)[None]
    logits = fit_and_run(predictor.runner, x, predictor.sizes).float().cpu()
    width, height = img.size
    if predictor.preprocess.square:  # undo pad-to-square: back to the square canvas, then crop
        side = max(width, height)
        logits = F.interpolate(logits, (side, side), mode="bilinear")[..., :height, :width]
    else:
        logits = F.interpolate(logits, (height, width), mode="bilinear")
    classes = logits_to_mask(logits)[0].numpy()
    return mask_to_image_array(classes, predictor.mask_values), img


def mask_to_image_array(classes: np.ndarray, mask_values: list) -> np.ndarray:
    """Class indices -> stored mask values: grey levels, or RGB triplets."""
    values = np.asarray(mask_values)
    dtype = np.uint8 if values.max() <= 255 else np.uint16
    return values[classes].astype(dtype)


def overlay(img: Image.Image, classes: np.ndarray, alpha: float = 0.5) -> Image.Image:
    colours = OVERLAY_COLOURS[classes % len(OVERLAY_COLOURS)]
    base = np.asarray(img.convert("RGB"), dtype=np.float32)
    blended = np.where(classes[..., None] > 0, base * (1 - alpha) + colours * alpha, base)
    return Image.fromarray(blended.astype(np.uint8))


def predict(model_path, images: list[Path], out_dir: Path, overlay_images: bool = False, device="cpu",
            model: str | None = None) -> list[Path]:  # fmt: skip
    """Write <stem>_mask.png (and <stem>_overlay.png) per image into ``out_dir``."""
    predictor = load_predictor(model_path, torch.device(device), model)
    written = []
    with predictor.runner:
        for image_path in images:
            mask, img = predict_image(predictor, Path(image_path))
            out_dir.mkdir(parents=True, exist_ok=True)
            dest = out_dir / f"{Path(image_path).stem}_mask.png"
            Image.fromarray(mask).save(dest)
            written.append(dest)
            if overlay_images:
                classes = mask_to_classes(mask, predictor.mask_values, dest)
                overlay(img, classes).save(out_dir / f"{Path(image_path).stem}_overlay.png")
    return written

