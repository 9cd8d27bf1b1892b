"""Segmentation data as milesial/Pytorch-UNet and the bilibili tutorial lay it out, with their
preprocessing, and one-line errors for every way a folder can be wrong.

Layouts: milesial ``imgs/NAME.ext`` + ``masks/NAME<suffix>.ext`` (.npy and .pt masks too), and
VOC ``JPEGImages/NAME.jpg`` + ``SegmentationClass/NAME.png``. Classes come from milesial's
``mask_values``: the sorted unique mask values of the dataset, class i <-> mask_values[i].
"""

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from unet_export.errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
LAYOUTS = {"milesial": ("imgs", "masks"), "voc": ("JPEGImages", "SegmentationClass")}


@dataclass(frozen=True)
class Preprocess:
    """milesial: resize by ``scale`` (bicubic images, nearest masks). seed 003 (``square``): paste at
    (0, 0) on a black square canvas of the longest side, then resize to square x square."""

    scale: float = 1.0
    square: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Preprocess":
        return cls(**(data or {}))

    def size(self, width: int, height: int) -> tuple[int, int]:
        if self.square:
            return self.square, self.square
        new_w, new_h = int(self.scale * width), int(self.scale * height)
        if not (0 < self.scale <= 1) or new_w < 1 or new_h < 1:
            raise UserError(f"--scale {self.scale} must be in (0, 1] and leave at least one pixel")
        return new_w, new_h

    def resize(self, img: Image.Image, resample) -> Image.Image:
        if self.square:
            side = max(img.size)
            canvas = Image.new(img.mode, (side, side), 0)
            if img.mode == "P":
                canvas.putpalette(img.getpalette() or [])
            canvas.paste(img, (0, 0))
            img = canvas
        size = self.size(*img.size)
        return img if size == img.size else img.resize(size, resample)


@dataclass(frozen=True)
class Sample:
    name: str
    image: Path
    mask: Path


def find_samples(data_dir: str | Path, mask_suffix: str = "_mask") -> tuple[str, list[Sample]]:
    """(layout, samples) of a dataset folder; every image must have exactly one mask."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"dataset folder not found: {data_dir}")
    for layout, (img_dir, mask_dir) in LAYOUTS.items():
        if (data_dir / img_dir).is_dir() and (data_dir / mask_dir).is_dir():
            suffix = mask_suffix if layout == "milesial" else ""
            return layout, _pair(data_dir / img_dir, data_dir / mask_dir, suffix)
    wanted = " or ".join(f"{a}/ + {b}/" for a, b in LAYOUTS.values())
    raise UserError(f"{data_dir} has neither dataset layout: expected {wanted}")


def _pair(img_dir: Path, mask_dir: Path, suffix: str) -> list[Sample]:
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise UserError(f"{img_dir} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    masks = {}
    for path in mask_dir.iterdir():
        masks.setdefault(path.stem, []).append(path)
    samples = []
    for image in images:
        found = masks.get(image.stem + suffix, [])
        if len(found) != 1:
            problem = "no mask" if not found else f"{len(found)} masks"
            raise UserError(f"{image.name} has {problem} in {mask_dir} (expected {image.stem}{suffix}.<ext>)")
        samples.append(Sample(image.stem, image, found[0]))
    return samples


def load_image(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {' '.join(str(exc).split())[:120]}") from None
    return img if img.mode in ("RGB", "L", "P") else img.convert("RGB")


def load_mask(path: Path) -> np.ndarray:
    """Mask pixels as stored: HxW (grey or palette index) or HxWx3 (RGB)."""
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".pt":
            return torch.load(path, weights_only=True).numpy()
    except Exception as exc:  # numpy/torch raise many types for a corrupt file
        raise UserError(f"cannot read mask {path}: {type(exc).__name__}") from None
    img = load_image(path)
    return np.asarray(img.convert("RGB") if img.mode not in ("L", "P", "RGB") else img)


def unique_mask_values(samples: list[Sample]) -> list:
    """milesial's mask_values: sorted unique values, ints for grey masks, [r, g, b] for RGB."""
    found = set()
    for sample in samples:
        mask = load_mask(sample.mask)
        values = np.unique(mask.reshape(-1, mask.shape[-1]), axis=0) if mask.ndim == 3 else np.unique(mask)
        found.update(tuple(int(c) for c in v) if mask.ndim == 3 else int(v) for v in values)
    return [list(v) if isinstance(v, tuple) else v for v in sorted(found)]


def mask_to_classes(mask: np.ndarray, mask_values: list, where: Path) -> np.ndarray:
    """Class index per pixel; a value outside mask_values is an error, not a silent background."""
    classes = np.full(mask.shape[:2], -1, dtype=np.int64)
    for index, value in enumerate(mask_values):
        hit = (mask == np.asarray(value)).all(-1) if mask.ndim == 3 else mask == value
        classes[hit] = index
    if (classes < 0).any():
        bad = mask[classes < 0][0]
        raise UserError(f"{where}: mask value {np.asarray(bad).tolist()} is not one of mask_values {mask_values}")
    return classes


def check_sizes(samples: list[Sample]) -> None:
    """Every mask must have its image's size (checked up front, before any training starts)."""
    for sample in samples:
        image_size = load_image(sample.image).size
        mask = load_mask(sample.mask)
        if (mask.shape[1], mask.shape[0]) != image_size:
            raise UserError(f"{sample.mask.name} is {mask.shape[1]}x{mask.shape[0]} but {sample.image.name} is "
                            f"{image_size[0]}x{image_size[1]}: a mask must match its image")  # fmt: skip


def data_hash(samples: list[Sample]) -> str:
    """sha256 over every file name and byte: the sidecar says exactly what a model saw."""
    digest = hashlib.sha256()
    for sample in samples:
        for path in (sample.image, sample.mask):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def image_to_tensor(img: Image.Image, pp: Preprocess) -> torch.Tensor:
    """CHW float; divided by 255 when any value is above 1 (milesial), no mean/std."""
    arr = np.asarray(pp.resize(img, Image.BICUBIC), dtype=np.float32)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr / 255.0 if arr.max() > 1 else arr)


class SegmentationDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], mask_values: list, pp: Preprocess):
        self.samples, self.mask_values, self.pp = samples, mask_values, pp

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        image = image_to_tensor(load_image(sample.image), self.pp)
        mask = mask_to_classes(load_mask(sample.mask), self.mask_values, sample.mask)
        mask_img = self.pp.resize(Image.fromarray(mask.astype(np.int32)), Image.NEAREST)
        return {"image": image, "mask": torch.from_numpy(np.asarray(mask_img, dtype=np.int64))}
