"""A deterministic synthetic segmentation set in milesial's layout (imgs/NAME.png,
masks/NAME_mask.png): shapes of several classes over textured, noisy backgrounds.

Class is carried by shape (1: ellipses, 2: rectangles, 3: triangles, 4: rings, ...) and a
colour family with wide jitter, as real objects have characteristic looks; backgrounds have
multi-coloured texture, stripes and noise, so no single cue (a colour threshold) separates them. Mask pixels hold spread grey levels (0, 127, 255 for three classes) rather than
class indices, so training goes through milesial's mask_values mapping as real data would.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from unet_export.errors import UserError
from unet_export.fileio import atomic_path

SHAPES = ("ellipse", "rectangle", "triangle", "ring", "diamond")
FAMILIES = ((200, 60, 60), (60, 90, 200), (60, 170, 70), (210, 170, 40), (150, 60, 180))  # one per shape class
MASK_SUFFIX = "_mask"
# Bounds, measured on this project's 2-core machine: one 8192x8192 pair takes 38 s, peaks at 1.0 GB
# of memory (row blocks; 5.6 GB before) and writes 145 MB of PNG, so the largest allowed image fits
# a laptop; 100000 images is twenty times milesial's Carvana set (5088), more than a synthetic run
# needs, and about 5 GB of disk at the default 128x128. Beyond either bound a typo is the likely cause.
MAX_SIDE = 8192
MAX_IMAGES = 100_000
BLOCK_ROWS = 512  # float work is done in row blocks: the same bytes as whole-image arrays, a fraction of the memory


@dataclass
class SynthSummary:
    out_dir: Path
    images: int
    classes: int
    mask_values: list[int]


def mask_level(cls: int, classes: int) -> int:
    """Grey level stored for class ``cls``: evenly spread over 0..255."""
    return round(cls * 255 / (classes - 1))


def make_synth(out_dir: Path, n: int = 64, size: tuple[int, int] = (128, 128), classes: int = 3, seed: int = 0,
               overwrite: bool = False) -> SynthSummary:  # fmt: skip
    """Write ``n`` image/mask pairs; the same arguments always give the same bytes. Each file is
    written atomically (a full disk leaves no truncated PNG); an OSError is a UserError naming it."""
    if not 2 <= classes <= len(SHAPES) + 1:
        raise UserError(f"--classes {classes}: choose 2 to {len(SHAPES) + 1} (background plus shape classes)")
    if n < 1 or min(size) < 32:
        raise UserError(f"need at least one image of at least 32x32, got --n {n} --size {size[0]}x{size[1]}")
    if max(size) > MAX_SIDE:
        raise UserError(f"--size {size[0]}x{size[1]}: at most {MAX_SIDE} per side (one {MAX_SIDE}x{MAX_SIDE} "
                        "pair takes 1 GB of memory and 145 MB of disk)")  # fmt: skip
    if n > MAX_IMAGES:
        raise UserError(f"--n {n}: at most {MAX_IMAGES} images per set")
    out_dir = Path(out_dir)
    _clear_existing(out_dir, overwrite)
    for sub in ("imgs", "masks"):
        try:
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create {out_dir / sub}: {exc.strerror or exc}") from None
    for i in range(n):
        rng = np.random.default_rng([seed, i])  # per-image stream: image i is the same whatever n is
        image, mask = _sample(rng, size, classes)
        name = f"synth_{i:04d}"
        _write_png(image, out_dir / "imgs" / f"{name}.png")
        _write_png(mask, out_dir / "masks" / f"{name}{MASK_SUFFIX}.png")
        del image, mask
    return SynthSummary(out_dir, n, classes, [mask_level(c, classes) for c in range(classes)])


def _clear_existing(out_dir: Path, overwrite: bool) -> None:
    """A set written over another would mix the two (4 new images among 24 old ones): refuse,
    or with ``overwrite`` remove the old files first."""
    existing = [p for sub in ("imgs", "masks") if (out_dir / sub).is_dir() for p in (out_dir / sub).iterdir()]
    if not existing:
        return
    if not overwrite:
        raise UserError(f"{out_dir} already holds a dataset ({len(existing)} files in imgs/ and masks/); "
                        "choose an empty folder or pass --overwrite to replace it")  # fmt: skip
    for path in existing:
        try:
            path.unlink() if not path.is_dir() else shutil.rmtree(path)
        except OSError as exc:
            raise UserError(f"cannot remove {path}: {exc.strerror or exc}") from None


def _write_png(pixels: np.ndarray, dest: Path) -> None:
    try:
        with atomic_path(dest) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
    except OSError as exc:
        raise UserError(f"cannot write {dest}: {exc.strerror or exc}") from None


def _background(rng, height: int, width: int) -> np.ndarray:
    """Low-frequency colour texture plus stripes, as uint8 RGB (computed in row blocks, in float64
    as one whole-image expression would, so the bytes do not depend on the block size)."""
    coarse = rng.uniform(0, 255, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
    xx = np.arange(width)[None, :]
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, BLOCK_ROWS):
        rows = slice(top, min(height, top + BLOCK_ROWS))
        yy = np.arange(rows.start, rows.stop)[:, None]
        stripes = 25 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        block = texture[rows].astype(np.float32) * 0.7 + stripes[..., None]
        block += 40
        out[rows] = np.clip(block, 0, 255, out=block)
    return out


def _outline(kind: str, rng, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        start = rng.uniform(0, 2 * np.pi)
        return [(cx + r * np.cos(start + k * 2 * np.pi / 3), cy + r * np.sin(start + k * 2 * np.pi / 3)) for k in range(3)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    return [(cx - r, cy - r * rng.uniform(0.5, 1.0)), (cx + r, cy + r * rng.uniform(0.5, 1.0))]  # bounding box


def _draw(draw: ImageDraw.ImageDraw, kind: str, points, fill) -> None:
    if kind == "ellipse":
        draw.ellipse(points, fill=fill)
    elif kind == "rectangle":
        draw.rectangle(points, fill=fill)
    elif kind == "ring":
        width = max(2, int((points[1][0] - points[0][0]) * 0.18))
        draw.ellipse(points, outline=fill, width=width)
    else:
        draw.polygon(points, fill=fill)


def _sample(rng, size: tuple[int, int], classes: int) -> tuple[np.ndarray, np.ndarray]:
    height, width = size
    canvas = Image.fromarray(_background(rng, height, width))
    mask = Image.new("L", (width, height), 0)
    paint, label = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(2, 6))):
        cls = int(rng.integers(1, classes))
        kind = SHAPES[cls - 1]
        r = rng.uniform(0.1, 0.25) * min(height, width)
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        points = _outline(kind, rng, cx, cy, r)
        colour = tuple(int(c) for c in np.clip(np.array(FAMILIES[cls - 1]) + rng.integers(-45, 46, size=3), 0, 255))
        _draw(paint, kind, points, colour)
        _draw(label, kind, points, mask_level(cls, classes))  # later shapes cover earlier ones, in both
    blurred = np.asarray(canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.6))))
    del canvas
    image = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, BLOCK_ROWS):  # blurred + N(0, 10), clipped: the noise drawn block by block
        rows = slice(top, min(height, top + BLOCK_ROWS))  # is the same stream as one draw
        noisy = rng.normal(0, 10, size=(rows.stop - rows.start, width, 3))
        noisy += blurred[rows].astype(np.float32)
        image[rows] = np.clip(noisy, 0, 255, out=noisy)
    return image, np.asarray(mask)
