"""Segmentation data as milesial/Pytorch-UNet and the bilibili tutorial lay it out, with their
preprocessing, and one-line errors for every way a folder can be wrong.

Layouts: milesial ``imgs/NAME.ext`` + ``masks/NAME<suffix>.ext`` (.npy and .pt masks too), and
VOC ``JPEGImages/NAME.jpg`` + ``SegmentationClass/NAME.png``. Classes come from milesial's
``mask_values``: the sorted unique mask values of the dataset, class i <-> mask_values[i].
"""

import hashlib
import re
import warnings
from contextlib import contextmanager
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


DEFAULT_MAX_PIXELS = 50_000_000
"""Largest image (width x height) any command decodes unless --max-pixels says otherwise. Sized
from measurements of `predict` with the demo model on this project's machine (tiled, peak RSS):
1.42 GB at 2000x2000, 1.76 GB at 4000x4000 (9.49 GB untiled), 2.85 GB at 7000x7000 (49 MP), i.e.
about 1.3 GB of fixed cost (torch, one tile) plus ~33 bytes per pixel (image, logits, mask). 50 MP
so stays under 3 GB, safe on an 8 GB machine. The limit replaces PIL's own guard (a warning at
89 MP, an error at 179 MP, exit 3 here before): an image is refused from its header, before any
pixel is decoded, so a decompression bomb costs nothing."""

# Modes by what they hold. Everything else (F, CMYK, YCbCr, LAB, HSV, ...) is refused for images
# and masks alike: it has no one obvious reading, and a silent guess is how the 16-bit bug began.
GREY_MODES = {"1", "L", "LA", "La"}
COLOUR_MODES = {"RGB", "RGBA", "RGBa", "RGBX"}
PALETTE_MODES = {"P", "PA"}
WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # 16-bit grey (I: 32-bit ints holding 16-bit values)
SIXTEEN_BIT_SCALE = 257.0  # 65535 / 255: 16-bit values onto the 0..255 range an 8-bit model was trained in


