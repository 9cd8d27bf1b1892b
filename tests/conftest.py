"""Checkpoints saved the way milesial/Pytorch-UNet's releases and train.py save them.

A reduced width (8 instead of 64) keeps the suite fast; the keys are the same and the
full-size model has its own tests.
"""

import signal

import pytest
import torch

from unet_export.flows.demo import random_milesial

# REFERENCE.md 1: the published releases, and what train.py writes.
VARIANTS = {
    "v1": dict(config=dict(n_classes=1, bilinear=True, conv_bias=True), mask_values=None),
    "v2": dict(config=dict(n_classes=2, bilinear=True, conv_bias=True), mask_values=None),
    "v3": dict(config=dict(n_classes=2, bilinear=False, conv_bias=False), mask_values=None),
    "v4": dict(config=dict(n_classes=3, bilinear=False, conv_bias=False), mask_values=[0, 127, 255]),
    "v4-rgb": dict(config=dict(n_classes=2, bilinear=False, conv_bias=False), mask_values=[[0, 0, 0], [255, 0, 0]]),
}
SMALL_WIDTH = 8


def milesial_state_dict(variant: str, width: int = SMALL_WIDTH, seed: int = 0) -> dict:
    spec = VARIANTS[variant]
    state = random_milesial(seed, n_channels=3, width=width, **spec["config"]).state_dict()
    if spec["mask_values"] is not None:  # train.py: state_dict['mask_values'] = dataset.mask_values
        state["mask_values"] = spec["mask_values"]
    return state


@pytest.fixture
def wrong_torchscript(monkeypatch):
    """The torchscript writer swapped for one that scripts another model (width 8, other weights):
    an export that must fail its parity gate."""
    from unet_export.runtimes.formats import FORMATS

    real = FORMATS["torchscript"]

    def wrong(model, dest, sample, metadata, **kw):
        other = type(model)(**{k: getattr(model, k) for k in ("n_channels", "n_classes", "bilinear")}, width=8)
        other.load_state_dict(milesial_state_dict("v3", seed=1))
        return real.write(other.eval(), dest, sample, metadata, **kw)

    monkeypatch.setitem(FORMATS, "torchscript", real.__class__(wrong, real.suffix))


@pytest.fixture
def make_checkpoint(tmp_path):
    def make(variant: str = "v3", name: str | None = None, width: int = SMALL_WIDTH, wrap: str | None = None):
        state = milesial_state_dict(variant, width)
        path = tmp_path / (name or f"unet_{variant}.pth")
        torch.save({wrap: state} if wrap else state, path)
        return path

    return make


def ignoring_sigint() -> None:
    """Popen's preexec_fn for a child started as a launcher starts a background command (`cmd &`
    in a script, some CI runners): SIGINT ignored, so Python installs no Ctrl-C handler of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
