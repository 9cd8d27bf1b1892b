"""Segmentation data as milesial/Pytorch-UNet and the bilibili tutorial lay it out, with their
preprocessing, and one-line errors for every way a folder can be wrong.

Layouts: milesial ``imgs/NAME.ext`` + ``masks/NAME<suffix>.ext`` (.npy and .pt masks too), and
VOC ``JPEGImages/NAME.jpg`` + ``SegmentationClass/NAME.png``. Classes come from milesial's
``mask_values``: the sorted unique mask values of the dataset, class i <-> mask_values[i].
"""

import hashlib
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unet_export.data.images import load_image, load_mask
from unet_export.errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
LAYOUTS = {"milesial": ("imgs", "masks"), "voc": ("JPEGImages", "SegmentationClass")}


@dataclass(frozen=True)
class Preprocess:
    """milesial: resize by ``scale`` (bicubic images, nearest masks). seed 003 (``square``): paste at
    (0, 0) on a black square canvas of the longest side, then resize to square x square. Then /255
    when any value is above 1 and, for encoders trained so (smp's ``preprocess_input``), the
    channels reversed (``bgr``) and (x - mean) / std per channel on that 0..1 scale."""

    scale: float = 1.0
    square: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    bgr: bool = False

    def __post_init__(self):
        for name in ("mean", "std"):  # lists from JSON become tuples: the dataclass stays hashable
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _per_channel(name, getattr(self, name)))
        if (self.mean is None) != (self.std is None) or (self.mean and len(self.mean) != len(self.std)):
            raise UserError(f"preprocess mean {_plain(self.mean)} and std {_plain(self.std)} must both be given, "
                            "one value per channel each")  # fmt: skip
        if self.std and min(self.std) <= 0:
            raise UserError(f"preprocess std {_plain(self.std)} must be above 0 in every channel")
        if not isinstance(self.bgr, bool):
            raise UserError(f"preprocess bgr {self.bgr!r} must be true or false")

    def to_dict(self) -> dict:
        """JSON-ready; a record without mean/std/bgr keeps the two keys it always had."""
        data = {"scale": self.scale, "square": self.square}
        if self.mean is not None or self.bgr:
            data |= {"mean": _plain(self.mean), "std": _plain(self.std), "bgr": self.bgr}
        return data

    @classmethod
    def from_dict(cls, data: dict | None) -> "Preprocess":
        """The record as the manifest or a sidecar holds it; "source" (where mean/std came from) is
        for people only."""
        if data is not None and not isinstance(data, dict):
            raise UserError(f"preprocess record {data!r} is not an object of scale, square, mean, std, bgr")
        data = {k: v for k, v in (data or {}).items() if k != "source"}
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"preprocess record has unknown key(s) {', '.join(unknown)}: expected scale, square, "
                            "mean, std, bgr (and source)")  # fmt: skip
        return cls(**data)

    def normalise(self, chw: np.ndarray) -> np.ndarray:
        """A CHW float32 array on the 0..1 scale -> channels reversed if ``bgr``, then (x - mean) / std:
        a new contiguous array (``chw`` may be a read-only view). Old records: the values unchanged."""
        if self.bgr:
            chw = chw[::-1]
        if self.mean is not None:
            if len(self.mean) != chw.shape[0]:
                raise UserError(f"preprocess mean/std have {len(self.mean)} values but the image has "
                                f"{chw.shape[0]} channel(s): one per channel of the model's input")  # fmt: skip
            mean, std = (np.asarray(v, dtype=np.float32).reshape(-1, 1, 1) for v in (self.mean, self.std))
            chw = (chw - mean) / std
        return np.ascontiguousarray(chw, dtype=np.float32)

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


def _per_channel(name: str, values) -> tuple[float, ...]:
    if not isinstance(values, (list, tuple)) or not values or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise UserError(f"preprocess {name} {values!r} must be a list of numbers, one per channel")
    return tuple(float(v) for v in values)


def _plain(values: tuple | None) -> list | None:
    return None if values is None else list(values)


