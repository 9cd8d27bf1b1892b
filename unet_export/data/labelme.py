"""Convert labelme annotations into a VOC-layout segmentation dataset.

labelme writes one JSON per image: labelled shapes plus the image's path (and often its
bytes, base64). Each becomes ``JPEGImages/<stem>.jpg`` and ``SegmentationClass/<stem>.png``,
an 8-bit palette PNG whose stored values are the class indices (labels[0] is background).
"""

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from unet_export.data.images import DEFAULT_MAX_PIXELS, pil_pixel_limit
from unet_export.errors import UserError
from unet_export.fileio import atomic_path, loads_json

# Shapes that enclose an area, and their point counts; line, point, linestrip... have no area.
POINTS_NEEDED = {"polygon": 3, "rectangle": 2, "circle": 2}
# Names a shape may carry to paint class 0 on purpose (a hole cut in another shape), as in
# labelme's own labelme2voc.py; any other first label drawn as a shape is a mistake in --labels.
BACKGROUND_NAMES = {"background", "_background_", "__background__", "bg"}
# A point may lie outside the image (a circle's rim point, a polygon dragged past the edge) by at
# most the image's longer side; beyond that, or beyond MAX_COORD, it is a corrupt file, not a shape.
MAX_COORD = 1e6


@dataclass
class LabelmeSummary:
    images: int  # images written
    shapes: int  # shapes drawn
    pixels_per_class: dict[str, int]  # label -> mask pixels of that class (background included)


def voc_palette() -> list[int]:
    """VOC's colour map (class i's colour interleaves i's bits), so the masks are viewable."""
    return [sum(((i >> (3 * bit + channel)) & 1) << (7 - bit) for bit in range(8))
            for i in range(256) for channel in range(3)]


def _read_json(path: Path) -> dict:
    """Parse one labelme file; anything without a ``shapes`` list is not one."""
    try:
        doc = loads_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not readable as JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise UserError(f"{path}: not a labelme file (no 'shapes' list)")
    return doc


def _check_points(where: str, label: str, points: list[tuple[float, float]], size: tuple[int, int]) -> None:
    """Finite, and within the image give or take its longer side (and never beyond MAX_COORD)."""
    width, height = size
    margin = max(width, height)
    for x, y in points:
        if not (math.isfinite(x) and math.isfinite(y)):
            raise UserError(f"{where} ({label!r}) has a non-finite coordinate ({x}, {y})")
        if (max(abs(x), abs(y)) > MAX_COORD or not -margin <= x <= width + margin
                or not -margin <= y <= height + margin):  # fmt: skip
            raise UserError(f"{where} ({label!r}) has point ({x:g}, {y:g}), more than {margin} px outside the "
                            f"{width}x{height} image")  # fmt: skip


def _parse_shapes(path: Path, doc: dict, index: dict[str, int], size: tuple[int, int]) -> list[tuple[str, list, int]]:
    """Validate every shape: (shape_type, points, class index), in file order; ``size`` is the image's."""
    parsed = []
    for n, shape in enumerate(doc["shapes"]):
        shape = shape if isinstance(shape, dict) else {}
        label, where = shape.get("label"), f"{path}: shape {n}"
        if not isinstance(label, str) or label not in index:
            raise UserError(f"{where} has unknown label {label!r}; known labels: {list(index)}")
        if index[label] == 0 and label.lower() not in BACKGROUND_NAMES:
            rest = ",".join(name for name in index if name != label)
            raise UserError(f"{where} is labelled {label!r}, the first of --labels, which is class 0, the background; "
                            f"list the background first, e.g. --labels background,{label},{rest}".rstrip(","))
        kind = shape.get("shape_type") or "polygon"  # labelme's default when absent or null
        if kind not in POINTS_NEEDED:
            raise UserError(f"{where} ({label!r}) has unsupported shape_type {kind!r}; "
                            f"supported: {', '.join(POINTS_NEEDED)}")
        try:
            points = [(float(x), float(y)) for x, y in shape.get("points") or []]
        except (TypeError, ValueError, OverflowError) as exc:
            raise UserError(f"{where} ({label!r}) has malformed points ({exc})") from exc
        _check_points(where, label, points, size)
        need = POINTS_NEEDED[kind]
        # A rectangle or circle is exactly two points; extra ones mean the shape is not what it says.
        if len(points) < need or (kind != "polygon" and len(points) != need):
            raise UserError(f"{where} ({label!r}) is a {kind} with {len(points)} points; "
                            f"it needs {'at least ' if kind == 'polygon' else ''}{need}")
        parsed.append((kind, points, index[label]))
    return parsed


