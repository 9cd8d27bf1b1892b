import pytest
import torch

from unet_export.errors import UserError
from unet_export.models import MODELS, create_model, detect_model, get_spec
from unet_export.models.milesial import UNet, config_from_state_dict


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "bilinear, keys, params", [(False, 118, 31_037_698), (True, 110, 17_263_042)]
)
def test_full_size_matches_milesial_key_count_and_parameters(bilinear, keys, params):
    model = UNet(3, 2, bilinear=bilinear)
    assert len(model.state_dict()) == keys
    assert n_params(model) == params


def test_key_names_follow_milesial_layout():
    keys = set(UNet(3, 2).state_dict())
    for key in (
        "inc.double_conv.0.weight",
        "inc.double_conv.1.num_batches_tracked",
        "down4.maxpool_conv.1.double_conv.3.weight",
        "up1.up.weight",
        "up4.conv.double_conv.4.running_var",
        "outc.conv.bias",
    ):
        assert key in keys
    assert "inc.double_conv.0.bias" not in keys
    assert "up1.up.weight" not in UNet(3, 2, bilinear=True).state_dict()


def test_pre_2021_variant_has_conv_biases():
    keys = UNet(3, 1, bilinear=True, conv_bias=True).state_dict()
    assert "inc.double_conv.0.bias" in keys and "up2.conv.double_conv.3.bias" in keys
    assert len(keys) == 110 + 18


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("size", [(64, 64), (37, 53), (250, 375)])
def test_any_height_and_width_give_same_size_logits(bilinear, size):
    model = UNet(3, 4, bilinear=bilinear, width=4).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, *size))
    assert out.shape == (2, 4, *size)


@pytest.mark.parametrize(
    "config",
    [
        dict(n_channels=3, n_classes=2, bilinear=False, width=8, conv_bias=False),
        dict(n_channels=1, n_classes=1, bilinear=True, width=16, conv_bias=True),
        dict(n_channels=4, n_classes=5, bilinear=True, width=8, conv_bias=False),
    ],
)
def test_config_is_read_back_from_state_dict(config):
    state = UNet(**config).state_dict()
    assert config_from_state_dict(state) == config
    assert detect_model(state) == ("milesial", config)


def test_other_networks_are_not_detected():
    assert detect_model({"conv1.weight": torch.zeros(8, 3, 3, 3)}) is None


def test_input_checks_say_how_to_fix():
    model = UNet(3, 2, width=4).eval()
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="expected 3 input channel"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match=">= 16"):
        model(torch.rand(1, 3, 8, 64))


def test_registry_errors_list_valid_names():
    with pytest.raises(UserError, match="milesial"):
        get_spec("segformer")
    with pytest.raises(UserError, match="bad config"):
        create_model("milesial", depth=7)
    assert create_model("milesial", n_classes=3, width=4).training is False
    assert set(MODELS) >= {"milesial"}


def test_size_rule_names_valid_sizes():
    spec = get_spec("milesial")
    spec.sizes({}).check(17, 250)
    with pytest.raises(UserError, match=r"at least 16\): use 16"):
        spec.sizes({}).check(8, 64)
