"""Training as milesial's train.py does it (CE + Dice loss, BCE + Dice for one class, gradient
clipping, AMP on CUDA, LR schedule on validation Dice, a checkpoint per epoch in milesial's
format), reading milesial's and the VOC layout, with either preprocessing."""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from unet_export.checkpoint import build_model, load_checkpoint
from unet_export.data.dataset import check_dataset, data_hash, find_samples, Preprocess, SegmentationDataset
from unet_export.data.images import DEFAULT_MAX_PIXELS
from unet_export.device import resolve_device
from unet_export.errors import UserError
from unet_export.fileio import atomic_path, loads_json, write_json
from unet_export.flows.evaluate import mean_dice
from unet_export.metrics import center_crop
from unet_export.models import create_model, get_spec
from unet_export.runtimes import EagerRunner


@dataclass
class TrainConfig:
    model: str = "milesial"
    model_config: dict = field(default_factory=dict)  # e.g. {"width": 16, "bilinear": False}
    epochs: int = 5
    batch_size: int = 4
    lr: float = 1e-3
    optimizer: str = "adam"  # adam, or rmsprop as milesial (lr 1e-5, momentum 0.999)
    scale: float = 1.0
    square: int | None = None
    amp: bool = False
    val_fraction: float = 0.1
    mask_suffix: str = "_mask"
    seed: int = 0
    device: str = "auto"
    mask_values: list | None = None  # the classes' mask values; default: every value the masks hold
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class TrainResult:
    checkpoints: list[Path]
    history: list[dict]
    mask_values: list


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the whole batch (milesial's dice_loss with reduce_batch_first)."""
    if logits.shape[1] == 1:
        probs, onehot = torch.sigmoid(logits[:, 0]), target.float()
    else:
        probs = F.softmax(logits, dim=1)
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = 2 * (probs * onehot).sum()
    return 1 - (inter + 1e-6) / (probs.sum() + onehot.sum() + 1e-6)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.float()) + dice_loss(logits, target)
    return F.cross_entropy(logits, target) + dice_loss(logits, target)


def train(data_dir: str | Path, workdir: str | Path, cfg: TrainConfig, resume: str | Path | None = None,
          on_step: Callable | None = None, on_epoch: Callable | None = None,
          on_checked: Callable | None = None) -> TrainResult:  # fmt: skip
    """Train on ``data_dir``; writes workdir/checkpoint_epochN.pth (+ .json sidecar, + .state.pt).
    Every image/mask pair of both splits is checked, in one pass, before the first step."""
    workdir, device = Path(workdir), resolve_device(cfg.device)
    layout, samples = find_samples(data_dir, cfg.mask_suffix)
    pp = Preprocess(cfg.scale, cfg.square)
    model, architecture, mask_values, n_channels, start, history = _model_and_state(cfg, samples, pp, resume,
                                                                                    on_checked)  # fmt: skip
    dataset = SegmentationDataset(samples, mask_values, pp, n_channels, cfg.max_pixels)
    train_set, val_set = _split(dataset, cfg)
    model = model.to(device)
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "max", patience=5)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    if resume:
        _load_train_state(Path(resume), optimizer, scheduler, scaler)
    meta = {"model": architecture, "data": {"path": str(Path(data_dir).resolve()), "layout": layout, "sha256": data_hash(samples),
                     "train": len(train_set), "val": len(val_set)}, "preprocess": pp.to_dict()}  # fmt: skip
    checkpoints = []
    for epoch in range(start + 1, cfg.epochs + 1):
        started = time.perf_counter()
        loss = _train_epoch(model, train_set, optimizer, scaler, cfg, device, epoch, on_step)
        with EagerRunner(model, device) as runner:
            dice = mean_dice(runner, val_set, model.n_classes, cfg.batch_size)
        scheduler.step(dice)
        history.append({"epoch": epoch, "train_loss": loss, "val_dice": dice, "lr": optimizer.param_groups[0]["lr"],
                        "seconds": time.perf_counter() - started})  # fmt: skip
        checkpoints.append(_save(workdir, epoch, model, mask_values, cfg, meta, history, optimizer, scheduler, scaler))
        if on_epoch:
            on_epoch(history[-1])
    return TrainResult(checkpoints, history, mask_values)