def _open_image(path: Path, doc: dict) -> Image.Image:
    """The annotated image: ``imagePath`` beside the JSON if it exists, else ``imageData``."""
    rel = doc.get("imagePath") or ""
    # labelme on Windows writes backslashes; they are separators there, never part of a name.
    image_path = path.parent / str(rel).replace("\\", "/")
    if rel and image_path.is_file():
        source, what = image_path, str(image_path)
    elif doc.get("imageData"):
        what = f"{path} imageData"
        try:
            source = io.BytesIO(base64.b64decode(doc["imageData"]))
        except (binascii.Error, TypeError, ValueError) as exc:
            raise UserError(f"{what} is not valid base64 ({exc})") from exc
    else:
        raise UserError(f"{path}: image {image_path} not found and no imageData embedded")
    try:
        with pil_pixel_limit(DEFAULT_MAX_PIXELS), Image.open(source) as img:
            if img.width * img.height > DEFAULT_MAX_PIXELS:  # checked from the header, before decoding
                limit = f"{DEFAULT_MAX_PIXELS / 1e6:g} MP"
                raise UserError(f"{what}: {img.width}x{img.height} is over the {limit} image limit")
            # labelme shows (and so annotates) the EXIF-rotated image; this also decodes it fully.
            image = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"{what}: not a readable image ({' '.join(str(exc).split())[:160]})") from exc
    stated = (doc.get("imageWidth"), doc.get("imageHeight"))
    if any(s is not None and s != actual for s, actual in zip(stated, image.size)):
        raise UserError(f"{path}: imageWidth x imageHeight is {stated[0]}x{stated[1]} "
                        f"but {what} is {image.width}x{image.height}")
    return image


def _draw_mask(size: tuple[int, int], shapes: list[tuple[str, list, int]]) -> Image.Image:
    """Rasterise shapes in file order: a later shape paints over an earlier one, as in labelme."""
    mask = Image.new("P", size, 0)
    mask.putpalette(voc_palette())
    draw = ImageDraw.Draw(mask)
    for kind, points, cls in shapes:
        if kind == "polygon":
            draw.polygon(points, fill=cls, outline=cls)
        elif kind == "rectangle":
            (x0, y0), (x1, y1) = points  # labelme keeps the drag order: any two opposite corners
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=cls)
        else:
            (cx, cy), (px, py) = points  # centre, then a point on the circle
            r = math.hypot(px - cx, py - cy)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=cls)
    return mask


def _load(path: Path, index: dict[str, int]) -> tuple[Image.Image, list]:
    """One file's image and validated shapes; every input error is raised here."""
    doc = _read_json(path)
    image = _open_image(path, doc)
    return image, _parse_shapes(path, doc, index, image.size)


def convert_labelme(json_dir: Path, out_dir: Path, labels: list[str]) -> LabelmeSummary:
    """Write a VOC-layout dataset for every ``*.json`` in json_dir; ``labels[i]`` is class i."""
    json_dir, out_dir = Path(json_dir), Path(out_dir)
    if not labels or len(set(labels)) != len(labels) or len(labels) > 256:
        raise UserError(f"labels must be 1 to 256 distinct names, background first; got {list(labels)}")
    index = {label: i for i, label in enumerate(labels)}
    if not json_dir.is_dir():
        raise UserError(f"labelme folder {json_dir} does not exist or is not a folder")
    paths = sorted(json_dir.glob("*.json"))
    if not paths:
        raise UserError(f"no labelme .json files in {json_dir}")
    # Check every file before writing any, so bad input leaves no partial dataset. Images are
    # decoded again below rather than kept, so memory holds one image at a time.
    n_shapes = sum(len(_load(path, index)[1]) for path in paths)
    counts = np.zeros(len(labels), dtype=np.int64)
    try:
        for sub in ("JPEGImages", "SegmentationClass"):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
        for path in paths:
            image, shapes = _load(path, index)
            mask = _draw_mask(image.size, shapes)
            counts += np.bincount(np.asarray(mask).ravel(), minlength=len(labels))
            # Formats are explicit: atomic_path's temporary name ends in .tmp.
            with atomic_path(out_dir / "JPEGImages" / f"{path.stem}.jpg") as tmp:
                image.convert("RGB").save(tmp, format="JPEG", quality=95)
            with atomic_path(out_dir / "SegmentationClass" / f"{path.stem}.png") as tmp:
                mask.save(tmp, format="PNG")
    except OSError as exc:
        raise UserError(f"cannot write the dataset to {out_dir} ({exc})") from exc
    return LabelmeSummary(len(paths), n_shapes, dict(zip(labels, counts.tolist())))
