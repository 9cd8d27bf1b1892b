"""Model registry: a plain dict of architecture families, each with a constructor, a detector
that reads the config back from a state_dict's keys and shapes, and the input sizes it takes."""

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from unet_export.errors import UserError
from unet_export.models import deeplab, external, milesial, plain, reflect, resnet50, smp, valid
from unet_export.models.sizes import SizeRule


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    detect: Callable[[dict], dict | None]
    description: str
    sizes: Callable[[dict], SizeRule] = lambda config: SizeRule()  # input sizes, given the config
    defaults: dict = field(default_factory=dict)  # config a variant fixes (e.g. sigmoid=True)
    # A family whose keys alone cannot name the model (smp, a user's factory): its config comes from
    # the checkpoint's folder, the command line or the manifest, never from auto-detection.
    configure: Callable[[dict, dict], dict] | None = None
    weights: Callable[[dict], dict] = lambda state_dict: state_dict  # the keys the built model loads


@dataclass(frozen=True)
class ModelChoice:
    """--model, with what configures a family its keys cannot name (smp's --arch, --encoder,
    --model-arg, --mean, --std; a recorded config). A plain name (or None) means the same."""

    name: str | None = None
    options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model: "str | ModelChoice | nn.Module | None") -> "ModelChoice":
        """A name, a ModelChoice, or an nn.Module (with the default InputSpec: see from_module)."""
        if isinstance(model, nn.Module):
            return from_module(model)
        return model if isinstance(model, ModelChoice) else cls(model)

    @property
    def in_memory(self) -> bool:
        """An nn.Module passed from Python: no checkpoint file behind it."""
        return self.name == external.MODULE


def from_module(net: nn.Module, inputs: external.InputSpec | None = None) -> ModelChoice:
    """``model=`` for an in-memory nn.Module: what it takes (channels, sizes, preprocessing,
    mask_values) is ``inputs``; its weights are its own state_dict."""
    if not isinstance(net, nn.Module):
        raise UserError(f"from_module takes an nn.Module, got a {type(net).__name__}")
    return ModelChoice(external.MODULE, {"module": net, "inputs": inputs or external.InputSpec()})


def _variant(family: ModelSpec, description: str, **fixed) -> ModelSpec:
    """A variant whose keys are its family's: only --model NAME can choose it."""

    def detect(state_dict):
        config = family.detect(state_dict)
        return None if config is None else config | fixed

    return ModelSpec(family.build, detect, description, family.sizes, fixed)


def _recorded_sizes(config: dict) -> SizeRule:
    """The size rule asked of the model when it was configured, as recorded."""
    return SizeRule(**config["sizes"])


MULTIPLE_OF_16 = SizeRule(min=16, multiple=16)
# Reflect padding needs a pad smaller than the side: the 1x1 bottleneck of a 16 px input cannot be
# reflect-padded, so the bilibili U-Net's smallest size is 32.
REFLECT_SIZES = SizeRule(min=32, multiple=16)

# Detection tries these in order; variants that the keys cannot tell apart come after their
# family, so auto-detection picks the family's default and --model picks the variant.
MODELS: dict[str, ModelSpec] = {
    "milesial": ModelSpec(milesial.UNet, milesial.config_from_state_dict,
                          "milesial/Pytorch-UNet's U-Net, as unet-export train writes it (ConvTranspose or "
                          "bilinear up-sampling, any H and W)"),
    "plain": ModelSpec(plain.PlainUNet, plain.config_from_state_dict,
                       "plain U-Net without BatchNorm (1 channel, 1 class)", lambda c: MULTIPLE_OF_16),
    "reflect": ModelSpec(reflect.ReflectUNet, reflect.config_from_state_dict,
                         "the bilibili tutorial's U-Net, qiaofengsheng/pytorch-UNet (reflect padding, logits for CE)",
                         lambda c: REFLECT_SIZES),
    "valid": ModelSpec(valid.ValidUNet, valid.config_from_state_dict,
                       "2015 U-Net (Ronneberger et al.), unpadded, center-cropped skips (572 -> 388)", valid.sizes),
    "resnet50": ModelSpec(resnet50.UNetWithResnet50Encoder, resnet50.config_from_state_dict,
                          "U-Net with a ResNet-50 encoder, kevinlu1211/pytorch-unet-resnet-50-encoder "
                          "(H, W multiples of 32)", lambda c: resnet50.SIZES),
    "deeplabv3": ModelSpec(deeplab.DeepLabV3, deeplab.config_from_state_dict,
                           "torchvision DeepLabV3-ResNet50, the 'out' tensor", lambda c: SizeRule(min=32)),
}  # fmt: skip
MODELS["reflect-sigmoid"] = _variant(MODELS["reflect"], "the bilibili tutorial's U-Net, early version: sigmoid "
                                     "outputs (BCE)", sigmoid=True)  # fmt: skip
MODELS["valid-pad"] = _variant(MODELS["valid"], "2015 U-Net, unpadded, decoder padded to the skips (any size >= 188)",
                               concat=1)  # fmt: skip
MODELS["valid-same"] = _variant(MODELS["valid"], "2015 U-Net with padding=1 convs (output the input's size)", concat=2)
MODELS["smp"] = ModelSpec(smp.build, lambda state_dict: None,
                          "a segmentation_models_pytorch model (a save_pretrained folder, or a state_dict with "
                          "--arch and --encoder); its input sizes are the model's", _recorded_sizes,
                          configure=smp.configure, weights=smp.weights)  # fmt: skip
MODELS["factory"] = ModelSpec(external.unbuildable, lambda state_dict: None,
                              "any nn.Module, built by --model-factory MODULE:CALLABLE or path/to/file.py:CALLABLE "
                              "(the checkpoint holds its weights); its input sizes are asked of it",
                              _recorded_sizes, configure=external.configure)  # fmt: skip
# The Python API's model=net: not a --model choice (there is no file to load it from).
MODELS["module"] = ModelSpec(external.unbuildable, lambda state_dict: None, "an in-memory nn.Module (Python API)",
                             _recorded_sizes, configure=external.configure_module)  # fmt: skip


def mask_threshold(config: dict) -> float:
    """Where a one-class output turns into class 1: a logit at 0, a sigmoid probability at 0.5,
    or what the config records. With more classes the mask is the argmax, which a monotonic
    activation (sigmoid, softmax) does not change, so the threshold only matters for one class."""
    return float(config.get("threshold", 0.5 if config.get("sigmoid") else 0.0))


def choices() -> list[str]:
    """What --model can name (an in-memory module comes from Python only)."""
    return [name for name in MODELS if name != external.MODULE]


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(choices())}") from None


def create_model(name: str, **config) -> nn.Module:
    """Build a registered model in eval mode, e.g. ``create_model("milesial", n_classes=2)``."""
    spec = get_spec(name)
    try:
        return spec.build(**(spec.defaults | config)).eval()
    except TypeError as exc:
        raise UserError(f"bad config for model {name!r}: {exc}") from exc


def detect_model(state_dict: dict, name: str | None = None) -> tuple[str, dict] | None:
    """(name, config) of the first family whose detector recognises the keys; ``name`` forces one."""
    names = [name] if name else [key for key, spec in MODELS.items() if spec.configure is None]
    for candidate in names:
        config = get_spec(candidate).detect(state_dict)
        if config is not None:
            return candidate, config
    return None
