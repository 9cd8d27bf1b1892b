"""Safe checkpoint loading: weights_only=True always, every milesial release format, and one-line
errors for everything that is not a usable checkpoint."""

import hashlib
import json
import pickle
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from unet_export.checkpoint_archive import check_zip, container, corrupt, error_detail, exported_model, is_safetensors
from unet_export.errors import EagerUnavailable, UserError, require
from unet_export.fileio import loads_json, sha256_file
from unet_export.models import MODELS, ModelChoice, create_model, detect_model, external, get_spec, smp
from unet_export.pickled import read_pickled_model

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
    validation: str | None = None  # held-out images the sidecar names: what reduced precision is judged on
    # A model built already (a factory's, an in-memory module): copied instead of create_model.
    module: nn.Module | None = field(default=None, repr=False)

    def record(self) -> dict:
        """What the manifest and the artefacts' metadata say about the model. An in-memory module
        has no file: its "path" is the name its artefacts get (the class, lower-cased)."""
        where = str(self.path) if self.architecture == external.MODULE else str(self.path.resolve())
        return {
            "architecture": self.architecture,
            "config": self.config,
            "mask_values": self.mask_values,
            "preprocess": self.preprocess or {"scale": 1.0, "square": None},
            **({"validation": self.validation} if self.validation else {}),
            "checkpoint": {"path": where, "sha256": self.sha256},
        }


def load_checkpoint(path: str | Path, model: str | ModelChoice | None = None) -> Checkpoint:
    """Read a checkpoint and work out its architecture: ``model`` if given, else the one its
    training sidecar records (a variant such as valid-same has its family's keys), else the keys.
    A ModelChoice's options configure a family the keys cannot name (smp: --arch, --encoder, ...);
    a save_pretrained folder names its own."""
    choice = ModelChoice.of(model)
    if choice.in_memory:
        return _in_memory(choice.options)
    if path is None:
        raise UserError("no checkpoint given: pass a checkpoint file (from Python, or model=an nn.Module)")
    path, options = Path(path), dict(choice.options)
    model = choice.name or implied_model(options)
    if path.is_dir():
        raw, sha256, model = _pretrained(path, model, options)
    else:
        raw, sha256 = _torch_load(path), None
    state_dict, mask_values = _unwrap(raw, path)
    sidecar = read_sidecar(path)
    recorded = sidecar.get("model") if isinstance(sidecar.get("model"), str) else None
    spec = get_spec(model or recorded) if model or recorded else None
    preprocess = sidecar.get("preprocess") if isinstance(sidecar.get("preprocess"), dict) else None
    if spec is not None and spec.configure is not None:
        name, config = model or recorded, dict(spec.configure(state_dict, options))
        state_dict, preprocess = spec.weights(state_dict), preprocess or config.pop("preprocess", None)
    else:
        name, config = _detected(path, state_dict, model, recorded)
    built = config.pop("built", None)  # a factory's model, built to ask it its sizes
    return Checkpoint(path, sha256 or sha256_file(path), name, config, state_dict, mask_values, preprocess,
                      _validation_dir(path, sidecar), built)  # fmt: skip


def implied_model(options: dict) -> str | None:
    """--model-factory without --model means a factory's model; --arch or --encoder an smp model."""
    if options.get("factory"):
        return external.FACTORY
    return "smp" if options.get("arch") or options.get("encoder") else None


def _in_memory(options: dict) -> Checkpoint:
    """An nn.Module from Python (ModelChoice "module"): its state_dict is the checkpoint, named by
    its digest; a copy is exported, never the caller's module."""
    net = external.module_copy(options.get("module"))
    state_dict = {key: value.detach() for key, value in net.state_dict().items()}
    config = external.configure_module(state_dict, options | {"built": net})
    spec = options.get("inputs") or external.InputSpec()
    return Checkpoint(Path(type(net).__name__.lower()), external.state_digest(state_dict), external.MODULE, config,
                      state_dict, spec.mask_values, config.pop("preprocess"), module=net)  # fmt: skip


