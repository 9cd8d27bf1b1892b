"""What an INT8 artefact is judged on, and the judging: the calibration images (checked like the
training data), the held-out --val pairs, the gate set (same-size batches of real images with
eager's logits in fp32 and fp64, and the masks) and judge(), which runs a staged artefact on it.
Real images only: INT8 on noise says nothing."""

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unet_export.checkpoint import class_mask_values
from unet_export.data.dataset import (
    check_dataset,
    find_samples,
    IMAGE_EXTS,
    image_to_tensor,
    Preprocess,
    SegmentationDataset,
)
from unet_export.data.images import image_channels, load_image, open_image
from unet_export.errors import UnetExportError, UserError
from unet_export.fileio import sha256_file
from unet_export.metrics import center_crop, dice_score, logits_to_mask
from unet_export.models import get_spec, mask_threshold
from unet_export.parity.gate import GATE_IMAGES, ParityReport, Tolerance, judge_input
from unet_export.parity.realimages import IMAGES_PER_BATCH, probe_images
from unet_export.runtimes import EagerRunner
from unet_export.workdir.runners import artifact_runner

MAX_SUBSET = 300  # NNCF's default subset_size: more calibration images rarely move the ranges
GATE_BATCH = IMAGES_PER_BATCH  # verify re-judges the recorded gate images in the same batches
GATE_CALIB_IMAGES = 8  # without --val the gate runs on the first calibration images: one batch


@dataclass
class Images:
    """Calibration images as the model will see them."""

    folder: Path
    paths: list[Path]
    pp: Preprocess
    channels: int

    def tensor(self, path: Path) -> torch.Tensor:
        return image_to_tensor(load_image(path, self.channels), self.pp, self.channels)

    @functools.cached_property
    def record(self) -> dict:
        digest = hashlib.sha256()  # names and bytes: the same set, and only it, gives this hash
        for path in self.paths:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return {"path": str(self.folder.resolve()), "count": len(self.paths), "sha256": digest.hexdigest(),
                "first": self.paths[0].name, "last": self.paths[-1].name}  # fmt: skip


@dataclass
class GateSet:
    """The real images every INT8 attempt is judged on, with eager's logits (computed once) and
    the ground-truth masks when there are any."""

    batches: list[
        tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]
    ]  # images, eager fp32, fp64, masks
    source: str
    n_classes: int
    eager_dice: float | None = None
    paths: list[Path] | None = None  # the image files, recorded with the entry for verify and bench
    threshold: float = 0.0  # where a one-class output turns into class 1 (models.mask_threshold)
    # the envelope probe each batch checks ("" for the gate's own images), when there is an envelope
    probes: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        """The gate's own images (Dice vs ground truth is averaged over them), not the probes'."""
        return sum(len(batch[0]) for batch, probe in zip(self.batches, self.labels) if not probe)

    @property
    def labels(self) -> list[str]:
        return self.probes or [""] * len(self.batches)


def add_probes(gates: GateSet, net, env, export_size: tuple[int, int]) -> None:
    """The gate's images at the envelope's probes (realimages.probe_images), eager's answers on
    them computed once like the gate's own; no envelope (a source exported before them): none."""
    if env is None:
        return
    inputs, labels = probe_images([batch[0] for batch in gates.batches], env, export_size)
    gates.probes = gates.labels
    with EagerRunner(net, "cpu") as eager, EagerRunner(net, "cpu", "fp64") as exact:
        for x, label in zip(inputs, labels):
            gates.batches.append((x, eager.infer(x).float().cpu(), exact.infer(x).cpu(), None))
            gates.probes.append(label)


def calibration_images(calib: str | Path | list, ckpt, subset: int | None) -> Images:
    """The first ``subset`` images (sorted by name) of a folder of images or a dataset (imgs/,
    JPEGImages/), or the listed image files, each readable, with the model's channel count, at a
    size the model takes."""
    if isinstance(calib, (list, tuple)):
        paths = [Path(p) for p in calib]
        folder = paths[0].parent if paths else Path(".")
    else:
        folder = Path(calib)
        if not folder.is_dir():
            raise UserError(f"--calib {folder}: not a folder of images")
        images = next((folder / d for d in ("imgs", "JPEGImages") if (folder / d).is_dir()), folder)
        paths = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not paths:
        raise UserError(f"--calib {folder} holds no images ({', '.join(sorted(IMAGE_EXTS))}); "
                        "calibrate on a few hundred images like the ones the model will see")  # fmt: skip
    if subset is not None and subset < 1:
        raise UserError(f"--subset must be at least 1, got {subset}")
    paths = paths[: min(subset or MAX_SUBSET, MAX_SUBSET)]
    channels, pp = int(ckpt.config.get("n_channels", 3)), Preprocess.from_dict(ckpt.preprocess)
    rule = get_spec(ckpt.architecture).sizes(ckpt.config)
    for path in paths:
        img = open_image(path)
        found, size = image_channels(img, path), img.size
        img.close()
        if found != channels:
            raise UserError(f"--calib {path} has {found} channel(s) but the model takes {channels}: calibrate on "
                            "images like the ones the model will see")  # fmt: skip
        width, height = pp.size(*size)
        if not (rule.accepts(height) and rule.accepts(width)):
            raise UserError(f"--calib {path} is {height}x{width} after preprocessing, but the model takes "
                            f"{rule.describe()}: resize the calibration images to the training size")  # fmt: skip
        load_image(path, channels).close()  # decodes every pixel: a truncated file fails here
    return Images(folder, paths, pp, channels)


