"""Safe checkpoint loading: weights_only=True always, every milesial release format, and one-line
errors for everything that is not a usable checkpoint."""

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from unet_export.errors import UserError
from unet_export.fileio import sha256_file
from unet_export.models import MODELS, create_model, detect_model

# Dicts that wrap a state_dict, as saved by training scripts and Lightning-style loops.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


@dataclass
class Checkpoint:
    path: Path
    sha256: str
    architecture: str
    config: dict
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    mask_values: list | None = None  # milesial's class index -> mask value mapping
    preprocess: dict | None = None  # from the training sidecar (<name>.json), when there is one

    def record(self) -> dict:
        """What the manifest and the artefacts' metadata say about the model."""
        return {
            "architecture": self.architecture,
            "config": self.config,
            "mask_values": self.mask_values,
            "preprocess": self.preprocess or {"scale": 1.0, "square": None},
            "checkpoint": {"path": str(self.path.resolve()), "sha256": self.sha256},
        }


def load_checkpoint(path: str | Path, model: str | None = None) -> Checkpoint:
    """Read a checkpoint and work out its architecture; ``model`` overrides the detection."""
    path = Path(path)
    raw = _torch_load(path)
    state_dict, mask_values = _unwrap(raw, path)
    found = detect_model(state_dict, model)
    if found is None:
        sample = ", ".join(list(state_dict)[:3]) or "none"
        target = f"a {model!r} model" if model else f"a known architecture ({', '.join(MODELS)})"
        raise UserError(f"{path} is not a checkpoint of {target}: its keys begin {sample}")
    name, config = found
    return Checkpoint(path, sha256_file(path), name, config, state_dict, mask_values, _sidecar_preprocess(path))


def _sidecar_preprocess(path: Path) -> dict | None:
    """`unet-export train` writes <name>.json beside each checkpoint; its preprocessing travels
    with the model into every artefact, so predict and evaluate match training."""
    sidecar = path.with_suffix(".json")
    try:
        return json.loads(sidecar.read_text()).get("preprocess") if sidecar.is_file() else None
    except (json.JSONDecodeError, AttributeError, OSError):
        return None


def class_mask_values(mask_values: list | None, n_classes: int) -> list:
    """milesial's mapping class i -> mask_values[i]; predict.py's default [0, 1] when a checkpoint
    has none (class indices for more classes)."""
    return mask_values or ([0, 1] if n_classes <= 2 else list(range(n_classes)))


def build_model(ckpt: Checkpoint) -> nn.Module:
    """The eager model with the checkpoint's weights, in eval mode on the CPU."""
    model = create_model(ckpt.architecture, **ckpt.config)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise UserError(
            f"{ckpt.path} does not fit the {ckpt.architecture} model {ckpt.config}: {detail[:300]}"
        ) from None
    return model.eval()


def _torch_load(path: Path):
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory: pass the checkpoint file (.pth/.pt) inside it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UserError(
                f"refusing to load {path}: it pickles Python objects that could run code. "
                "Load it in the project that made it and re-save the weights with "
                "torch.save(model.state_dict(), 'weights.pth')"
            ) from None
        raise _unreadable(path, exc) from None
    except Exception as exc:  # torch.load of arbitrary bytes raises anything (KeyError, EOFError, ...)
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: Exception) -> UserError:
    detail = " ".join(str(exc).split()).split(". ")[0][:120]
    if len(detail) < 24:  # e.g. KeyError: 101 from a text file; the type says more than the value
        detail = f"{type(exc).__name__}: {detail}".rstrip(": ")
    return UserError(f"{path} is not a readable PyTorch checkpoint (truncated, or not made by torch.save): {detail}")


def _unwrap(raw, path: Path) -> tuple[dict, list | None]:
    """Plain state_dict, milesial's state_dict + mask_values, or a dict wrapping a state_dict."""
    if not isinstance(raw, dict):
        raise UserError(f"{path} holds a {type(raw).__name__}, not a state_dict")
    for key in _WRAPPER_KEYS:
        if isinstance(raw.get(key), dict):
            inner = dict(raw[key])
            inner.setdefault("mask_values", raw.get("mask_values"))
            raw = inner
            break
    raw = dict(raw)
    mask_values = raw.pop("mask_values", None)
    if mask_values is not None and not isinstance(mask_values, (list, tuple)):
        raise UserError(f"{path}: mask_values must be a list, got {type(mask_values).__name__}")
    state_dict = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise UserError(f"{path} holds no tensors: it is not a model checkpoint")
    # nn.DataParallel saves every key under "module."; the model itself does not have it.
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict, _plain(mask_values)


def _plain(mask_values):
    """mask_values as JSON-ready Python values (ints or [r, g, b] lists)."""
    if mask_values is None:
        return None
    return [v.tolist() if hasattr(v, "tolist") else (list(v) if isinstance(v, tuple) else v) for v in mask_values]