def _detected(path: Path, state_dict: dict, model: str | None, recorded: str | None) -> tuple[str, dict]:
    found = detect_model(state_dict, model or recorded)
    if found is not None:
        return found
    sample = ", ".join(list(state_dict)[:3]) or "none"
    if not (model or recorded) and smp.looks_like(state_dict):
        raise UserError(f"{path} looks like a segmentation_models_pytorch state_dict (keys {sample}, ...): pass "
                        "--arch ARCH --encoder NAME (its classes and channels are read from the weights), or "
                        "save the model with model.save_pretrained(DIR) and pass DIR")  # fmt: skip
    known = [name for name, spec in MODELS.items() if spec.configure is None]
    target = f"a {model or recorded!r} model" if model or recorded else f"a known architecture ({', '.join(known)})"
    source = f" (as its sidecar {path.with_suffix('.json').name} says)" if recorded and not model else ""
    raise UserError(f"{path} is not a checkpoint of {target}{source}: its keys begin {sample}")


# A save_pretrained folder (Hugging Face's ModelHubMixin, which smp uses): config.json + weights.
PRETRAINED_CONFIG, PRETRAINED_WEIGHTS = "config.json", ("model.safetensors", "pytorch_model.bin")


def _pretrained(path: Path, model: str | None, options: dict) -> tuple[dict, str, str | None]:
    """(raw weights, sha256 over config and weights, model) of a save_pretrained folder; smp's
    config names its class, which makes the folder an smp model with no flags."""
    weights = next((path / name for name in PRETRAINED_WEIGHTS if (path / name).is_file()), None)
    config_file = path / PRETRAINED_CONFIG
    if weights is None or not config_file.is_file():
        raise UserError(f"{path} is a directory: pass the checkpoint file (.pth, .pt, .safetensors) inside it, or a "
                        f"save_pretrained folder ({PRETRAINED_CONFIG} + {PRETRAINED_WEIGHTS[0]})")  # fmt: skip
    try:
        config = loads_json(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise corrupt(config_file, f"it is not JSON: {error_detail(exc)}") from None
    except OSError as exc:
        raise UserError(f"cannot read {config_file}: {exc.strerror or exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get(smp.CLASS_KEY), str):
        if model is None:
            raise UserError(f"{config_file} does not name a segmentation_models_pytorch class ({smp.CLASS_KEY}): "
                            "pass --model NAME for the weights in it")  # fmt: skip
        config = {}
    options.setdefault("config_json", config)
    digest = hashlib.sha256((sha256_file(config_file) + sha256_file(weights)).encode()).hexdigest()
    return _torch_load(weights), digest, model or ("smp" if config else None)


def _validation_dir(path: Path, sidecar: dict) -> str | None:
    """The held-out image folder the sidecar records ({"validation": {"path": ...}}, relative to
    the checkpoint's folder or absolute), if it is there."""
    where = (sidecar.get("validation") or {}).get("path") if isinstance(sidecar.get("validation"), dict) else None
    # Relative to the sidecar file itself (followed through a symlink), not to the link's folder.
    folder = (path.with_suffix(".json").resolve().parent / where).resolve() if isinstance(where, str) else None
    return str(folder) if folder and folder.is_dir() else None


def read_sidecar(path: Path) -> dict:
    """`unet-export train` writes <name>.json beside each checkpoint: its architecture and
    preprocessing travel with the model into every artefact, so predict and evaluate match
    training. An unreadable sidecar is ignored (the checkpoint alone still loads)."""
    sidecar = Path(path).with_suffix(".json")
    try:
        data = loads_json(sidecar.read_text()) if sidecar.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def class_mask_values(mask_values: list | None, n_classes: int) -> list:
    """milesial's mapping class i -> mask_values[i]; predict.py's default [0, 1] when a checkpoint
    has none (class indices for more classes)."""
    return mask_values or ([0, 1] if n_classes <= 2 else list(range(n_classes)))


def build_model(ckpt: Checkpoint) -> nn.Module:
    """The eager model with the checkpoint's weights, in eval mode on the CPU."""
    if ckpt.module is not None:  # built by a factory or passed from Python: a copy, loaded below
        model = external.module_copy(ckpt.module)
    else:
        with rebuilding(ckpt.architecture):
            model = create_model(ckpt.architecture, **ckpt.config)
    # strict=True: with strict=False, smp's load_state_dict drops every weight of another shape with
    # a warning and keeps the random one: a model that is not the checkpoint's, and parity would pass.
    try:  # a copy: smp's load_state_dict renames keys in the dict it is given
        model.load_state_dict(dict(ckpt.state_dict), strict=True)
    except RuntimeError as exc:
        detail = _key_mismatch(model.state_dict(), ckpt.state_dict) or " ".join(str(exc).split())[:300]
        raise UserError(f"{ckpt.path} does not fit the {_named(ckpt)} model: {detail}") from None
    return model.eval()


@contextmanager
def rebuilding(architecture: str):
    """Rebuilding a configured family's eager model (smp, a factory) where its optional dependency
    is missing (``require``'s UserError from an ImportError) raises EagerUnavailable with that
    reason: the one type callers that can judge against recorded references catch."""
    try:
        yield
    except EagerUnavailable:
        raise
    except UserError as exc:
        spec = MODELS.get(architecture)
        if spec is not None and spec.configure is not None and isinstance(exc.__cause__, ImportError):
            raise EagerUnavailable(str(exc)) from exc
        raise


def _named(ckpt: Checkpoint) -> str:
    """smp Unet (resnet34): the family and what configured it, where it is not the keys."""
    init = ckpt.config.get("init") if isinstance(ckpt.config.get("init"), dict) else {}
    if "factory" in ckpt.config:
        return f"{ckpt.architecture} {ckpt.config['factory']}"
    return f"{ckpt.architecture} {ckpt.config['arch']} ({init.get('encoder_name')})" if "arch" in ckpt.config \
        else ckpt.architecture


def _key_mismatch(expected: dict, given: dict) -> str:
    """What load_state_dict(strict=True) refused, shortened to the first keys of each kind."""
    shaped = [f"{k}: {list(given[k].shape)} here, {list(v.shape)} in the model" for k, v in expected.items()
              if k in given and given[k].shape != v.shape]  # fmt: skip
    parts = []
    for what, keys in (("missing keys", [k for k in expected if k not in given]),
                       ("unexpected keys", [k for k in given if k not in expected]), ("keys of another shape", shaped)):  # fmt: skip
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{more})")
    return "; ".join(parts)


def _torch_load(path: Path):
    """torch.load(weights_only=True), after checking the container: a damaged file is "corrupt",
    and only a pickle naming a global weights_only refuses is "could run code"."""
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory: pass the checkpoint file (.pth/.pt) inside it")
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not head:
        raise UserError(f"{path} is empty (0 bytes): re-download or re-save it")
    if is_safetensors(path, head):
        return _safetensors_load(path)
    kind = container(path, head)
    exported = exported_model(path, head, kind)
    if exported:
        raise UserError(f"{path} is {exported}, not a checkpoint: pass it to predict or unet-bench, "
                        "or export from the checkpoint it came from")  # fmt: skip
    prefix = check_zip(path) if kind == "zip" else None
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles; the user gets one line, below
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load of damaged bytes raises anything (KeyError, EOFError, ...)
        failure = exc
    raise _load_failure(path, kind, prefix, failure)


def _safetensors_load(path: Path) -> dict:
    """A .safetensors file holds tensors and string metadata only: nothing in it can run. A
    milesial ``mask_values`` (a list, not a tensor) travels as JSON in that metadata."""
    st = require("safetensors.torch", pip_name="safetensors")
    try:  # one open for tensors and metadata (load_file would parse the header a second time)
        with st.safe_open(str(path), framework="pt", device="cpu") as fh:
            state = {key: fh.get_tensor(key) for key in fh.keys()}
            metadata = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own SafetensorError for any damage
        raise corrupt(path, f"it is not a readable safetensors file: {error_detail(exc)}") from None
    if "mask_values" in metadata:
        try:
            state["mask_values"] = loads_json(metadata["mask_values"])
        except json.JSONDecodeError as exc:
            raise corrupt(path, f"its metadata mask_values is not JSON: {exc.msg}") from None
    return state


# weights_only names the global it refuses: "GLOBAL x.y was not an allowed global by default" or
# "GLOBAL os.system whose module os is blocked". Anything else it raises is a damaged pickle.
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)")


