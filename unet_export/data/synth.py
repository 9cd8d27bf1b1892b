"""A deterministic synthetic segmentation set in milesial's layout (imgs/NAME.png,
masks/NAME_mask.png): shapes of several classes over textured, noisy backgrounds.

Class is carried by shape (1: ellipses, 2: rectangles, 3: triangles, 4: rings, ...) and a
colour family with wide jitter, as real objects have characteristic looks; backgrounds have
multi-coloured texture, stripes and noise, so no single cue (a colour threshold) separates them. Mask pixels hold spread grey levels (0, 127, 255 for three classes) rather than
class indices, so training goes through milesial's mask_values mapping as real data would.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from unet_export.errors import UserError

SHAPES = ("ellipse", "rectangle", "triangle", "ring", "diamond")
FAMILIES = ((200, 60, 60), (60, 90, 200), (60, 170, 70), (210, 170, 40), (150, 60, 180))  # one per shape class
MASK_SUFFIX = "_mask"


@dataclass
class SynthSummary:
    out_dir: Path
    images: int
    classes: int
    mask_values: list[int]


def mask_level(cls: int, classes: int) -> int:
    """Grey level stored for class ``cls``: evenly spread over 0..255."""
    return round(cls * 255 / (classes - 1))


def make_synth(out_dir: Path, n: int = 64, size: tuple[int, int] = (128, 128), classes: int = 3, seed: int = 0) -> SynthSummary:
    """Write ``n`` image/mask pairs; the same arguments always give the same bytes."""
    if not 2 <= classes <= len(SHAPES) + 1:
        raise UserError(f"--classes {classes}: choose 2 to {len(SHAPES) + 1} (background plus shape classes)")
    if n < 1 or min(size) < 32:
        raise UserError(f"need at least one image of at least 32x32, got --n {n} --size {size[0]}x{size[1]}")
    out_dir = Path(out_dir)
    (out_dir / "imgs").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([seed, i])  # per-image stream: image i is the same whatever n is
        image, mask = _sample(rng, size, classes)
        name = f"synth_{i:04d}"
        Image.fromarray(image).save(out_dir / "imgs" / f"{name}.png")
        Image.fromarray(mask).save(out_dir / "masks" / f"{name}{MASK_SUFFIX}.png")
    return SynthSummary(out_dir, n, classes, [mask_level(c, classes) for c in range(classes)])


def _background(rng, height: int, width: int) -> np.ndarray:
    """Low-frequency colour texture plus stripes, as float RGB in [0, 255]."""
    coarse = rng.uniform(0, 255, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
    stripes = 25 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    return np.clip(texture * 0.7 + stripes[..., None] + 40, 0, 255)


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
    canvas = Image.fromarray(_background(rng, height, width).astype(np.uint8))
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
    blurred = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.6)))
    noisy = np.asarray(blurred, dtype=np.float32) + rng.normal(0, 10, size=(height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8), np.asarray(mask)