@dataclass(frozen=True)
class Sample:
    name: str
    image: Path
    mask: Path


def images_folder(folder: str | Path) -> Path | None:
    """The images folder of a dataset folder (either layout), or None where ``folder`` is none."""
    folder = Path(folder)
    for img_dir, mask_dir in LAYOUTS.values():
        if (folder / img_dir).is_dir() and (folder / mask_dir).is_dir():
            return folder / img_dir
    return None


def find_samples(data_dir: str | Path, mask_suffix: str = "_mask") -> tuple[str, list[Sample]]:
    """(layout, samples) of a dataset folder; every image must have exactly one mask."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"dataset folder not found: {data_dir}")
    for layout, (img_dir, mask_dir) in LAYOUTS.items():
        if images_folder(data_dir) == data_dir / img_dir:
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


def _values(mask: np.ndarray) -> list:
    """The distinct values of one mask: ints for grey masks, (r, g, b) tuples for RGB."""
    if mask.ndim == 3:
        return [tuple(int(c) for c in v) for v in np.unique(mask.reshape(-1, mask.shape[-1]), axis=0)]
    return [int(v) for v in np.unique(mask)]


def _plain_values(values) -> list:
    return [list(v) if isinstance(v, tuple) else v for v in sorted(values)]


def unique_mask_values(samples: list[Sample]) -> list:
    """milesial's mask_values: sorted unique values, ints for grey masks, [r, g, b] for RGB."""
    found = set()
    for sample in samples:
        found.update(_values(load_mask(sample.mask)))
    return _plain_values(found)


def mask_to_classes(mask: np.ndarray, mask_values: list, where: Path) -> np.ndarray:
    """Class index per pixel; a value outside mask_values is an error, not a silent background."""
    classes = np.full(mask.shape[:2], -1, dtype=np.int64)
    for index, value in enumerate(mask_values):
        value = np.asarray(value)
        if (mask.ndim == 3) != (value.ndim == 1):  # an RGB mask against grey values, or the reverse
            continue
        hit = (mask == value).all(-1) if mask.ndim == 3 else mask == value
        classes[hit] = index
    if (classes < 0).any():
        bad = mask[classes < 0][0]
        raise UserError(f"{where}: mask value {np.asarray(bad).tolist()} is not one of mask_values {mask_values}")
    return classes


@dataclass
class DatasetCheck:
    """What one pass over every image/mask pair found."""

    images: int  # pairs checked
    mask_values: list  # sorted distinct mask values over all masks
    masks_with: dict  # value -> how many masks hold it (a value in one mask only is worth a look)
    channels: int  # 1 if every image is grey, else 3
    sizes: dict  # (height, width) after preprocessing -> first image with that size

    def describe_values(self) -> str:
        return ", ".join(f"{_plain_values([v])[0]} ({n})" for v, n in sorted(self.masks_with.items()))