@contextmanager
def pil_pixel_limit(limit: int):
    """PIL's decompression-bomb guard, set to our limit for one Image.open (it warns above it and
    raises above twice it; the warning is ours to turn into a refusal, with the size)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _mp(pixels: int) -> str:
    text = f"{pixels / 1e6:.1f}".removesuffix(".0") if pixels >= 1e6 else f"{pixels / 1e6:.3g}"
    return f"{text} MP"


def _too_large(path: Path, pixels: int, limit: int, size: str = "") -> UserError:
    return UserError(f"{path}{size} has {_mp(pixels)}, over the {_mp(limit)} limit: refused before "
                     "decoding (a decompression bomb, or more than this machine should hold); raise --max-pixels "
                     "if it is a real image")  # fmt: skip


def open_image(path: Path, max_pixels: int | None = None) -> Image.Image:
    """The image opened lazily: header read and size checked, no pixel decoded yet."""
    path, limit = Path(path), int(max_pixels or DEFAULT_MAX_PIXELS)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with pil_pixel_limit(limit):
            img = Image.open(path)
    except Image.DecompressionBombError as exc:  # beyond twice the limit: PIL refuses in open()
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, int(found.group(1)) if found else 2 * limit + 1, limit) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"cannot read image {path}: {' '.join(str(exc).split())[:120]}") from None
    width, height = img.size
    if width * height > limit:
        img.close()
        raise _too_large(path, width * height, limit, f" ({width}x{height})")
    if width < 1 or height < 1:
        img.close()
        raise UserError(f"{path} is {width}x{height}: an image needs at least one pixel")
    return img


def _palette_is_grey(img: Image.Image) -> bool:
    palette = img.palette
    if palette is None or not palette.mode.startswith("RGB"):
        return True  # no palette (the indices are the grey levels), or a grey one
    raw, step = bytes(palette.palette), len(palette.mode)
    return all(raw[i] == raw[i + 1] == raw[i + 2] for i in range(0, len(raw) - 2, step))


def image_channels(img: Image.Image, path: Path) -> int:
    """1 (grey, grey palette, 16-bit grey) or 3 (colour) as the image will be read; refuses the rest."""
    if img.mode in GREY_MODES or img.mode in WIDE_MODES:
        return 1
    if img.mode in COLOUR_MODES:
        return 3
    if img.mode in PALETTE_MODES:
        return 1 if _palette_is_grey(img) else 3
    raise UserError(f"{path}: image mode {img.mode} is not supported (8/16-bit grey, palette, RGB or RGBA); "
                    "convert it to RGB or grey PNG first")  # fmt: skip


def check_channels(channels: int, n_channels: int | None, path: Path, mode: str) -> None:
    """Grey goes into a 3-channel model replicated; colour into a 1-channel model is refused."""
    if n_channels is None or n_channels == channels or (channels == 1 and n_channels == 3):
        return
    if n_channels == 1:
        raise UserError(f"{path} is a colour image ({mode}) but the model takes 1 channel (grey): "
                        "convert it to greyscale first")  # fmt: skip
    raise UserError(f"{path}: the model takes {n_channels} channels; images give 1 (grey) or 3 (RGB)")


def load_image(path: Path, n_channels: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """The one image reader (predict, evaluate, train, bench), for a model of ``n_channels``.

    Returns mode RGB (colour), L (8-bit grey) or F (16-bit grey scaled onto 0..255, exact):
    palette -> its colours (L when the palette is grey), RGBA/LA -> alpha dropped, mode 1 -> 0/255,
    16-bit (I;16*, or I holding 0..65535) -> value / 257 (65535 -> 255.0). Grey is replicated to
    3 channels by image_to_tensor for a 3-channel model; colour for a 1-channel model is refused.
    The pixel limit is checked from the header before anything is decoded."""
    path = Path(path)
    img = open_image(path, max_pixels)
    channels = image_channels(img, path)
    check_channels(channels, n_channels, path, img.mode)
    try:
        img.load()
        if img.mode in WIDE_MODES:
            return _sixteen_bit(img, path)
        if img.mode in PALETTE_MODES:
            return img.convert("L" if channels == 1 else "RGB")
        if img.mode in GREY_MODES:
            return img if img.mode == "L" else img.convert("L")
        return img if img.mode == "RGB" else img.convert("RGB")  # alpha dropped, not composited
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt pixel data
        raise UserError(f"cannot read image {path}: {' '.join(str(exc).split())[:120]}") from None


def _sixteen_bit(img: Image.Image, path: Path) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise UserError(f"{path}: 32-bit image values {arr.min()}..{arr.max()} are outside 16 bits (0..65535); "
                        "save it as 8- or 16-bit")  # fmt: skip
    scaled = arr.astype(np.float32)
    scaled /= SIXTEEN_BIT_SCALE
    return Image.fromarray(scaled, mode="F")


def load_mask(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Mask pixels exactly as stored: HxW integers (grey level, palette index, or 16-bit value,
    never clipped) or HxWx3 uint8 (RGB). .npy and .pt masks must hold integers."""
    path = Path(path)
    if path.suffix in (".npy", ".pt"):
        try:
            if path.suffix == ".npy":
                mask = np.load(path, allow_pickle=False)
            else:
                mask = torch.load(path, weights_only=True).numpy()
        except Exception as exc:  # numpy/torch raise many types for a corrupt file
            raise UserError(f"cannot read mask {path}: {type(exc).__name__}") from None
        return _integer_mask(mask, path)
    img = open_image(path, max_pixels)
    mode = img.mode
    try:
        img.load()
        if mode in ("L", "P", "I;16", "I;16B", "I;16L", "I;16N", "I", "RGB"):
            mask = np.asarray(img)
        elif mode in ("1", "LA", "La", "PA"):  # 1: 0/1 as milesial reads it; LA/PA: the value band
            mask = np.asarray(img.getchannel(0)).astype(np.uint8)
        elif mode in ("RGBA", "RGBa", "RGBX"):
            mask = np.asarray(img.convert("RGB"))
        else:
            raise UserError(f"{path}: mask mode {mode} is not supported (8/16-bit grey, palette or RGB)")
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UserError(f"cannot read mask {path}: {' '.join(str(exc).split())[:120]}") from None
    return mask.astype(mask.dtype.newbyteorder("=")) if not mask.dtype.isnative else mask


def _integer_mask(mask: np.ndarray, path: Path) -> np.ndarray:
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[-1] != 3):
        raise UserError(f"{path}: a mask is HxW or HxWx3, not {'x'.join(map(str, mask.shape))}")
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if np.issubdtype(mask.dtype, np.floating):
        if not np.isfinite(mask).all() or (mask != np.round(mask)).any():
            raise UserError(f"{path}: mask holds non-integer values; masks are class values, not probabilities")
        return mask.astype(np.int64)
    if not np.issubdtype(mask.dtype, np.integer):
        raise UserError(f"{path}: mask dtype {mask.dtype} is not an integer type")
    return mask


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


def image_to_tensor(img: Image.Image, pp: Preprocess, n_channels: int | None = None) -> torch.Tensor:
    """CHW float32; divided by 255 when any value is above 1 (milesial), no mean/std. A grey
    image is replicated to 3 channels when ``n_channels`` is 3."""
    arr = np.array(pp.resize(img, Image.BICUBIC), dtype=np.float32)  # a copy we may scale in place
    if arr.size and arr.max() > 1:
        arr /= 255.0
    tensor = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    if n_channels == 3 and tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor


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
