"""segmentation_models_pytorch (smp) models: built from what a checkpoint says (a save_pretrained
folder's config.json, or --arch/--encoder for a bare state_dict), with the size rule, the output's
class rule and the encoder's preprocessing asked of the installed smp instead of a table here.

Nothing here downloads: encoders are built with ``encoder_weights=None`` (the checkpoint holds the
weights), and the encoder's preprocessing is read from the Hugging Face cache only (smp's own
``get_preprocessing_params`` fetches it from the Hub for its native encoders)."""

import json
from pathlib import Path

import torch
import torch.nn as nn

from unet_export.errors import UserError, require

# Names users write for the two architectures whose class names they do not (smp's own keys are
# the lower-case class names: "unetplusplus", "deeplabv3plus").
ALIASES = {"unet++": "unetplusplus", "deeplabv3+": "deeplabv3plus"}
# A save_pretrained folder: config.json names the class under this key (smp's SMPHubMixin).
CLASS_KEY = "_model_class"
# Heads whose output is a probability: one class is then decided at 0.5, not at logit 0.
PROBABILITY = {"sigmoid"}
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _smp():
    return require("segmentation_models_pytorch", extra="smp")


def architectures() -> dict[str, type]:
    """smp's architectures by lower-case class name: what the installed version offers."""
    return dict(_smp().MODEL_ARCHITECTURES_MAPPING)


def looks_like(state_dict: dict) -> bool:
    """An smp model's keys: an encoder, a decoder and a segmentation head."""
    heads = ("encoder.", "decoder.", "segmentation_head.")
    return all(any(key.startswith(head) for key in state_dict) for head in heads)


def configure(state_dict: dict, options: dict) -> dict:
    """The recorded config of an smp model: {"arch", "init", "n_channels", "n_classes", "sizes",
    "threshold", "preprocess"} from a save_pretrained config.json (``options["config_json"]``),
    a config recorded earlier (``options["recorded"]``) or the command line's flags."""
    if "recorded" in options:
        return _checked_record(options["recorded"])
    arch, init = _arch_and_init(state_dict, options)
    net = _build(arch, init)
    rule = size_rule(net)
    classes = int(init.get("classes", 1))
    config = {"arch": arch, "init": init, "n_channels": int(init.get("in_channels", 3)), "n_classes": classes,
              "sizes": rule, "threshold": threshold(init.get("activation"), classes)}  # fmt: skip
    return config | {"preprocess": preprocessing(init["encoder_name"], options)}


def _checked_record(config) -> dict:
    """A config read back from a manifest (untrusted): the shape configure writes, or exit 2."""
    sizes = config.get("sizes") if isinstance(config, dict) else None
    fine = (isinstance(config, dict) and isinstance(config.get("arch"), str) and isinstance(config.get("init"), dict)
            and config["arch"].lower() in architectures() and isinstance(sizes, dict)
            and all(type(sizes.get(k)) is int for k in ("min", "multiple", "offset", "shrink")) and sizes["multiple"] > 0
            and all(type(config.get(k)) is int for k in ("n_channels", "n_classes")))  # fmt: skip
    if not fine:
        raise UserError("the manifest's segmentation_models_pytorch config is damaged (arch, init, sizes, n_channels, "
                        "n_classes): export again")  # fmt: skip
    return config


def _arch_and_init(state_dict: dict, options: dict) -> tuple[str, dict]:
    """(architecture, constructor arguments), from config.json or the flags; the weights always
    come from the checkpoint, never the Hub."""
    if isinstance(options.get("config_json"), dict):
        init = {k: v for k, v in options["config_json"].items() if not k.startswith("_")}
        arch = str(options["config_json"][CLASS_KEY])
    else:
        missing = [flag for flag, key in (("--arch", "arch"), ("--encoder", "encoder")) if not options.get(key)]
        if missing:
            hint = f"architectures: {', '.join(architectures())}" if "--arch" in missing else "e.g. resnet34"
            raise UserError(f"a segmentation_models_pytorch state_dict does not say its {' and '.join(missing)}: "
                            f"pass {' '.join(f'{m} NAME' for m in missing)} ({hint}), or save the model with "
                            "model.save_pretrained(DIR) and pass DIR")  # fmt: skip
        arch, init = options["arch"], {"encoder_name": options["encoder"], **(options.get("smp_args") or {})}
        init["classes"] = options.get("classes") or _classes(state_dict)
        init["in_channels"] = options.get("in_channels") or _in_channels(state_dict)
    key = ALIASES.get(arch.lower(), arch.lower())
    known = architectures()
    if key not in known:
        raise UserError(f"unknown segmentation_models_pytorch architecture {arch!r}; this smp has: "
                        f"{', '.join(known)}")  # fmt: skip
    return known[key].__name__, init | {"encoder_weights": None}


