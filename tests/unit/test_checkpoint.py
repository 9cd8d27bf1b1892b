import os

import pytest
import torch

from tests.conftest import VARIANTS, milesial_state_dict
from unet_export.checkpoint import build_model, load_checkpoint
from unet_export.errors import UserError
from unet_export.fileio import sha256_file


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_release_format_is_detected_and_loads(make_checkpoint, variant):
    path = make_checkpoint(variant)
    ckpt = load_checkpoint(path)
    expected = VARIANTS[variant]
    assert ckpt.architecture == "milesial"
    assert ckpt.config == dict(n_channels=3, width=8, **expected["config"])
    assert ckpt.mask_values == expected["mask_values"]
    assert ckpt.sha256 == sha256_file(path)
    assert_loads_exactly(path, milesial_state_dict(variant))


def assert_loads_exactly(path, state: dict) -> None:
    """``path`` loads, and the model built from it holds every tensor of ``state`` (keys without
    DataParallel's ``module.``), bit for bit: not merely "no error"."""
    model = build_model(load_checkpoint(path))
    loaded = model.state_dict()
    expected = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


@pytest.mark.parametrize("wrap", ["state_dict", "model", "model_state_dict", "net"])
def test_wrapped_state_dicts_load(make_checkpoint, wrap):
    path = make_checkpoint("v4", wrap=wrap)
    ckpt = load_checkpoint(path)
    assert ckpt.mask_values == [0, 127, 255]
    assert (ckpt.architecture, ckpt.config["n_classes"]) == ("milesial", 3)
    assert_loads_exactly(path, milesial_state_dict("v4"))


@pytest.mark.parametrize("wrap", [None, "state_dict", "net"])
def test_dataparallel_prefix_loads_plain_or_wrapped(tmp_path, wrap):
    state = {f"module.{k}": v for k, v in milesial_state_dict("v3", seed=3).items()}
    path = tmp_path / "dp.pth"
    # a training loop's dict: the weights under the wrapper key, mask_values beside them
    torch.save({wrap: state, "epoch": 7, "mask_values": [0, 255]} if wrap else state, path)
    if wrap:
        assert load_checkpoint(path).mask_values == [0, 255]
    assert_loads_exactly(path, state)


def test_dataparallel_prefix_and_legacy_serialisation(tmp_path):
    state = {f"module.{k}": v for k, v in milesial_state_dict("v3").items()}
    path = tmp_path / "legacy.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert_loads_exactly(path, state)


def test_model_flag_forces_the_family(make_checkpoint):
    assert load_checkpoint(make_checkpoint("v3"), model="milesial").architecture == "milesial"
    with pytest.raises(UserError, match="unknown model"):
        load_checkpoint(make_checkpoint("v3"), model="nope")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def _bad_files(tmp_path):
    """Each bad input and a fragment its one-line message must contain."""
    good = tmp_path / "good.pth"
    torch.save(milesial_state_dict("v3"), good)
    cases = {}
    cases["missing"] = (tmp_path / "nope.pth", "not found")
    (tmp_path / "adir").mkdir()
    cases["directory"] = (tmp_path / "adir", "is a directory")
    (tmp_path / "notes.txt").write_text("just some text\n")
    cases["text"] = (tmp_path / "notes.txt", "not a readable PyTorch checkpoint")
    data = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (tmp_path / "trunc.pth", "truncated")
    torch.save({"w": Evil()}, tmp_path / "evil.pth")
    cases["code pickle"] = (tmp_path / "evil.pth", "could run code")
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, tmp_path / "resnet.pth")
    cases["other network"] = (tmp_path / "resnet.pth", "not a checkpoint of a known architecture")
    state = milesial_state_dict("v3")
    state["outc.conv.weight"] = torch.zeros(2, 99, 1, 1)
    torch.save(state, tmp_path / "shape.pth")
    cases["shape mismatch"] = (tmp_path / "shape.pth", "1 keys of another shape")
    state = milesial_state_dict("v3")
    del state["down2.maxpool_conv.1.double_conv.0.weight"]
    torch.save(state, tmp_path / "missing_key.pth")
    cases["missing key"] = (tmp_path / "missing_key.pth",
                           "does not fit the milesial model: 1 missing keys")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases["not a dict"] = (tmp_path / "list.pth", "not a state_dict")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    cases["no tensors"] = (tmp_path / "empty.pth", "no tensors")
    return cases


BAD = ["missing", "directory", "text", "truncated", "code pickle", "other network",
       "shape mismatch", "missing key", "not a dict", "no tensors"]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_raise_one_clear_user_error(tmp_path, case):
    path, fragment = _bad_files(tmp_path)[case]
    with pytest.raises(UserError, match=fragment) as info:
        build_model(load_checkpoint(path))
    assert "\n" not in str(info.value)


def test_sidecar_architecture_wins_over_key_detection(tmp_path):
    """A checkpoint trained with --model valid-same has valid's keys: the training sidecar says
    which variant it is, and every command (onnx, evaluate, predict) loads through here."""
    import json

    from unet_export.models import create_model

    weights = tmp_path / "same.pth"
    torch.save(create_model("valid-same", n_channels=3, n_classes=2, width=4).state_dict(), weights)
    assert load_checkpoint(weights).architecture == "valid"  # the keys alone cannot tell
    weights.with_suffix(".json").write_text(json.dumps({"model": "valid-same", "preprocess": {"scale": 0.5}}))
    ckpt = load_checkpoint(weights)
    assert ckpt.architecture == "valid-same" and ckpt.preprocess == {"scale": 0.5}
    assert load_checkpoint(weights, "valid").architecture == "valid"  # --model still decides
    weights.with_suffix(".json").write_text(json.dumps({"model": "resnet50"}))
    with pytest.raises(UserError, match="as its sidecar same.json says"):
        load_checkpoint(weights)


def test_sidecar_validation_folder_travels_into_the_model_record(tmp_path):
    import json

    from unet_export.flows.demo import DEMO_VAL, DEMO_WEIGHTS

    assert load_checkpoint(DEMO_WEIGHTS).record()["validation"] == str(DEMO_VAL.resolve())
    weights = tmp_path / "m.pth"
    torch.save(milesial_state_dict("v3"), weights)
    weights.with_suffix(".json").write_text(json.dumps({"validation": {"path": "gone"}}))
    assert "validation" not in load_checkpoint(weights).record()  # a folder that is not there is not claimed


def test_a_sidecar_nested_too_deeply_is_ignored_like_any_unreadable_one(make_checkpoint):
    """Issue 24: JSON nested deeper than the parser follows raised RecursionError (exit 3); an
    unreadable sidecar is ignored and the checkpoint alone still loads."""
    weights = make_checkpoint("v3")
    weights.with_suffix(".json").write_text("[" * 200000)
    from unet_export.checkpoint import load_checkpoint

    assert load_checkpoint(weights).architecture == "milesial"
