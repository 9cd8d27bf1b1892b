"""Masks for images from a checkpoint or any artefact (ONNX, TorchScript, TensorRT engine), with
the preprocessing the model was trained with and milesial's mask_values restored.

Large images are run in overlapping tiles (the fully convolutional U-Nets only), so memory is
bounded by the tile, not the image: see TILE and TILE_HALO."""

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unet_export.checkpoint import build_model, class_mask_values, load_checkpoint
from unet_export.data.dataset import image_to_tensor, Preprocess
from unet_export.data.images import load_image
from unet_export.errors import UserError, require
from unet_export.fileio import decode_metadata
from unet_export.metrics import logits_to_mask
from unet_export.models import get_spec, mask_threshold
from unet_export.models.sizes import SizeRule
from unet_export.runtimes import AotiRunner, EagerRunner, OnnxRuntimeRunner, OpenVinoRunner, Runner, TorchScriptRunner
from unet_export.runtimes.aoti import export as aoti_export
from unet_export.runtimes.onnx import export as onnx_export
from unet_export.runtimes.openvino import export as openvino_export
from unet_export.runtimes.torchscript import export as torchscript_export
from unet_export.workdir.manifest import checked_path, load_manifest
from unet_export.workdir.runners import artifact_runner

OVERLAY_COLOURS = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]])


# Tiling: windows of at most TILE x TILE pixels, each contributing its centre and overlapping its
# neighbours by TILE_HALO on every side. The halo is the receptive-field radius rounded up to the
# 16-pixel pooling grid (measured from input gradients: 107 px for milesial with ConvTranspose and
# for plain, 122 for milesial bilinear, 123 for reflect), so a pixel's output never sees a tile
# edge; windows start on multiples of 16, so pooling cells are the untiled run's, and the last
# window ends where the image does. milesial (ConvTranspose), plain and reflect then give the
# untiled logits to float rounding (3e-8 measured; the 4000x4000 demo mask is identical). milesial
# bilinear up-samples with align_corners=True, which depends on the input size: its tiles are
# close, not exact (6.8e-6 max on logits of range 0.38, argmax identical, 700x600, tile 512).
# ResNet-50, DeepLabV3 (global pooling) and the unpadded 2015 U-Net are run whole.
TILE = 1024
TILE_HALO = {"milesial": 128, "plain": 128, "reflect": 128, "reflect-sigmoid": 128}


@dataclass
class Predictor:
    runner: Runner
    mask_values: list
    preprocess: Preprocess
    sizes: SizeRule
    n_channels: int = 3
    halo: int | None = None  # tile with this overlap; None: run whole images
    fixed: tuple[int, int] | None = None  # a static artefact's one input size (H, W)
    fixed_batch: int | None = None  # ... and its one batch size
    label: str = "eager"  # the runtime, as `predict --runtime` and the report name it
    threshold: float = 0.0  # where a one-class output turns into class 1 (models.mask_threshold)
    entry: dict | None = None  # the manifest entry it runs (None: a checkpoint, or an artefact without one)
    # The parity.envelope.Envelope the entry was proven on (None: no envelope recorded, the size
    # rule alone). Set by predict (inference sits below parity): fit_and_run keeps every call in it.
    envelope: object | None = None

    def max_batch(self, requested: int) -> int:
        return self.fixed_batch or requested


def fit_and_run(runner: Runner, x: torch.Tensor, rule: SizeRule, halo: int | None = None,
                tile: int | None = None, fixed: tuple[int, int] | None = None, envelope=None) -> torch.Tensor:
    """Pad the image to a size the model takes (mirror padding, as the 2015 paper's overlap-tile:
    half the shrink on the top/left so output pixel i is image pixel i), run, crop to the image.
    With ``halo``, an image larger than ``tile`` runs in overlapping tiles (see TILE_HALO). A
    static artefact (``fixed``) takes one size: the image is padded to it, if it fits. With an
    ``envelope`` (parity.envelope.Envelope), the artefact only ever sees shapes it was proven on:
    an image larger than it runs in tiles it holds (with ``halo``), else it is refused (UserError).
    The calls run one at a time (infer); batch predict's throughput mode streams them (fit_input)."""
    fit = fit_input(x, rule, halo, tile, fixed, envelope)
    return fit.logits(map(runner.infer, fit.calls))