def _model_and_state(cfg: TrainConfig, samples, pp: Preprocess, resume, on_checked):
    """A new model sized from the data, or the checkpoint to resume with its history; either way
    after the one pass over the data that check_dataset makes (both splits: images are batched,
    so every preprocessed size must be equal and one the model takes)."""
    if resume:
        sidecar = _read_sidecar(Path(resume))
        ckpt = load_checkpoint(resume, sidecar.get("model"))  # a variant (valid-pad) is not in the keys
        if cfg.mask_values and ckpt.mask_values and cfg.mask_values != ckpt.mask_values:
            raise UserError(f"--mask-values {cfg.mask_values} differ from {resume}'s mask_values {ckpt.mask_values}")
        wanted = cfg.mask_values or ckpt.mask_values
        n_channels = ckpt.config.get("n_channels", 3)
        rule = get_spec(ckpt.architecture).sizes(ckpt.config)
        check = check_dataset(samples, n_channels=n_channels, mask_values=wanted, pp=pp, same_size=True, rule=rule,
                              max_pixels=cfg.max_pixels)  # fmt: skip
        if on_checked:
            on_checked(check)
        mask_values = wanted or check.mask_values
        model = build_model(ckpt).train()
        return model, ckpt.architecture, mask_values, n_channels, sidecar.get("epoch", 0), sidecar.get("metrics", [])
    spec = get_spec(cfg.model)
    check = check_dataset(samples, mask_values=cfg.mask_values, pp=pp, same_size=True,
                          rule=spec.sizes(spec.defaults | cfg.model_config), max_pixels=cfg.max_pixels)  # fmt: skip
    if on_checked:
        on_checked(check)
    mask_values = cfg.mask_values or check.mask_values
    if len(mask_values) < 2:
        raise UserError(f"every mask holds the single value {mask_values}: nothing to segment")
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, n_channels=check.channels, n_classes=len(mask_values), **cfg.model_config)
    return model.train(), cfg.model, mask_values, check.channels, 0, []


def _split(dataset, cfg: TrainConfig):
    n_val = int(len(dataset) * cfg.val_fraction)
    if n_val < 1 or n_val >= len(dataset):
        raise UserError(f"{len(dataset)} images with --val-fraction {cfg.val_fraction} leave no "
                        "training or no validation images")  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed)  # milesial splits with seed 0 too
    return torch.utils.data.random_split(dataset, [len(dataset) - n_val, n_val], generator=gen)


def _optimizer(model, cfg: TrainConfig):
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=cfg.lr, weight_decay=1e-8, momentum=0.999, foreach=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    raise UserError(f"--optimizer {cfg.optimizer!r}: choose adam or rmsprop")


def _train_epoch(model, train_set, optimizer, scaler, cfg, device, epoch, on_step) -> float:
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=gen)
    total = 0.0
    for step, batch in enumerate(loader, 1):
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        with torch.autocast(device.type, enabled=scaler.is_enabled()):
            logits = model(images).float()
            loss = segmentation_loss(logits, center_crop(masks, logits.shape[-2:]))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        total += loss.item()
        if on_step:
            on_step(epoch, step, len(loader), loss.item())
    return total / len(loader)


def _save(workdir: Path, epoch, model, mask_values, cfg, meta, history, optimizer, scheduler, scaler) -> Path:
    """milesial's format (state_dict + mask_values), a JSON sidecar, and the optimiser state."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"checkpoint_epoch{epoch}.pth"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state["mask_values"] = mask_values
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    config = {k: getattr(model, k) for k in ("n_channels", "n_classes") if hasattr(model, k)}
    write_json(path.with_suffix(".json"), {"config": config | cfg.model_config, "epoch": epoch,
               "mask_values": mask_values, "metrics": history, "train_config": asdict(cfg), **meta})  # fmt: skip
    with atomic_path(path.with_suffix(".state.pt")) as tmp:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict()}, tmp)  # fmt: skip
    return path


def _read_sidecar(ckpt: Path) -> dict:
    path = ckpt.with_suffix(".json")
    if not path.is_file():
        return {}
    try:
        return loads_json(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; remove it to resume from the weights alone") from None


def _load_train_state(ckpt: Path, optimizer, scheduler, scaler) -> None:
    path = ckpt.with_suffix(".state.pt")
    if path.is_file():  # without it, resume restarts the optimiser from the weights alone
        state = torch.load(path, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])

