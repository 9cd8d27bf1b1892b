"""Preprocess with an encoder's mean/std (issue 27, smp models): the values smp's own
``preprocess_input`` gives, the record's JSON form, its one-line errors, and an old record's
values unchanged to the bit."""

import json

import numpy as np
import pytest
from PIL import Image

from unet_export.data.dataset import Preprocess, image_array, image_to_tensor
from unet_export.errors import UserError

# resnet34's ImageNet settings as smp's encoder table gives them (passed here: get_preprocessing_params
# may download the encoder's config)
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
RECORD = {"scale": 1.0, "square": None, **IMAGENET, "bgr": False, "source": "smp's smp-hub/resnet34.imagenet config"}


def _rgb(h=37, w=53, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smp(hwc: np.ndarray, bgr: bool = False, **params) -> np.ndarray:
    from segmentation_models_pytorch.encoders._preprocessing import preprocess_input

    x = preprocess_input(hwc, input_space="BGR" if bgr else "RGB", input_range=[0, 1], **params)
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("bgr", [False, True])
def test_mean_std_and_bgr_give_smps_preprocess_input(bgr):
    image = _rgb()
    x = image_array(Image.fromarray(image), Preprocess(**IMAGENET, bgr=bgr), 3)
    assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape == (3, 37, 53)
    np.testing.assert_allclose(x, _smp(image, bgr, **IMAGENET), rtol=0, atol=1e-6)
    assert x.min() < -1.5 and x.max() > 2  # really normalised, not just /255


def test_resize_comes_before_the_normalisation():
    img, pp = Image.fromarray(_rgb(40, 60)), Preprocess(scale=0.5, **IMAGENET)
    resized = np.asarray(pp.resize(img, Image.BICUBIC))
    np.testing.assert_allclose(image_array(img, pp, 3), _smp(resized, **IMAGENET), rtol=0, atol=1e-6)


def test_a_grey_image_is_replicated_to_3_channels_before_mean_std():
    grey = _rgb()[..., 0]
    x = image_to_tensor(Image.fromarray(grey, mode="L"), Preprocess(**IMAGENET), 3).numpy()
    np.testing.assert_allclose(x, _smp(np.repeat(grey[..., None], 3, -1), **IMAGENET), rtol=0, atol=1e-6)
    assert not np.array_equal(x[0], x[1])  # each channel its own mean/std


def test_one_channel_models_take_one_value():
    grey = _rgb()[..., 0]
    x = image_array(Image.fromarray(grey, mode="L"), Preprocess(mean=[0.5], std=[0.25]), 1)
    np.testing.assert_allclose(x[0], (grey / 255.0 - 0.5) / 0.25, rtol=0, atol=1e-6)


def _milesial(img: Image.Image, pp: Preprocess, n_channels: int) -> np.ndarray:
    """image_to_tensor before mean/std existed, verbatim: old records must keep these values to the bit."""
    arr = np.array(pp.resize(img, Image.BICUBIC), dtype=np.float32)
    if arr.size and arr.max() > 1:
        arr /= 255.0
    chw = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.broadcast_to(chw, (3, *chw.shape[1:])) if n_channels == 3 and chw.shape[0] == 1 else chw


@pytest.mark.parametrize("mode", ["RGB", "L", "F"])
@pytest.mark.parametrize("record", [None, {"scale": 0.5, "square": None}, {"scale": 1.0, "square": 48}])
def test_an_old_record_gives_the_values_it_always_gave(mode, record):
    image = _rgb()
    img = Image.fromarray(image) if mode == "RGB" else Image.fromarray(image[..., 1], mode="L")
    img = img.convert("F") if mode == "F" else img
    pp = Preprocess.from_dict(record)
    for n_channels in (None, 3):
        old = _milesial(img, pp, n_channels)
        assert np.array_equal(image_array(img, pp, n_channels), old)
        assert np.array_equal(image_to_tensor(img, pp, n_channels).numpy(), old)


def test_the_record_round_trips_through_json_and_source_is_for_people_only():
    pp = Preprocess.from_dict(json.loads(json.dumps(RECORD)))
    assert pp.mean == (0.485, 0.456, 0.406) and pp.std == (0.229, 0.224, 0.225) and pp.bgr is False
    assert hash(pp) == hash(Preprocess(**{**IMAGENET, "mean": tuple(IMAGENET["mean"])}))  # frozen, hashable
    assert pp.to_dict() == {k: v for k, v in RECORD.items() if k != "source"}
    assert Preprocess.from_dict(json.loads(json.dumps(pp.to_dict()))) == pp
    assert Preprocess(bgr=True).to_dict() == {"scale": 1.0, "square": None, "mean": None, "std": None, "bgr": True}
    assert Preprocess.from_dict(Preprocess(bgr=True).to_dict()) == Preprocess(bgr=True)


def test_an_old_record_keeps_its_two_keys():
    assert Preprocess.from_dict(None) == Preprocess()
    assert Preprocess.from_dict({"scale": 0.5, "square": 96}).to_dict() == {"scale": 0.5, "square": 96}
    assert Preprocess().to_dict() == {"scale": 1.0, "square": None}


@pytest.mark.parametrize("record, message", [
    ({"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2]}, "must both be given, one value per channel each"),
    ({"mean": [0.5, 0.5, 0.5]}, "must both be given"),
    ({"std": [0.2, 0.2, 0.2]}, "must both be given"),
    ({"mean": [0.5], "std": [0.0]}, "std [0.0] must be above 0 in every channel"),
    ({"mean": [0.5, 0.5], "std": [0.2, -1]}, "must be above 0"),
    ({"mean": [], "std": []}, "preprocess mean [] must be a list of numbers, one per channel"),
    ({"mean": ["0.5"], "std": [0.2]}, "must be a list of numbers"),
    ({"mean": [0.5], "std": [float("nan")]}, "preprocess std [nan] must be a list of numbers"),
    ({"mean": 0.5, "std": 0.2}, "must be a list of numbers"),
    ({"mean": [True], "std": [0.2]}, "must be a list of numbers"),
    ({"bgr": "yes"}, "preprocess bgr 'yes' must be true or false"),
    ({"scale": 1.0, "norm": "imagenet"}, "preprocess record has unknown key(s) norm: expected scale, square, mean"),
    ("half", "preprocess record 'half' is not an object of scale, square, mean, std, bgr"),
])  # fmt: skip
def test_a_bad_record_is_a_one_line_error(record, message):
    with pytest.raises(UserError) as err:
        Preprocess.from_dict(record)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("mode, n_channels, pp, found", [
    ("L", None, Preprocess(**IMAGENET), "3 values but the image has 1 channel(s)"),
    ("RGB", 3, Preprocess(mean=[0.5], std=[0.2]), "1 values but the image has 3 channel(s)"),
])  # fmt: skip
def test_mean_std_that_do_not_fit_the_image_are_a_one_line_error(mode, n_channels, pp, found):
    img = Image.fromarray(_rgb()).convert(mode)
    with pytest.raises(UserError) as err:
        image_array(img, pp, n_channels)
    assert found in str(err.value) and "\n" not in str(err.value)


def test_the_real_image_gate_replicates_grey_before_mean_std(tmp_path):
    from unet_export.parity.realimages import image_batches

    grey = _rgb(32, 32)[..., 2]
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    Image.fromarray(_rgb(32, 32)).save(tmp_path / "rgb.png")
    (batch,) = image_batches([tmp_path / "grey.png", tmp_path / "rgb.png"], 3, Preprocess(**IMAGENET))
    assert batch.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(batch[0].numpy(), _smp(np.repeat(grey[..., None], 3, -1), **IMAGENET), atol=1e-6)
    with pytest.raises(UserError) as err:  # the gate's own message, before any mean/std check
        image_batches([tmp_path / "rgb.png"], 1, Preprocess(mean=[0.5], std=[0.2]))
    assert str(err.value) == f"{tmp_path / 'rgb.png'} has 3 channel(s); the model takes 1"


def test_inspect_shows_an_encoders_normalisation_and_nothing_new_for_an_old_record(tmp_path):
    from unet_export.cli.render_system import report_lines
    from unet_export.flows.inspect import ArtifactInfo

    def pixels(preprocess):
        model = {"architecture": "smp", "config": {}, "preprocess": preprocess}
        lines = report_lines(ArtifactInfo(tmp_path / "m.onnx", "onnx", 1, "0" * 64, model=model))
        return [line for line in lines if line.startswith("pixels")]

    assert pixels(RECORD) == ["pixels   /255 when above 1, then (x - mean) / std, mean [0.485, 0.456, 0.406], std "
                              "[0.229, 0.224, 0.225] (smp's smp-hub/resnet34.imagenet config)"]  # fmt: skip
    assert pixels({"scale": 1.0, "square": None, "bgr": True}) == [
        "pixels   /255 when above 1, then channels reversed (BGR)"]  # fmt: skip
    assert pixels({"scale": 1.0, "square": None}) == [] and pixels(None) == []
