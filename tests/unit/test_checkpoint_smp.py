"""checkpoint.py for the families its keys cannot name, in process (the mutation set runs
tests/unit): a save_pretrained folder, an smp state_dict with and without its flags, the model a
flag implies, the names a mismatch message uses, and a missing smp turned into EagerUnavailable."""

import hashlib
import json

import pytest
import torch

import unet_export.checkpoint as ck
from tests.conftest import random_milesial
from unet_export.errors import EagerUnavailable, UserError
from unet_export.models import ModelChoice

smp = pytest.importorskip("segmentation_models_pytorch")
SMALL = {"encoder_depth": 3, "decoder_channels": [16, 8, 4]}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return smp.Unet("resnet18", encoder_weights=None, classes=2, **SMALL).eval()


@pytest.fixture
def folder(net, tmp_path):
    net.save_pretrained(tmp_path / "unet")
    return tmp_path / "unet"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_save_pretrained_folder_is_an_smp_model_with_no_flags(folder, net):
    ckpt = ck.load_checkpoint(folder)
    digest = hashlib.sha256((_sha(folder / "config.json") + _sha(folder / "model.safetensors")).encode()).hexdigest()
    assert (ckpt.path, ckpt.sha256, ckpt.architecture) == (folder, digest, "smp")
    assert ckpt.config["arch"] == "Unet" and ckpt.config["init"]["encoder_name"] == "resnet18"
    assert ckpt.config["init"]["encoder_weights"] is None and "preprocess" not in ckpt.config
    assert ckpt.config["sizes"] == {"min": 8, "multiple": 1, "offset": 0, "shrink": 0}
    assert ckpt.preprocess["mean"] == [0.485, 0.456, 0.406] and ckpt.preprocess["std"] == [0.229, 0.224, 0.225]
    assert set(ckpt.state_dict) == set(net.state_dict()) and ckpt.validation is None and ckpt.mask_values is None
    built = ck.build_model(ckpt)
    x = torch.rand(1, 3, 32, 48)
    assert torch.equal(built(x), net(x))


def test_the_folders_config_counts_in_its_sha256(folder):
    before = ck.load_checkpoint(folder).sha256
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"decoder_interpolation": "bilinear"}))
    assert ck.load_checkpoint(folder).sha256 != before


