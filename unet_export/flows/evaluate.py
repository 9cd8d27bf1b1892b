"""Mean Dice against ground truth (milesial's definition) for any runner: the eager model
during training and `evaluate`, and every artefact in a workdir's manifest."""

import torch

from unet_export.checkpoint import build_model, class_mask_values, load_checkpoint
from unet_export.data.dataset import check_dataset, find_samples, Preprocess, SegmentationDataset
from unet_export.device import resolve_device
from unet_export.errors import IntegrityError, UnetExportError, UserError
from unet_export.inference.predictor import TILE, TILE_HALO, run_tiled
from unet_export.metrics import center_crop, dice_score, logits_to_mask
from unet_export.models import get_spec, mask_threshold
from unet_export.runtimes import EagerRunner
from unet_export.runtimes.base import Runner
from unet_export.workdir.manifest import load_manifest
from unet_export.workdir.runners import artifact_runner


def mean_dice(runner: Runner, dataset, n_classes: int, batch_size: int = 1, halo: int | None = None, *,
              threshold: float = 0.0) -> float:  # fmt: skip
    """Mean over images and foreground classes; ``runner`` must be active. With ``halo`` (the
    model's TILE_HALO), images larger than predict's TILE run in tiles, as predict runs them.
    ``threshold``: where a one-class output turns into class 1 (models.mask_threshold)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    total, count = 0.0, 0
    for batch in loader:
        images = batch["image"]
        tiled = halo and max(images.shape[-2:]) > TILE
        logits = run_tiled(runner, images, TILE, halo) if tiled else runner.infer(images)
        pred = logits_to_mask(logits.cpu(), threshold)
        target = center_crop(batch["mask"], pred.shape[-2:])
        # every image has the same number of classes, so batch means weighted by size are exact
        total += dice_score(pred, target, n_classes) * len(pred)
        count += len(pred)
    return total / max(count, 1)


def evaluate(weights, data_dir, workdir=None, *, device: str = "auto", mask_suffix: str = "_mask",
             batch_size: int = 1, model: str | None = None, max_pixels: int | None = None,
             mask_values: list | None = None) -> dict:  # fmt: skip
    """Mean Dice of the eager model and of every artefact in ``workdir``'s manifest that came
    from the same checkpoint: {"eager": {"dice"}, "artifacts": [{format, precision, dice, ...}]}.
    ``mask_values`` (class i -> mask value) serve a checkpoint that records none.
    Every image/mask pair is checked, in one pass, before the first inference."""
    ckpt = load_checkpoint(weights, model)
    _, samples = find_samples(data_dir, mask_suffix)
    n_classes = ckpt.config.get("n_classes", 2)
    if mask_values and ckpt.mask_values and mask_values != ckpt.mask_values:
        raise UserError(f"--mask-values {mask_values} differ from {ckpt.path}'s mask_values {ckpt.mask_values}: "
                        "leave the option out, the checkpoint knows its classes")  # fmt: skip
    defaulted = not (mask_values or ckpt.mask_values)
    mask_values = class_mask_values(mask_values or ckpt.mask_values, n_classes)
    if len(mask_values) != max(n_classes, 2):
        raise UserError(f"{ckpt.path} has {n_classes} classes but mask_values {mask_values}")
    pp, n_channels = Preprocess.from_dict(ckpt.preprocess), ckpt.config.get("n_channels", 3)
    # With the default classes, check the values after the pass: then the error can name them all.
    check = check_dataset(samples, n_channels=n_channels, mask_values=None if defaulted else mask_values, pp=pp,
                          same_size=batch_size > 1, rule=get_spec(ckpt.architecture).sizes(ckpt.config),
                          max_pixels=max_pixels)  # fmt: skip
    if defaulted:
        _check_default_values(ckpt.path, check.mask_values, mask_values)
    dataset = SegmentationDataset(samples, mask_values, pp, n_channels, max_pixels)
    dev, halo, threshold = resolve_device(device), TILE_HALO.get(ckpt.architecture), mask_threshold(ckpt.config)
    with EagerRunner(build_model(ckpt), dev) as eager:
        eager_dice = mean_dice(eager, dataset, n_classes, batch_size, halo, threshold=threshold)
    report = {"eager": {"dice": eager_dice}, "artifacts": [], "images": len(dataset)}
    manifest = load_manifest(workdir) if workdir else {"model": None, "artifacts": []}
    if (manifest.get("model") or {}).get("checkpoint", {}).get("sha256") != ckpt.sha256:
        return report  # the workdir's artefacts (if any) come from another checkpoint
    for entry in manifest["artifacts"]:
        row = {"format": entry["format"], "precision": entry["precision"], "path": entry["path"]}
        try:
            _check_static(entry, dataset, batch_size)
            with artifact_runner(entry, workdir, dev) as runner:
                dice = mean_dice(runner, dataset, n_classes, batch_size, halo, threshold=threshold)
            row |= {"status": "ok", "dice": dice, "delta_vs_eager": dice - eager_dice}
        except IntegrityError:
            raise  # a missing or changed artefact is an error, never an 'unavailable' row
        except UnetExportError as exc:  # e.g. TensorRT not installed here: say so, keep going
            row |= {"status": "unavailable", "reason": str(exc), "dice": None, "delta_vs_eager": None}
        report["artifacts"].append(row)
    return report


def _check_default_values(weights, found: list, defaults: list) -> None:
    """A checkpoint without mask_values takes masks of class indices (predict.py's default); masks
    of other values (0/255 is common) need the user's mapping, and the error says how to give it."""
    extra = [v for v in found if v not in defaults]
    if not extra:
        return
    show = ",".join(":".join(map(str, v)) if isinstance(v, list) else str(v) for v in found)
    hint = (f"pass --mask-values {show}" if len(found) == len(defaults)
            else f"pass --mask-values with the {len(defaults)} classes' values, background first")
    raise UserError(f"the masks hold {show} but {weights} records no mask_values, so its classes "
                    f"are {defaults}: {hint}")  # fmt: skip


def _check_static(entry: dict, dataset, batch_size: int) -> None:
    """A static artefact takes its export shape only; other images are not its failure to judge."""
    if not entry.get("size_rule", {}).get("static"):
        return
    shape = list(entry["inputs"][0]["shape"])
    sizes = {tuple(dataset[i]["image"].shape[-2:]) for i in range(len(dataset))}
    if shape[0] != batch_size or sizes != {tuple(shape[2:])}:
        found = ", ".join(f"{h}x{w}" for h, w in sorted(sizes))
        raise UserError(f"static artefact takes {'x'.join(map(str, shape))}, the images are {found} "
                        f"(batch {batch_size}): export without --static to evaluate other sizes")  # fmt: skip


def gate(report: dict, min_dice: float | None = None, max_delta: float | None = None) -> list[str]:
    """The CI gate's failures: Dice below ``min_dice``, or an artefact more than ``max_delta`` below eager.
    A gate with nothing to judge is bad input (UserError), never a silent pass."""
    unjudged = [f"{a['format']} {a['precision']} ({a['reason']})" for a in report["artifacts"] if a["dice"] is None]
    if (min_dice is not None or max_delta is not None) and unjudged:
        raise UserError(f"the gate cannot judge {', '.join(unjudged)}: run evaluate where it can run, or export it again")
    if max_delta is not None and not report["artifacts"]:
        raise UserError("--max-delta compares artefacts with eager, but the workdir has no artefact of this checkpoint: "
                        "export it first (unet-export onnx WEIGHTS --workdir DIR)")  # fmt: skip
    failures = []
    rows = [("eager", report["eager"]["dice"], 0.0)] + [
        (f"{a['format']} {a['precision']}", a["dice"], a["delta_vs_eager"]) for a in report["artifacts"] if a["dice"] is not None
    ]
    for name, dice, delta in rows:
        if min_dice is not None and dice < min_dice:
            failures.append(f"{name}: Dice {dice:.4f} < --min-dice {min_dice}")
        if max_delta is not None and -delta > max_delta:
            failures.append(f"{name}: Dice {-delta:.4f} below eager > --max-delta {max_delta}")
    return failures


def check_model_size(architecture: str, config: dict, dataset) -> None:
    """Training and evaluation feed whole images: they must already have a size the model takes."""
    height, width = dataset[0]["image"].shape[-2:]
    rule = get_spec(architecture).sizes(config)
    if not (rule.accepts(height) and rule.accepts(width)):
        raise UserError(f"images are {height}x{width} after preprocessing, but {architecture} takes "
                        f"{rule.describe()}: use --square {rule.at_least(max(height, width))}")  # fmt: skip