@dataclass
class Fit:
    """One batch as fit_and_run feeds the model: ``calls``, the inputs the runtime runs, in order
    (the padded batch, its tiles, or parts of either that the envelope holds); logits() makes the
    batch's logits at the image size from their outputs, given in the same order."""

    calls: list[torch.Tensor]
    counts: list[int]  # per window (one, or one per tile): how many of the calls it took
    spans: list[tuple[int, ...]] | None  # the tiles' spans (tile_spans), None: run whole
    shape: tuple[int, ...]  # the padded batch's
    height: int
    width: int
    margin: int

    def logits(self, outputs) -> torch.Tensor:
        outputs = iter(outputs)
        windows = (_joined(list(itertools.islice(outputs, n))) for n in self.counts)
        logits = _placed(self.shape, self.spans, windows) if self.spans else next(windows)
        # The output is centred in the padded input: output j <-> image pixel j + (T - O) // 2 - margin.
        target_h, target_w = self.shape[-2:]
        off_y = max(0, self.margin - (target_h - logits.shape[-2]) // 2)
        off_x = max(0, self.margin - (target_w - logits.shape[-1]) // 2)
        logits = logits[..., off_y : off_y + self.height, off_x : off_x + self.width]
        if logits.shape[-2:] != (self.height, self.width):  # a shrink the rule only approximates (valid-pad)
            logits = F.interpolate(logits, (self.height, self.width), mode="bilinear")
        return logits


def fit_input(x: torch.Tensor, rule: SizeRule, halo: int | None = None, tile: int | None = None,
              fixed: tuple[int, int] | None = None, envelope=None) -> Fit:  # fmt: skip
    """The padding, tiling and envelope of fit_and_run, before anything runs: a static size the
    image does not fit, or a shape the envelope does not hold, is refused here (UserError)."""
    height, width = x.shape[-2:]
    margin = rule.shrink // 2
    target_h, target_w = padded_size(rule, height, width, envelope)
    if fixed is not None:
        if height + rule.shrink > fixed[0] or width + rule.shrink > fixed[1]:
            raise UserError(f"the model is static at {fixed[0]}x{fixed[1]} and the image is {height}x{width} after "
                            "preprocessing: export it without --static to predict other sizes")  # fmt: skip
        target_h, target_w, halo = fixed[0], fixed[1], None
    pads = [margin, target_w - width - margin, margin, target_h - height - margin]
    mode = "reflect" if max(pads) < min(height, width) else "replicate"  # reflect needs pad < size
    padded = F.pad(x, pads, mode=mode) if any(pads) else x
    tile = tiling(target_h, target_w, halo, tile or TILE, envelope)
    spans = tile_spans(target_h, target_w, tile, halo) if tile else None
    windows = [padded[..., w0:w1, v0:v1] for *_, w0, w1, v0, v1 in spans] if spans else [padded]
    parts = [_Within(envelope).parts(window) if envelope is not None else [window] for window in windows]
    return Fit([call for part in parts for call in part], list(map(len, parts)), spans, tuple(padded.shape),
               height, width, margin)  # fmt: skip


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def padded_size(rule: SizeRule, height: int, width: int, envelope=None) -> tuple[int, int]:
    """The input size fit_and_run feeds the model for an image of ``height`` x ``width``: on the
    size rule and, with an ``envelope``, at least its smallest proven side (a small image is
    padded up to what was proven rather than refused)."""
    h, w = rule.at_least(height + rule.shrink), rule.at_least(width + rule.shrink)
    if envelope is not None:
        low_h, low_w = envelope.smallest()
        h, w = max(h, low_h), max(w, low_w)
    return h, w


def tiling(height: int, width: int, halo: int | None, tile: int, envelope=None) -> int | None:
    """The tile side a padded input of ``height`` x ``width`` runs in, None: whole. Larger than
    ``tile`` or than the ``envelope`` holds: tiles, as large as both allow (halo included)."""
    if not halo:
        return None
    if envelope is None:
        return tile if max(height, width) > tile else None
    if max(height, width) <= tile and envelope.accepts(1, height, width):
        return None
    return proven_tile(envelope, halo, tile)  # None: no tile fits it; _Within refuses the whole input


def proven_tile(envelope, halo: int, tile: int | None = None) -> int | None:
    """The largest square tile, at most ``tile``, inside a box of the envelope that takes one image,
    whose core (tile - 2 x halo) is a positive multiple of 16 (run_tiled); None: there is none."""
    sides = [min(box.height[1], box.width[1]) for box in envelope.boxes if box.batch[0] <= 1]
    core = (min(max(sides, default=0), tile or TILE) - 2 * halo) // 16 * 16
    return core + 2 * halo if core >= 16 else None


def proven_fit(envelope, height: int, width: int, halo: int | None, tile: int | None = None) -> bool:
    """Whether a padded input of ``height`` x ``width`` runs inside ``envelope`` (whole, or
    every window of its tiles) at batch 1: what predict checks before it runs anything."""
    side = tiling(height, width, halo, tile or TILE, envelope)
    if side is None:
        return envelope.accepts(1, height, width)
    core = side - 2 * halo
    rows, cols = ({w1 - w0 for *_, w0, w1 in _spans(n, core, halo)} for n in (height, width))
    return all(envelope.accepts(1, h, w) for h in rows for w in cols)


class _Within:
    """The calls an ``envelope`` holds: a batch larger than it holds at that size runs in parts
    (batch invariance is part of the proof); a size it does not hold is refused in one line naming
    the envelope (UserError), before the artefact sees it."""

    def __init__(self, envelope):
        self.envelope = envelope

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        n, _, height, width = x.shape
        step = next((k for k in range(n, 0, -1) if self.envelope.accepts(k, height, width)), None)
        if step is None:
            self.envelope.check(n, height, width)  # raises, naming the envelope and the nearest sizes
        return [x] if step == n else [x[i : i + step] for i in range(0, n, step)]


def _spans(size: int, core: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(core start, core end, window start, window end) along one axis; starts on multiples of 16
    (core and halo are), the last window ends at the image's end, as the untiled run's does."""
    if size <= core + 2 * halo:
        return [(0, size, 0, size)]
    return [(c0, min(size, c0 + core), max(0, c0 - halo), min(size, c0 + core + halo)) for c0 in range(0, size, core)]


def run_tiled(runner: Runner, x: torch.Tensor, tile: int, halo: int) -> torch.Tensor:
    """Logits of (N, C, H, W) ``x`` from windows of at most ``tile`` x ``tile``, each keeping its
    centre: peak memory is one window's activations plus the input and the logits."""
    spans = tile_spans(*x.shape[-2:], tile, halo)
    return _placed(tuple(x.shape), spans, (runner.infer(x[..., w0:w1, v0:v1]) for *_, w0, w1, v0, v1 in spans))


def tile_spans(height: int, width: int, tile: int, halo: int) -> list[tuple[int, ...]]:
    """(core rows c0:c1, core columns d0:d1, window rows w0:w1, window columns v0:v1) of each tile."""
    core = tile - 2 * halo
    if core < 16 or core % 16 or halo % 16:
        raise ValueError(f"tile {tile} and halo {halo} must leave a core that is a positive multiple of 16")
    return [(c0, c1, d0, d1, w0, w1, v0, v1) for c0, c1, w0, w1 in _spans(height, core, halo)
            for d0, d1, v0, v1 in _spans(width, core, halo)]  # fmt: skip


def _placed(shape: tuple[int, ...], spans: list[tuple[int, ...]], windows) -> torch.Tensor:
    """The logits of a batch of ``shape`` from its tiles' logits (``windows``, in ``spans``' order),
    each keeping its centre; a window is let go as soon as it is placed."""
    out = None
    for (c0, c1, d0, d1, w0, _, v0, _), logits in zip(spans, windows):
        logits = logits.float()
        if out is None:
            out = torch.empty(shape[0], logits.shape[1], *shape[-2:], device=logits.device)
        out[..., c0:c1, d0:d1] = logits[..., c0 - w0 : c1 - w0, d0 - v0 : d1 - v0]
        del logits
    return out


def load_predictor(model_path: str | Path, device, model: str | None = None) -> Predictor:
    """A runner for MODEL by its suffix, and the model record its metadata carries. An artefact
    its folder's manifest records runs as that entry (checked against its sha256, must have passed)."""
    path = Path(model_path)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".pth", ".pt", ".safetensors"):  # a save_pretrained folder is a checkpoint
        ckpt = load_checkpoint(path, model)
        return make_predictor(ckpt.record(), EagerRunner(build_model(ckpt), device), "eager")
    if suffix not in (*ARTEFACT_READERS, ".engine"):
        raise UserError(f"{path.name}: MODEL must be a checkpoint (.pth, .safetensors), an artefact (.onnx, .ts, .pt2, .xml, "
                        ".engine) or a workdir with a manifest.json")  # fmt: skip
    recorded = _recorded_entry(path)
    if recorded is not None:
        manifest, entry = recorded
        return entry_predictor(manifest, entry, path.parent, device)
    if suffix == ".engine":
        raise UserError(f"{path.name} is not in {path.parent}/manifest.json: engines are run with their manifest record")
    record = _artefact_record(path, suffix)
    fixed = _static_shape(path) if suffix == ".onnx" else None
    return make_predictor(record, ARTEFACT_READERS[suffix][1](path, device), runtime_label(_FORMATS[suffix], "fp32"),
                          fixed)  # fmt: skip


def make_predictor(record: dict, runner: Runner, label: str, fixed: tuple[int, ...] | None = None) -> Predictor:
    """A predictor from a model record (checkpoint, artefact metadata or manifest) and a runner;
    ``fixed``: a static artefact's (N, C, H, W)."""
    config = record.get("config", {})
    architecture = record.get("architecture", "milesial")
    return Predictor(runner, class_mask_values(record.get("mask_values"), config.get("n_classes", 2)),
                     Preprocess.from_dict(record.get("preprocess")), get_spec(architecture).sizes(config),
                     int(config.get("n_channels", 3)), TILE_HALO.get(architecture),
                     tuple(fixed[2:]) if fixed else None, fixed[0] if fixed else None, label,
                     mask_threshold(config))  # fmt: skip


def entry_predictor(manifest: dict, entry: dict, workdir: Path, device) -> Predictor:
    """The predictor for one verified manifest entry, with the runner that verified it."""
    if entry["status"] != "verified":
        raise UserError(f"{workdir / entry['path']} failed its parity check ({workdir}/manifest.json); fix and re-export it")
    fixed = entry["inputs"][0]["shape"] if entry.get("size_rule", {}).get("static") else None
    predictor = make_predictor(manifest["model"], artifact_runner(entry, workdir, device),
                               runtime_label(entry["format"], entry["precision"]), fixed)  # fmt: skip
    predictor.entry = entry
    return predictor


# artefact format -> the runtime that runs it, as `--runtime` names it (with -PRECISION unless fp32)
RUNTIME_OF = {"onnx": "onnxruntime", "openvino": "openvino", "torchscript": "torchscript", "aoti": "aoti",
              "tensorrt": "tensorrt"}  # fmt: skip


def runtime_label(fmt: str, precision: str) -> str:
    return RUNTIME_OF.get(fmt, fmt) + ("" if precision == "fp32" else f"-{precision}")


def _static_shape(path: Path) -> tuple[int, ...] | None:
    """(N, C, H, W) of an ONNX model exported with --static (every input dim a number), else None."""
    onnx = require("onnx")
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    if len(dims) == 4 and all(d.HasField("dim_value") for d in dims):
        return tuple(d.dim_value for d in dims)
    return None


# suffix -> (metadata reader, runner): what predict runs without a manifest record.
ARTEFACT_READERS = {".onnx": (onnx_export.read_metadata, OnnxRuntimeRunner),
                    ".ts": (torchscript_export.read_metadata, TorchScriptRunner),
                    ".pt2": (aoti_export.read_metadata, AotiRunner),
                    ".xml": (openvino_export.read_metadata, lambda path, device: OpenVinoRunner(path, "cpu"))}  # fmt: skip
_FORMATS = {".onnx": "onnx", ".ts": "torchscript", ".pt2": "aoti", ".xml": "openvino"}


def _artefact_record(path: Path, suffix: str) -> dict:
    """The model record an artefact carries; a damaged file or one unet-export did not write is
    bad input (exit 2), not a crash in the runtime's parser."""
    try:
        record = decode_metadata(ARTEFACT_READERS[suffix][0](path))
    except Exception as exc:  # protobuf, zip and Inductor readers raise their own types
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"{path} is not a readable {suffix} artefact ({type(exc).__name__}: {detail}); export it again") from None
    if not isinstance(record.get("config"), dict) or "architecture" not in record:
        raise UserError(f"{path} carries no unet-export model record: predict runs artefacts exported by unet-export")
    return record


def _recorded_entry(path: Path) -> tuple[dict, dict] | None:
    """(manifest, entry) when the artefact's folder has a manifest that records it; one copied
    without a manifest runs on its own metadata."""
    if not (path.parent / "manifest.json").is_file():
        return None
    manifest = load_manifest(path.parent)
    for entry in manifest["artifacts"]:
        if entry["path"] == path.name:
            checked_path(path.parent, entry)
            return manifest, entry
    return None


def predict_classes(predictor: Predictor, image_path: Path, max_pixels: int | None = None):
    """(class index per pixel at the image's size as an array, the image as the model read it)."""
    img = load_image(image_path, predictor.n_channels, max_pixels)
    x = image_to_tensor(img, predictor.preprocess, predictor.n_channels)[None]
    logits = fit_and_run(predictor.runner, x, predictor.sizes, predictor.halo, fixed=predictor.fixed,
                         envelope=predictor.envelope).float().cpu()  # fmt: skip
    del x
    return to_classes(logits, img.size, predictor.preprocess, predictor.threshold), img


def to_classes(logits: torch.Tensor, size: tuple[int, int], preprocess: Preprocess,
               threshold: float = 0.0) -> np.ndarray:  # fmt: skip
    """(1, classes, h, w) logits at the model's scale -> HxW class indices at the image's (width, height);
    one class: output > ``threshold`` (models.mask_threshold)."""
    width, height = size
    if preprocess.square:  # undo pad-to-square: back to the square canvas, then crop
        side = max(width, height)
        logits = F.interpolate(logits, (side, side), mode="bilinear")[..., :height, :width]
    elif logits.shape[-2:] != (height, width):
        logits = F.interpolate(logits, (height, width), mode="bilinear")
    if logits.shape[1] == 1:
        return logits_to_mask(logits, threshold)[0].numpy()
    # numpy's argmax over the class axis: logits_to_mask's torch.argmax(dim=1) answers the same
    # (the first maximum, NaN counted as the maximum) but took 167 ms for one 640x960 image
    # here against 16 ms, more than the encode and decode stages together.
    return logits[0].detach().cpu().numpy().argmax(axis=0)


def mask_to_image_array(classes: np.ndarray, mask_values: list) -> np.ndarray:
    """Class indices -> stored mask values: grey levels, or RGB triplets."""
    values = np.asarray(mask_values)
    return values.astype(np.uint8 if values.max() <= 255 else np.uint16)[classes]


def overlay(img: Image.Image, classes: np.ndarray, alpha: float = 0.5) -> Image.Image:
    colours = OVERLAY_COLOURS[classes % len(OVERLAY_COLOURS)]
    base = np.asarray(img.convert("RGB"), dtype=np.float32)
    blended = np.where(classes[..., None] > 0, base * (1 - alpha) + colours * alpha, base)
    return Image.fromarray(blended.astype(np.uint8))