def test_a_folder_with_the_older_weights_name_loads(folder, net):
    torch.save(net.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert ck.load_checkpoint(folder).architecture == "smp"


def test_a_folder_that_is_not_save_pretrained_is_refused_with_what_it_needs(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(folder)
    assert str(err.value) == (f"{folder} is a directory: pass the checkpoint file (.pth, .pt, .safetensors) inside it, "
                              "or a save_pretrained folder (config.json + model.safetensors)")  # fmt: skip


def test_a_folder_without_its_config_is_refused(folder):
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match=r"is a directory: pass the checkpoint file"):
        ck.load_checkpoint(folder)


def test_a_config_that_is_not_json_is_corrupt(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(folder)
    assert str(err.value).startswith(f"{folder / 'config.json'} is corrupt") and "it is not JSON: " in str(err.value)


@pytest.mark.parametrize("config", [{"encoder_name": "resnet18"}, [1, 2], {"_model_class": 3}])
def test_a_config_naming_no_smp_class_needs_model(folder, config):
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(folder)
    assert str(err.value) == (f"{folder / 'config.json'} does not name a segmentation_models_pytorch class "
                              "(_model_class): pass --model NAME for the weights in it")  # fmt: skip


def test_with_model_a_folders_weights_are_that_model(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save(random_milesial(width=8).state_dict(), folder / "pytorch_model.bin")
    ckpt = ck.load_checkpoint(folder, "milesial")
    assert ckpt.architecture == "milesial" and ckpt.config["width"] == 8


def test_flags_name_a_bare_state_dict_and_the_sidecar_preprocessing_wins(net, tmp_path):
    torch.save(net.state_dict(), tmp_path / "w.pth")
    args = {"arch": "Unet", "encoder": "resnet18", "smp_args": SMALL}
    ckpt = ck.load_checkpoint(tmp_path / "w.pth", ModelChoice(None, args))
    assert ckpt.architecture == "smp" and ckpt.config["n_classes"] == 2 and ckpt.preprocess["mean"][0] == 0.485
    assert ckpt.sha256 == _sha(tmp_path / "w.pth") and ckpt.path == tmp_path / "w.pth"
    (tmp_path / "w.json").write_text(json.dumps({"preprocess": {"scale": 0.5, "square": None}}))
    assert ck.load_checkpoint(tmp_path / "w.pth", ModelChoice(None, args)).preprocess == {"scale": 0.5, "square": None}


def test_an_smp_state_dict_without_flags_is_told_which_flags(net, tmp_path):
    torch.save(net.state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(tmp_path / "w.pth")
    keys = ", ".join(list(net.state_dict())[:3])
    assert str(err.value) == (f"{tmp_path / 'w.pth'} looks like a segmentation_models_pytorch state_dict (keys {keys}, "
                              "...): pass --arch ARCH --encoder NAME (its classes and channels are read from the "
                              "weights), or save the model with model.save_pretrained(DIR) and pass DIR")  # fmt: skip
    with pytest.raises(UserError) as err:  # a named family gets no smp hint
        ck.load_checkpoint(tmp_path / "w.pth", "plain")
    assert str(err.value) == f"{tmp_path / 'w.pth'} is not a checkpoint of a 'plain' model: its keys begin {keys}"


@pytest.mark.parametrize("options, implied", [
    ({"arch": "Unet"}, "smp"), ({"encoder": "resnet18"}, "smp"), ({"arch": "", "encoder": None}, None), ({}, None),
    ({"factory": "m.py:build"}, "factory"), ({"factory": "m.py:build", "arch": "Unet"}, "factory"),
])  # fmt: skip
def test_the_model_a_flag_implies(options, implied):
    assert ck.implied_model(options) == implied


def test_a_mismatch_names_the_smp_model_it_was_built_as(folder, net):
    ckpt = ck.load_checkpoint(folder)
    ckpt.state_dict = {k: v for k, v in ckpt.state_dict.items() if k != "segmentation_head.0.bias"}
    with pytest.raises(UserError) as err:
        ck.build_model(ckpt)
    assert str(err.value) == f"{folder} does not fit the smp Unet (resnet18) model: 1 missing keys (segmentation_head.0.bias)"
    ckpt = ck.load_checkpoint(folder)
    ckpt.state_dict = dict(ckpt.state_dict) | {"segmentation_head.0.bias": torch.zeros(5)}
    with pytest.raises(UserError) as err:
        ck.build_model(ckpt)
    assert str(err.value) == (f"{folder} does not fit the smp Unet (resnet18) model: 1 keys of another shape "
                              "(segmentation_head.0.bias: [5] here, [2] in the model)")  # not smp's warning and random weights


def test_without_smp_the_rebuild_is_eager_unavailable(folder, monkeypatch):
    ckpt = ck.load_checkpoint(folder)
    monkeypatch.setitem(__import__("sys").modules, "segmentation_models_pytorch", None)
    with pytest.raises(EagerUnavailable, match=r'pip install "unet-export\[smp\]"'):
        ck.build_model(ckpt)
    with pytest.raises(UserError) as err:  # a family that needs no extra: not turned into EagerUnavailable
        with ck.rebuilding("milesial"):
            raise UserError("other")
    assert type(err.value) is UserError


def test_no_checkpoint_and_no_module_is_refused():
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(None)
    assert str(err.value) == "no checkpoint given: pass a checkpoint file (from Python, or model=an nn.Module)"


def test_an_empty_state_dict_names_no_keys(tmp_path):
    with pytest.raises(UserError) as err:
        ck._detected(tmp_path / "w.pth", {}, "plain", None)
    assert str(err.value) == f"{tmp_path / 'w.pth'} is not a checkpoint of a 'plain' model: its keys begin none"


def test_a_config_that_is_not_json_says_why(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(folder)
    assert "it is not JSON: " in str(err.value) and "line 1 column 2" in str(err.value)


@pytest.mark.parametrize("n, shown", [(3, "3 missing keys (k0, k1, k2)"), (4, "4 missing keys (k0, k1, k2 and 1 more)")])
def test_a_mismatch_lists_three_keys_then_counts_the_rest(n, shown):
    expected = {f"k{i}": torch.zeros(1) for i in range(n)}
    assert ck._key_mismatch(expected, {}) == shown


def test_a_module_from_python_is_copied_and_built_from_its_own_weights():
    from tests.flows import tinynet
    from unet_export import api

    net = tinynet.make(channels=3, classes=2).eval()
    ckpt = ck.load_checkpoint(None, api.from_module(net))
    assert ckpt.architecture == "module" and ckpt.module is not net and ckpt.path.name == "tinynet"
    built = ck.build_model(ckpt)
    x = torch.rand(1, 3, 32, 32)
    assert built is not net and torch.equal(built(x), net(x))


def test_a_factorys_model_is_built_once_and_named_in_a_mismatch(tmp_path):
    from tests.flows import tinynet

    torch.save(tinynet.make().state_dict(), tmp_path / "w.pth")
    factory = str(ck.Path(tinynet.__file__)) + ":make"
    ckpt = ck.load_checkpoint(tmp_path / "w.pth", ModelChoice(None, {"factory": factory}))
    assert ckpt.architecture == "factory" and ckpt.module is not None and "preprocess" not in ckpt.config
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(ck.build_model(ckpt)(x), tinynet.make().eval()(x))
    ckpt.state_dict = {k: v for k, v in ckpt.state_dict.items() if k != "head.bias"}
    with pytest.raises(UserError) as err:
        ck.build_model(ckpt)
    assert str(err.value) == f"{tmp_path / 'w.pth'} does not fit the factory {factory} model: 1 missing keys (head.bias)"