def _classes(state_dict: dict) -> int:
    head = state_dict.get("segmentation_head.0.weight")
    return int(head.shape[0]) if head is not None else 1


def _in_channels(state_dict: dict) -> int:
    first = next((v for k, v in state_dict.items() if k.startswith("encoder.") and v.ndim == 4), None)
    return int(first.shape[1]) if first is not None else 3


def _build(arch: str, init: dict) -> nn.Module:
    smp = _smp()
    try:
        return smp.create_model(arch, **(init | {"encoder_weights": None}))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # smp's own "wrong encoder" etc.
        detail = " ".join(str(exc).strip("'\"").split())[:300]
        raise UserError(f"cannot build segmentation_models_pytorch {arch} with {_shown(init)}: {detail}") from None


def _shown(init: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in init.items() if k != "encoder_weights")


def build(arch: str, init: dict, **_) -> nn.Module:
    """The registry's constructor: the model with random weights (load_state_dict fills them)."""
    net = _build(arch, init)
    net.classification_head = None  # an aux_params head: masks only are exported (its keys are dropped)
    return net


def size_rule(net: nn.Module) -> dict:
    """The input sizes the model takes, asked of it: smp checks H, W % encoder.output_stride unless
    the model interpolates its skips (Unet); the smallest size is one output stride here."""
    stride = int(getattr(net.encoder, "output_stride", 32))
    divisible = bool(getattr(net, "requires_divisible_input_shape", True))
    return {"min": stride, "multiple": stride if divisible else 1, "offset": 0, "shrink": 0}


def threshold(activation, classes: int) -> float:
    """Where one class is decided: at 0.5 for a sigmoid head's probabilities, at 0 for logits."""
    return 0.5 if classes == 1 and activation in PROBABILITY else 0.0


def preprocessing(encoder: str, options: dict) -> dict:
    """Preprocess record (image / 255, then (x - mean) / std): the user's --mean/--std, else the
    encoder's ImageNet settings as smp publishes them, read from the local cache only."""
    if options.get("mean") or options.get("std"):
        mean, std = options.get("mean") or IMAGENET["mean"], options.get("std") or IMAGENET["std"]
        return {"scale": 1.0, "square": None, "mean": list(mean), "std": list(std), "source": "--mean/--std"}
    settings, source = _encoder_settings(encoder)
    if settings is None:
        return {"scale": 1.0, "square": None, **IMAGENET,
                "source": f"ImageNet mean/std: {source}; pass --mean/--std if {encoder} was trained otherwise"}
    scale = 255.0 if list(settings.get("input_range", [0, 1]))[-1] > 1 else 1.0  # to the 0..1 image scale
    return {"scale": 1.0, "square": None, "mean": [m / scale for m in settings["mean"]],
            "std": [s / scale for s in settings["std"]], "bgr": settings.get("input_space", "RGB") == "BGR",
            "source": source}  # fmt: skip


def _encoder_settings(encoder: str) -> tuple[dict | None, str]:
    """smp.encoders.get_preprocessing_params without the network: timm's config for ``tu-`` encoders
    (local), the cached Hub config.json for smp's own."""
    smp = _smp()
    if encoder.startswith("tu-"):
        try:
            return smp.encoders.get_preprocessing_params(encoder), f"timm's pretrained config of {encoder[3:]}"
        except (ValueError, RuntimeError) as exc:
            return None, f"timm has none for {encoder[3:]} ({exc})"
    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {}).get("imagenet")
    if not settings:
        return None, f"smp has no imagenet settings for {encoder}"
    hub = require("huggingface_hub", extra="smp")
    cached = hub.try_to_load_from_cache(settings["repo_id"], "config.json", revision=settings.get("revision"))
    if not isinstance(cached, str):
        return None, f"smp's config for {encoder} ({settings['repo_id']}) is not in the Hugging Face cache"
    return json.loads(Path(cached).read_text()), f"smp's {settings['repo_id']} config"


def weights(state_dict: dict) -> dict:
    """The keys ``build``'s model loads: an aux_params classification head's are left out."""
    return {k: v for k, v in state_dict.items() if not k.startswith("classification_head.")}
