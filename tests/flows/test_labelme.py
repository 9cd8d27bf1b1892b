"""labelme -> VOC conversion: exact class indices in the masks, and one-line errors for bad input."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from unet_export.cli.main import app
from unet_export.data.labelme import convert_labelme, voc_palette
from unet_export.errors import UserError

runner = CliRunner()

LABELS = ["_background_", "cat", "dog", "bird"]
W, H = 40, 30


def png_bytes(size=(W, H), mode="RGB", color=(10, 200, 30)):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def shape(label, points, shape_type="polygon"):
    return {"label": label, "points": points, "shape_type": shape_type, "group_id": None, "flags": {}}


def write_labelme(folder, stem, shapes, image_path=None, image_data=None, size=(W, H)):
    doc = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
           "imageData": image_data, "imageWidth": size[0], "imageHeight": size[1]}
    (folder / f"{stem}.json").write_text(json.dumps(doc))


# Triangle cat (x + y <= 20), a small dog square painted over it, a dog rectangle given
# bottom-right corner first, and a bird circle: centre (10, 24), radius 4.
SHAPES = [
    shape("cat", [[2, 2], [18, 2], [2, 18]]),
    shape("dog", [[3, 3], [5, 5]], "rectangle"),
    shape("dog", [[30, 25], [22, 15]], "rectangle"),
    shape("bird", [[10, 24], [10, 28]], "circle"),
]


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "labelme"
    (folder / "imgs").mkdir(parents=True)
    (folder / "imgs" / "a.png").write_bytes(png_bytes(mode="RGBA", color=(10, 200, 30, 255)))
    write_labelme(folder, "a", SHAPES, image_path="imgs/a.png")
    return folder


def read_mask(out, stem):
    with Image.open(out / "SegmentationClass" / f"{stem}.png") as img:
        return img.mode, img.getpalette()[:12], np.asarray(img)


def test_shapes_become_exact_class_indices(src, tmp_path):
    out = tmp_path / "voc"
    summary = convert_labelme(src, out, LABELS)
    mode, palette, mask = read_mask(out, "a")
    assert mode == "P" and mask.shape == (H, W)
    assert palette == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]  # VOC colours 0..3
    assert set(np.unique(mask).tolist()) == {0, 1, 2, 3}
    # mask[y, x]: polygon interior and vertex, square over the polygon, both rectangle corners.
    assert mask[4, 10] == 1 and mask[10, 4] == 1 and mask[2, 2] == 1
    assert mask[4, 4] == 2 and mask[3, 3] == 2 and mask[5, 5] == 2
    assert mask[15, 22] == 2 and mask[25, 30] == 2 and mask[20, 26] == 2
    assert mask[24, 10] == 3 and mask[24, 13] == 3 and mask[21, 10] == 3
    assert mask[0, 0] == 0 and mask[5, 35] == 0 and mask[14, 14] == 0 and mask[24, 20] == 0
    assert (mask[15:26, 22:31] == 2).all() and (mask == 2).sum() == 9 * 11 + 3 * 3
    assert summary.images == 1 and summary.shapes == 4
    assert summary.pixels_per_class == {name: int((mask == i).sum()) for i, name in enumerate(LABELS)}
    assert summary.pixels_per_class["dog"] == 108
    assert 40 < summary.pixels_per_class["bird"] < 70  # a radius-4 disc: ~50 pixels
    assert sum(summary.pixels_per_class.values()) == W * H


def test_jpeg_is_rgb_at_image_size(src, tmp_path):
    convert_labelme(src, tmp_path / "voc", LABELS)
    with Image.open(tmp_path / "voc" / "JPEGImages" / "a.jpg") as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (W, H))
        r, g, b = img.getpixel((20, 15))
    assert abs(r - 10) <= 3 and abs(g - 200) <= 3 and abs(b - 30) <= 3
    assert sorted(p.name for p in (tmp_path / "voc").rglob("*")) == [
        "JPEGImages", "SegmentationClass", "a.jpg", "a.png"]


def test_image_data_only_and_summary_over_files(tmp_path):
    src = tmp_path / "labelme"
    src.mkdir()
    data = base64.b64encode(png_bytes(size=(16, 12))).decode()
    write_labelme(src, "b", [shape("dog", [[0, 0], [3, 1]], "rectangle")], "gone.png", data, (16, 12))
    write_labelme(src, "c", [], image_data=data, size=(16, 12))
    summary = convert_labelme(src, tmp_path / "voc", ["background", "cat", "dog"])
    assert summary.images == 2 and summary.shapes == 1
    assert summary.pixels_per_class == {"background": 2 * 16 * 12 - 8, "cat": 0, "dog": 8}
    with Image.open(tmp_path / "voc" / "JPEGImages" / "b.jpg") as img:
        assert img.size == (16, 12)
    assert not read_mask(tmp_path / "voc", "c")[2].any()
    assert read_mask(tmp_path / "voc", "b")[2][:2, :4].tolist() == [[2] * 4] * 2


def test_exif_rotation_is_applied_before_checking_size(tmp_path):
    src = tmp_path / "labelme"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: labelme shows (and annotates) the image upright, 30 x 40
    Image.new("RGB", (W, H)).save(src / "r.jpg", exif=exif)
    write_labelme(src, "r", [shape("cat", [[0, 0], [29, 39]], "rectangle")], "r.jpg", size=(H, W))
    convert_labelme(src, tmp_path / "voc", LABELS)
    assert read_mask(tmp_path / "voc", "r")[2].shape == (W, H)


def test_unknown_label_writes_nothing(src, tmp_path):
    write_labelme(src, "z", [shape("horse", [[0, 0], [5, 5]], "rectangle")], "imgs/a.png")
    out = tmp_path / "voc"
    with pytest.raises(UserError) as err:
        convert_labelme(src, out, LABELS)
    msg = str(err.value)
    assert "'horse'" in msg and "z.json" in msg and "'cat', 'dog', 'bird'" in msg and "\n" not in msg
    assert not out.exists()  # a.json was valid and comes first, yet nothing was written


@pytest.mark.parametrize("doc_change, needle", [
    (dict(imagePath="nope.png"), "nope.png not found and no imageData"),
    (dict(imageData=base64.b64encode(b"not an image").decode()), "not a readable image"),
    (dict(shapes=[shape("cat", [[0, 0], [5, 5]], "line")]), "unsupported shape_type 'line'"),
    (dict(shapes=[shape("cat", [[0, 0], [5, 5]], "point")]), "unsupported shape_type 'point'"),
    (dict(shapes=[shape("cat", [[0, 0], [5, 5]])]), "polygon with 2 points; it needs at least 3"),
    (dict(shapes=[shape("cat", [[1, 1]], "circle")]), "circle with 1 points; it needs 2"),
    (dict(shapes=[shape("cat", [[1, "x"], [2, 2]], "rectangle")]), "malformed points"),
    (dict(imageHeight=31), "imageWidth x imageHeight is 40x31 but"),
    (dict(shapes=None), "not a labelme file"),
])
def test_bad_file_is_a_one_line_user_error(tmp_path, doc_change, needle):
    src = tmp_path / "labelme"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes())
    doc = {"shapes": [], "imagePath": "a.png", "imageData": None, "imageWidth": W, "imageHeight": H}
    if "imageData" in doc_change:
        doc["imagePath"] = None
    (src / "bad.json").write_text(json.dumps({**doc, **doc_change}))
    with pytest.raises(UserError) as err:
        convert_labelme(src, tmp_path / "voc", LABELS)
    assert needle in str(err.value) and "bad.json" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "voc").exists()


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(UserError, match="no labelme .json files in"):
        convert_labelme(tmp_path, tmp_path / "voc", LABELS)
    with pytest.raises(UserError, match="does not exist"):
        convert_labelme(tmp_path / "missing", tmp_path / "voc", LABELS)
    with pytest.raises(UserError, match="distinct"):
        convert_labelme(tmp_path, tmp_path / "voc", ["background", "cat", "cat"])


def test_voc_palette_matches_voc():
    pal = voc_palette()
    assert len(pal) == 768 and pal[15 * 3:16 * 3] == [192, 128, 128] and pal[-3:] == [224, 224, 192]


@pytest.mark.parametrize("points, needle", [
    ([[2, 2], [float("nan"), 2], [2, 18]], "non-finite coordinate (nan, 2.0)"),
    ([[2, 2], [float("inf"), 2], [2, 18]], "non-finite coordinate (inf, 2.0)"),
    ([[2, 2], [2, float("-inf")], [2, 18]], "non-finite coordinate (2.0, -inf)"),
    ([[2, 2], [1e300, 2], [2, 18]], "point (1e+300, 2), more than 40 px outside the 40x30 image"),
    ([[2, 2], [2, -75], [2, 18]], "point (2, -75), more than 40 px outside"),
])  # fmt: skip
def test_non_finite_or_far_out_coordinates_are_refused(tmp_path, points, needle):
    """json.loads reads NaN, Infinity and 1e300; they used to draw a mask (exit 0)."""
    src = tmp_path / "labelme"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes())
    write_labelme(src, "ok", [shape("cat", [[0, 0], [5, 5]], "rectangle")], "a.png")
    write_labelme(src, "wild", [shape("dog", [[0, 0], [5, 5]], "rectangle"), shape("cat", points)], "a.png")
    with pytest.raises(UserError) as err:
        convert_labelme(src, tmp_path / "voc", LABELS)
    msg = str(err.value)
    assert "wild.json: shape 1 ('cat')" in msg and needle in msg and "\n" not in msg
    assert not (tmp_path / "voc").exists()


def test_points_just_outside_the_image_are_kept(tmp_path):
    """labelme lets a circle's rim or a dragged vertex leave the image: within a margin it is a shape."""
    src = tmp_path / "labelme"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes())
    write_labelme(src, "a", [shape("bird", [[38, 15], [50, 15]], "circle"), shape("cat", [[-5, -5], [10, -5], [-5, 10]])],
                  "a.png")  # fmt: skip
    summary = convert_labelme(src, tmp_path / "voc", LABELS)
    assert summary.pixels_per_class["bird"] > 0 and summary.pixels_per_class["cat"] > 0