def validation_samples(val: str | Path, ckpt, calib: Images, mask_suffix: str) -> list:
    """The labelled --val pairs, checked like `evaluate` checks them, minus every calibration image."""
    _, samples = find_samples(val, mask_suffix)
    n_classes = ckpt.config.get("n_classes", 2)
    check_dataset(samples, n_channels=calib.channels, mask_values=class_mask_values(ckpt.mask_values, n_classes),
                  pp=calib.pp, rule=get_spec(ckpt.architecture).sizes(ckpt.config))  # fmt: skip
    used = {sha256_file(p) for p in calib.paths}  # by content: a copied calibration image is still one
    held_out = [s for s in samples if sha256_file(s.image) not in used]
    if not held_out:
        raise UserError(f"every --val image in {val} is also a calibration image: keep calibration and Dice images "
                        "apart (e.g. --subset N calibrates on the first N only)")  # fmt: skip
    return held_out


def gate_set(net, ckpt, calib: Images, samples: list | None) -> GateSet:
    """Batches of same-size real images, eager's logits on them in fp32 and in float64 (the exact
    answer decisions are judged by, as verify.check_parity does) and (with --val) the masks."""
    n_classes, threshold = ckpt.config.get("n_classes", 2), mask_threshold(ckpt.config)
    if samples:
        dataset = SegmentationDataset(samples, class_mask_values(ckpt.mask_values, n_classes), calib.pp, calib.channels)
        items, source = [(d["image"], d["mask"]) for d in dataset], f"{len(samples)} held-out --val images"
        paths = [s.image for s in samples]
    else:
        paths = calib.paths[:GATE_CALIB_IMAGES]
        items = [(calib.tensor(p), None) for p in paths]
        source = f"{len(items)} calibration images (no --val: Dice vs ground truth not checked)"
    batches, total = [], 0.0
    with EagerRunner(net, "cpu") as eager, EagerRunner(net, "cpu", "fp64") as exact:
        for group in _same_size_groups(items):
            x = torch.stack([image for image, _ in group])
            masks = torch.stack([mask for _, mask in group]) if samples else None
            ref = eager.infer(x).float().cpu()
            if masks is not None:
                total += mask_dice(ref, masks, n_classes, threshold) * len(x)
            batches.append((x, ref, exact.infer(x).cpu(), masks))
    gates = GateSet(batches, source, n_classes, paths=list(paths), threshold=threshold)
    gates.eager_dice = total / gates.images if samples else None
    return gates


def _same_size_groups(items: list) -> list[list]:
    groups = []
    for item in items:
        if groups and len(groups[-1]) < GATE_BATCH and groups[-1][0][0].shape == item[0].shape:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def mask_dice(logits: torch.Tensor, masks: torch.Tensor, n_classes: int, threshold: float = 0.0) -> float:
    """milesial's Dice of the logits' mask (argmax, or > ``threshold`` for one class) against the
    masks (centre-cropped to the output)."""
    pred = logits_to_mask(logits, threshold)
    return dice_score(pred, center_crop(masks, pred.shape[-2:]), n_classes)


def judge(entry: dict, workdir: Path, staged: Path, gates: GateSet, tol: Tolerance, max_dice_drop: float):
    """Run the staged INT8 artefact on the gate set: per batch class change and Dice vs eager
    (verify.compare), then Dice vs ground truth against eager's. Returns (report, accuracy)."""
    runner = artifact_runner(entry, workdir, "cpu", path=staged)
    cases, total = [], 0.0
    try:
        with runner:
            for (x, ref, ref64, masks), probe in zip(gates.batches, gates.labels):
                # "" (no envelope) or the gate's whole images: the full gate; a probe: probe_tolerance
                label = probe or (GATE_IMAGES if gates.probes else "")
                case, out = judge_input(runner, x, ref, ref64, tol, gates.threshold, label)
                cases.append(case)
                if masks is not None:
                    total += mask_dice(out.float().cpu(), masks, gates.n_classes, gates.threshold) * len(x)
    except UnetExportError:
        raise
    except Exception as exc:  # the artefact would not run: a verification failure, as in parity.run.run_parity
        message = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        return ParityReport(runner.name, tol.name, [], error=message, limits=tol.to_dict()), None
    report = ParityReport(f"{runner.name} ({runner.describe()})", tol.name, cases, limits=tol.to_dict())
    if gates.eager_dice is None:
        return report, None
    dice = total / gates.images
    accuracy = {"images": gates.images, "eager_dice": gates.eager_dice, "dice": dice, "drop": gates.eager_dice - dice,
                "max_drop": max_dice_drop, "passed": gates.eager_dice - dice <= max_dice_drop}  # fmt: skip
    if not accuracy["passed"]:  # verify.ParityReport has no slot for a ground-truth check; its error holds it
        report.error = (f"Dice vs ground truth {dice:.4f} is {accuracy['drop']:.4f} below eager's {gates.eager_dice:.4f} "
                        f"on {gates.images} held-out images (allowed {max_dice_drop})")  # fmt: skip
    return report, accuracy
