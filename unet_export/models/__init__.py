"""Model registry: a plain dict of architecture families, each with a constructor, a detector
that reads the config back from a state_dict's keys and shapes, and the input sizes it takes."""

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from unet_export.errors import UserError
from unet_export.models import milesial


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    detect: Callable[[dict], dict | None]
    description: str
    min_size: int = 16  # smallest H and W the network accepts
    size_multiple: int = 1  # H and W must be multiples of this (1: any size)

    def check_size(self, height: int, width: int) -> None:
        """Raise a UserError naming valid sizes when (height, width) is not accepted."""
        for name, value in (("height", height), ("width", width)):
            if value < self.min_size:
                raise UserError(f"{name} {value} is too small: this model needs at least {self.min_size}")
            if value % self.size_multiple:
                lower = value - value % self.size_multiple
                raise UserError(
                    f"{name} {value} is not a multiple of {self.size_multiple}: "
                    f"use {max(lower, self.min_size)} or {lower + self.size_multiple}"
                )


MODELS: dict[str, ModelSpec] = {
    "milesial": ModelSpec(
        build=milesial.UNet,
        detect=milesial.config_from_state_dict,
        description="milesial/Pytorch-UNet (ConvTranspose or bilinear, any H and W)",
    ),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


def create_model(name: str, **config) -> nn.Module:
    """Build a registered model in eval mode, e.g. ``create_model("milesial", n_classes=2)``."""
    spec = get_spec(name)
    try:
        return spec.build(**config).eval()
    except TypeError as exc:
        raise UserError(f"bad config for model {name!r}: {exc}") from exc


def detect_model(state_dict: dict, name: str | None = None) -> tuple[str, dict] | None:
    """(name, config) of the first family whose detector recognises the keys; ``name`` forces one."""
    names = [name] if name else list(MODELS)
    for candidate in names:
        config = get_spec(candidate).detect(state_dict)
        if config is not None:
            return candidate, config
    return None