def test_labelme_cli_names_file_and_shape(tmp_path):
    from typer.testing import CliRunner

    from unet_export.cli.main import app

    src = tmp_path / "labelme"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes())
    (src / "a.json").write_text('{"shapes": [{"label": "cat", "shape_type": "polygon", "points": [[0, 0], [NaN, 1], '
                                '[3, 3]]}], "imagePath": "a.png", "imageWidth": 40, "imageHeight": 30}')  # fmt: skip
    result = CliRunner().invoke(app, ["data", "labelme", str(src), str(tmp_path / "voc"), "--labels", ",".join(LABELS)])
    assert result.exit_code == 2 and "a.json: shape 0 ('cat') has a non-finite coordinate" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "voc").exists()


def test_deeply_nested_json_is_exit_2_naming_the_file(tmp_path):
    """`[` x 200000 overflows the parser (RecursionError): bad input, not a bug in the tool."""
    import subprocess
    import sys

    src = tmp_path / "labelme"
    src.mkdir()
    (src / "deep.json").write_text("[" * 200_000)
    proc = subprocess.run([sys.executable, "-m", "unet_export", "data", "labelme", str(src), str(tmp_path / "voc"),
                           "--labels", ",".join(LABELS)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and str(src / "deep.json") in proc.stderr and "nested" in proc.stderr
    assert not (tmp_path / "voc").exists()


# Issue 15: a rough edge a new user hit, reproduced before it was fixed (was tests/test_rough_edges.py).


def test_labelme_refuses_a_shape_drawn_with_the_background_label(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    write_labelme(tmp_path, "a", SHAPES, image_path="a.png")
    result = runner.invoke(app, ["data", "labelme", str(tmp_path), str(tmp_path / "voc"), "--labels", "cat,dog,bird"])
    assert result.exit_code == 2
    assert "labelled 'cat', the first of --labels, which is class 0, the background" in result.stderr
    assert "--labels background,cat,dog,bird" in result.stderr and not (tmp_path / "voc").exists()
    named = runner.invoke(app, ["data", "labelme", str(tmp_path), str(tmp_path / "ok"),
                                "--labels", "sky,cat,dog,bird"])  # fmt: skip
    assert named.exit_code == 0, named.output  # any background name no shape uses is fine
