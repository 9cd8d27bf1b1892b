"""models/external.py on its own: what is asked of a model no registry entry knows (its sizes
and classes), and what a manifest's untrusted record of one may and may not make happen."""

import pytest
import torch
import torch.nn as nn

from tests.flows import tinynet
from unet_export.errors import EagerUnavailable, UserError
from unet_export.models import external
from unet_export.models.sizes import SizeRule


class Strided(nn.Module):
    """An smp-style model: it says its stride (encoder.output_stride) instead of being probed."""

    requires_divisible_input_shape = True

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 2, 1)
        self.encoder.output_stride = 32

    def forward(self, x):
        return self.encoder(x)


class Returns(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.conv, self.value = nn.Conv2d(3, 2, 1), value

    def forward(self, x):
        return self.value(self.conv(x))


def test_the_probe_finds_the_smallest_multiple_and_the_classes():
    rule, classes = external.asked(tinynet.make(classes=5), 3, None, "tiny", "how")
    assert rule == SizeRule(min=16, multiple=4) and classes == 5


def test_an_smp_style_encoder_says_its_sizes():
    rule, classes = external.asked(Strided(), 3, None, "strided", "how")
    assert rule == SizeRule(min=32, multiple=32) and classes == 2


def test_a_given_rule_the_model_refuses_is_named():
    with pytest.raises(UserError, match=r"^tiny: its forward failed on 1x3x18x18: RuntimeError: Sizes of tensors"):
        external.asked(tinynet.make(), 3, SizeRule(min=18, multiple=2), "tiny", "how")


@pytest.mark.parametrize("value, what", [(lambda y: {"out": y}, "a dict"), (lambda y: y[0], "a 3-D tensor")])
def test_an_output_that_is_not_one_mask_tensor_is_refused(value, what):
    with pytest.raises(UserError, match=f"the model returns {what}; .* N x classes x H x W"):
        external.asked(Returns(value), 3, None, "odd", "how")


def test_a_model_no_size_fits_says_how_to_give_them():
    with pytest.raises(UserError, match="found no input sizes the model takes .*: pass it so"):
        external.asked(Returns(lambda y: y[..., ::3, ::3]), 3, None, "odd", "pass it so")


def test_a_factory_that_raises_is_one_line(tmp_path):
    source = tmp_path / "f.py"
    source.write_text("def make(**kw):\n    raise ValueError('no\\nway')\n")
    with pytest.raises(UserError, match=r"calling it with no arguments failed: ValueError: no way$"):
        external.configure({}, {"factory": f"{source}:make"})


def test_a_factory_file_that_fails_to_import_is_one_line_and_leaves_no_module(tmp_path):
    source = tmp_path / "f.py"
    source.write_text("import no_such_module_here\n")
    factory = external.parse_ref(f"{source}:make")
    with pytest.raises(UserError, match="importing .*f.py failed: ModuleNotFoundError"):
        external.load_factory(factory)
    assert f"unet_export_factory_{factory.sha256[:16]}" not in __import__("sys").modules


def test_a_workdir_cannot_make_a_command_run_its_factory():
    config = {"factory": "/elsewhere/evil.py:make", "factory_sha256": "0" * 64, "kwargs": {}}
    with pytest.raises(EagerUnavailable, match="pass --model-factory /elsewhere/evil.py:make"):
        external.check_rebuild("factory", config, {})
    with pytest.raises(EagerUnavailable, match="in-memory module"):
        external.check_rebuild("module", {"class": "x.Net"}, {})
    with pytest.raises(UserError, match="--model-factory was given, but the workdir's artefacts are of a 'milesial'"):
        external.check_rebuild("milesial", {}, {"factory": "f.py:make"})


@pytest.mark.parametrize("change", [{"kwargs": "x"}, {"factory": 3}, {"sizes": {"min": 1}}, {"n_classes": "2"}])
def test_a_damaged_recorded_factory_config_is_refused(change):
    config = {"factory": "a.py:make", "factory_sha256": None, "kwargs": {}, "n_channels": 3, "n_classes": 2,
              "sizes": SizeRule().to_dict(), "threshold": 0.0}  # fmt: skip
    with pytest.raises(UserError, match="the manifest's factory model config is damaged"):
        external.configure({}, {"recorded": config | change, "factory": "a.py:make"})


def test_the_state_digest_changes_with_any_weight():
    net = tinynet.make()
    state = net.state_dict()
    digest = external.state_digest(state)
    assert digest == external.state_digest({k: v.clone() for k, v in state.items()})
    state["head.bias"] = state["head.bias"] + torch.tensor([0.0, 1e-6])
    assert external.state_digest(state) != digest
