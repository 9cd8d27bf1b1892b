"""Reading one image or mask file, safely: a size limit checked from the header before any pixel
is decoded, every PIL mode either read one obvious way (grey, colour, palette, 16-bit grey) or
refused, channel counts checked, and one-line errors naming the file."""

import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from unet_export.errors import UserError


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