def _load_failure(path: Path, kind: str | None, prefix: str | None, exc: Exception) -> UserError:
    message = str(exc)
    refused = _REFUSED_GLOBAL.search(message) if isinstance(exc, pickle.UnpicklingError) else None
    if refused and all(part.isidentifier() for part in refused.group(1).split(".")):
        return _refused(path, kind, prefix, refused.group(1))
    if "maximum supported version" in message:
        return UserError(f"{path} was written by a newer PyTorch than this one ({torch.__version__}): {error_detail(exc)}")
    if kind is None:
        return _unreadable(path, exc)
    # A refused global that no Python object could have ("torch!_utils") is damage, not a threat.
    detail = f"it names a malformed global {refused.group(1)[:80]!r}" if refused else error_detail(exc)
    if kind == "zip":
        return corrupt(path, f"its pickled data ({prefix}/data.pkl) is damaged: {detail}")
    # The legacy format has no CRC: damage shows only where it breaks the pickle or a storage.
    return corrupt(path, f"the legacy (non-zip) checkpoint is truncated or damaged: {detail}")


_RESAVE = "torch.save(model.state_dict(), 'weights.pth')"


def _refused(path: Path, kind: str | None, prefix: str | None, refused: str) -> UserError:
    """weights_only refused a global. A whole pickled model (torch.save(model)) is read without
    running it: re-saving its state_dict is advised only when those weights are an architecture
    that loads here; otherwise the user hears it is not supported, not sent round in a circle."""
    whole = read_pickled_model(path, kind, prefix)
    if whole is not None and whole.cls.startswith("segmentation_models_pytorch."):
        return UserError(f"refusing to load {path}: it pickles a whole segmentation_models_pytorch model "
                         f"({whole.cls}), Python objects that could run code. Save it with "
                         "model.save_pretrained(DIR) (config and weights, no code) and pass DIR")  # fmt: skip
    if whole is None or not whole.complete:
        return UserError(f"refusing to load {path}: it pickles Python objects that could run code ({refused}). "
                         f"Load it in the project that made it and re-save the weights with {_RESAVE}")  # fmt: skip
    weights = {k.removeprefix("module."): torch.empty(shape, device="meta") for k, shape in whole.shapes.items()}
    found = detect_model(weights)
    if found is not None:
        alike = [name for name in MODELS if name != found[0] and detect_model(weights, name) is not None]
        which = f" (or {', '.join(alike)}: the keys cannot tell, --model can)" if alike else ""
        return UserError(f"refusing to load {path}: it pickles a whole model ({whole.cls}), Python objects that "
                         f"could run code. Its weights are a {found[0]} model{which}, which unet-export supports: "
                         f"load it in the project that made it and re-save only the weights with {_RESAVE}, then "
                         "pass weights.pth")  # fmt: skip
    sample = ", ".join(list(weights)[:3]) or "none"
    return UserError(f"refusing to load {path}: it pickles a whole model ({whole.cls}), Python objects that could "
                     f"run code, of an architecture no --model names (keys {sample}, ...): re-save its weights with "
                     f"{_RESAVE} in the project that made it and pass --model-factory path/to/file.py:CALLABLE, the "
                     "function that builds the model")  # fmt: skip


def _unreadable(path: Path, exc: Exception) -> UserError:
    return UserError(
        f"{path} is not a readable PyTorch checkpoint (truncated, or not made by torch.save): {error_detail(exc)}"
    )


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