def check_dataset(samples: list[Sample], *, n_channels: int | None = None, mask_values: list | None = None,
                  pp: "Preprocess | None" = None, rule=None, same_size: bool = False,
                  max_pixels: int | None = None) -> DatasetCheck:  # fmt: skip
    """Every image/mask pair, once, before any training or evaluation step: images decodable
    and under the pixel limit, channels usable by the model, masks of their image's size, all
    grey or all RGB, values within ``mask_values`` (when given), preprocessed sizes accepted by
    ``rule`` and (``same_size``) equal, so they batch. Each error names its file."""
    pp = pp or Preprocess()
    wanted = None if mask_values is None else {tuple(v) if isinstance(v, list) else v for v in mask_values}
    masks_with: dict = {}
    channels, sizes, first_mask = 1, {}, None
    for sample in samples:
        img = load_image(sample.image, n_channels, max_pixels)
        channels = max(channels, 3 if img.mode == "RGB" else 1)
        mask = load_mask(sample.mask, max_pixels)
        if (mask.shape[1], mask.shape[0]) != img.size:
            raise UserError(f"{sample.mask.name} is {mask.shape[1]}x{mask.shape[0]} but {sample.image.name} is "
                            f"{img.size[0]}x{img.size[1]}: a mask must match its image")  # fmt: skip
        first_mask = first_mask or (sample.mask, mask.ndim)
        if mask.ndim != first_mask[1]:
            kinds = {2: "grey/index", 3: "RGB"}
            raise UserError(f"{sample.mask} is an {kinds[mask.ndim]} mask but {first_mask[0].name} is "
                            f"{kinds[first_mask[1]]}: masks must all be one kind")  # fmt: skip
        values = _values(mask)
        if wanted is not None:
            extra = [v for v in values if v not in wanted]
            if extra:
                raise UserError(f"{sample.mask}: mask value {_plain_values(extra)[0]} is not one of mask_values "
                                f"{mask_values}")  # fmt: skip
        for value in values:
            masks_with[value] = masks_with.get(value, 0) + 1
        width, height = pp.size(*img.size)
        if rule is not None and not (rule.accepts(height) and rule.accepts(width)):
            raise UserError(f"{sample.image} is {height}x{width} after preprocessing, but the model takes "
                            f"{rule.describe()}: use --square {rule.at_least(max(height, width))}")  # fmt: skip
        if same_size and sizes and (height, width) not in sizes:
            other_size, other = next(iter(sizes.items()))
            raise UserError(f"{sample.image} is {height}x{width} after preprocessing but {other.name} is "
                            f"{other_size[0]}x{other_size[1]}: images are batched, so they must match; "
                            "pass --square SIZE")  # fmt: skip
        sizes.setdefault((height, width), sample.image)
        img.close()
    return DatasetCheck(len(samples), _plain_values(masks_with), masks_with, channels, sizes)


def check_sizes(samples: list[Sample]) -> None:
    """Every mask must have its image's size (kept for callers of the old name: check_dataset does more)."""
    check_dataset(samples)


def data_hash(samples: list[Sample]) -> str:
    """sha256 over every file name and byte: the sidecar says exactly what a model saw."""
    digest = hashlib.sha256()
    for sample in samples:
        for path in (sample.image, sample.mask):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def image_array(img: Image.Image, pp: Preprocess, n_channels: int | None = None) -> np.ndarray:
    """CHW float32, contiguous, in numpy only (predict's reader threads call it: a torch op there
    would wake torch's OpenMP pool and fight the runtime's threads for the cores). Resized, divided
    by 255 when any value is above 1 (milesial), a grey image replicated to 3 channels when
    ``n_channels`` is 3 (before mean/std, which are per channel), then ``pp.normalise``."""
    arr = np.array(pp.resize(img, Image.BICUBIC), dtype=np.float32)  # a copy we may scale in place
    if arr.size and arr.max() > 1:
        arr /= 255.0
    chw = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if n_channels == 3 and chw.shape[0] == 1:
        chw = np.broadcast_to(chw, (3, *chw.shape[1:]))
    return pp.normalise(chw)


def image_to_tensor(img: Image.Image, pp: Preprocess, n_channels: int | None = None) -> torch.Tensor:
    """image_array as a tensor: the model's input for one image."""
    return torch.from_numpy(image_array(img, pp, n_channels))


class SegmentationDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], mask_values: list, pp: Preprocess, n_channels: int | None = None,
                 max_pixels: int | None = None):  # fmt: skip
        self.samples, self.mask_values, self.pp = samples, mask_values, pp
        self.n_channels, self.max_pixels = n_channels, max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        image = image_to_tensor(load_image(sample.image, self.n_channels, self.max_pixels), self.pp, self.n_channels)
        mask = mask_to_classes(load_mask(sample.mask, self.max_pixels), self.mask_values, sample.mask)
        mask_img = self.pp.resize(Image.fromarray(mask.astype(np.int32)), Image.NEAREST)
        return {"image": image.contiguous(), "mask": torch.from_numpy(np.asarray(mask_img, dtype=np.int64))}
