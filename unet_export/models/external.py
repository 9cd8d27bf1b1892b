"""Models the registry has no constructor for: a user's factory (``--model-factory
MODULE:CALLABLE`` or ``path/to/file.py:CALLABLE``; the checkpoint holds the weights) and an
in-memory ``nn.Module`` (the Python API's ``model=net``). What the config records is asked of the
model itself: its input channels, its classes (one forward) and the input sizes it takes.

Importing a factory runs its code. A workdir's manifest is untrusted input, so a recorded factory
is never imported because the manifest names it: only when the user names it again on the command
(a file must still be the one exported from, by sha256). Without it the eager model cannot be
rebuilt (EagerUnavailable), and neither can an in-memory module's from a workdir."""

import copy
import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from unet_export.data.dataset import Preprocess
from unet_export.errors import EagerUnavailable, UserError
from unet_export.fileio import sha256_file
from unet_export.models.sizes import SizeRule
from unet_export.models.smp import size_rule as encoder_size_rule

FACTORY, MODULE = "factory", "module"
# Tried in turn when nothing says which sizes a model takes: the first whose smallest size and a
# 250x375-ish size (the gate's second shape, flows/export.py) both run and give a mask that size.
MULTIPLES = (1, 2, 4, 8, 16, 32, 64)
PROBE = (250, 375)


@dataclass(frozen=True)
class InputSpec:
    """What an in-memory module takes, which no checkpoint file says: its input channels (None:
    its first convolution's), the sizes it accepts (None: asked of an smp-style encoder, else
    probed), the preprocessing the images get (a Preprocess record such as {"mean": [...],
    "std": [...]}; None: image / 255), the mask value of each class (None: class indices) and
    where one class's output turns into class 1 (0 for a logit, 0.5 for a sigmoid probability)."""

    channels: int | None = None
    sizes: SizeRule | None = None
    preprocess: dict | None = None
    mask_values: list | None = None
    threshold: float = 0.0


@dataclass(frozen=True)
class FactoryRef:
    """A factory reference: an absolute .py path (with its sha256) or a module name, and a callable."""

    target: str
    name: str
    sha256: str | None = None  # the file form's digest; None for a module

    @property
    def ref(self) -> str:
        return f"{self.target}:{self.name}"


def parse_ref(ref: str) -> FactoryRef:
    """``pkg.mod:NAME`` or ``path/to/file.py:NAME`` (the file must exist; its digest is taken)."""
    target, sep, name = str(ref).rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise UserError(f"--model-factory {ref!r}: give MODULE:CALLABLE or path/to/file.py:CALLABLE")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise UserError(f"--model-factory {ref}: no such file {target}")
        return FactoryRef(str(path.resolve()), name, sha256_file(path))
    if not all(part.isidentifier() for part in target.split(".")):
        raise UserError(f"--model-factory {ref!r}: {target!r} is neither a module name nor a .py file")
    return FactoryRef(target, name)


def load_factory(factory: FactoryRef):
    """The callable ``factory`` names, imported (a file under a module name of its own)."""
    module = _import_file(factory) if factory.sha256 else _import_module(factory)
    made = getattr(module, factory.name, None)
    if made is None:
        raise UserError(f"--model-factory {factory.ref}: {factory.target} has no {factory.name}")
    if not callable(made):
        raise UserError(f"--model-factory {factory.ref}: {factory.name} is not callable ({type(made).__name__})")
    return made


def _import_file(factory: FactoryRef):
    """Run the file once per content (its digest names the module), with its folder on sys.path
    for the call so that it can import what lies beside it."""
    name = f"unet_export_factory_{factory.sha256[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, factory.target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by its name
    try:
        with _on_path(str(Path(factory.target).parent)):
            spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise UserError(f"--model-factory {factory.ref}: importing {factory.target} failed: {_detail(exc)}") from None
    return module


def _import_module(factory: FactoryRef):
    """importlib.import_module, with the current folder first on sys.path for the call (as
    ``python -m`` and uvicorn's --app-dir do)."""
    try:
        with _on_path(os.getcwd()):
            return importlib.import_module(factory.target)
    except (Exception, SystemExit) as exc:
        raise UserError(f"--model-factory {factory.ref}: importing {factory.target} failed: {_detail(exc)}") from None


class _on_path:
    def __init__(self, folder: str):
        self.folder = folder

    def __enter__(self):
        sys.path.insert(0, self.folder)

    def __exit__(self, *exc):
        if self.folder in sys.path:
            sys.path.remove(self.folder)  # the first occurrence: the one put there


def _detail(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _called(factory, ref: str, kwargs: dict) -> nn.Module:
    try:
        net = factory(**kwargs)
    except Exception as exc:
        raise UserError(f"--model-factory {ref}: calling it with {kwargs or 'no arguments'} failed: "
                        f"{_detail(exc)}") from None  # fmt: skip
    if not isinstance(net, nn.Module):
        raise UserError(f"--model-factory {ref} returned a {type(net).__name__}, not a torch.nn.Module")
    return net.cpu().eval()


def configure(state_dict: dict, options: dict) -> dict:
    """The "factory" family's config: {"factory", "factory_sha256", "kwargs", "n_channels",
    "n_classes", "sizes", "threshold"}, plus what load_checkpoint takes out ("built": the model,
    "preprocess"). ``options``: "factory" (the user's reference), "smp_args" (--model-arg: the
    factory's keyword arguments), "in_channels", "min_size", "size_multiple", "mean", "std"; or
    "recorded" (a manifest's config) with the user's "factory", which must be the recorded one."""
    if "recorded" in options:
        return _rebuilt(options["recorded"], options.get("factory"))
    if not options.get("factory"):
        raise UserError("--model factory builds the model with --model-factory MODULE:CALLABLE: pass it")
    factory = parse_ref(options["factory"])
    kwargs = dict(options.get("smp_args") or {})
    net = _called(load_factory(factory), factory.ref, kwargs)
    channels = int(options.get("in_channels") or _first_conv_channels(net))
    rule, classes = asked(net, channels, _user_rule(options), factory.ref, "pass --min-size N and --size-multiple N")
    config = {"factory": factory.ref, "factory_sha256": factory.sha256, "kwargs": kwargs, "n_channels": channels,
              "n_classes": classes, "sizes": rule.to_dict(), "threshold": 0.0}  # fmt: skip
    return config | {"built": net, "preprocess": _preprocess(options)}


def _user_rule(options: dict) -> SizeRule | None:
    minimum, multiple = options.get("min_size"), options.get("size_multiple")
    if not (minimum or multiple):
        return None
    return SizeRule(min=minimum or max(16, multiple), multiple=multiple or 1)


def _preprocess(options: dict) -> dict | None:
    mean, std = options.get("mean"), options.get("std")
    if not (mean or std):
        return None
    if not (mean and std):
        raise UserError("--mean and --std go together for a --model-factory model (nothing else knows its encoder)")
    record = {"scale": 1.0, "square": None, "mean": list(mean), "std": list(std), "bgr": False}
    Preprocess.from_dict(record)  # one value per channel each, std above 0
    return record | {"source": "--mean/--std"}


def _first_conv_channels(net: nn.Module) -> int:
    first = next((p for p in net.state_dict().values() if p.ndim == 4), None)
    if first is None:
        raise UserError("the model has no 4-D (convolution) weight to read its input channels from: pass "
                        "--in-channels (InputSpec(channels=N) from Python)")  # fmt: skip
    return int(first.shape[1])


def asked(net: nn.Module, channels: int, rule: SizeRule | None, name: str, how: str) -> tuple[SizeRule, int]:
    """(sizes, classes): the given rule, else an smp-style encoder's (``encoder.output_stride``),
    else the first of MULTIPLES that runs; classes are the output's channels. ``how``: how the
    user gives the rule instead."""
    if rule is None and hasattr(getattr(net, "encoder", None), "output_stride"):
        rule = SizeRule(**encoder_size_rule(net))
    rules = [rule] if rule else [SizeRule(min=max(16, m), multiple=m) for m in MULTIPLES]
    failure = ""
    for candidate in rules:
        classes, failure = _probe(net, channels, candidate, name)
        if classes:
            return candidate, classes
    if rule:
        raise UserError(f"{name}: {failure}")
    raise UserError(f"{name}: found no input sizes the model takes (multiples of {MULTIPLES[0]} to {MULTIPLES[-1]}, "
                    f"last: {failure}): {how}")  # fmt: skip


def _probe(net: nn.Module, channels: int, rule: SizeRule, name: str) -> tuple[int, str]:
    """(classes, "") when the model's smallest size and the gate's second size both give a mask
    of their size, else (0, why)."""
    classes = 0
    for height, width in dict.fromkeys([(rule.first(), rule.first()), (rule.fit(PROBE[0]), rule.fit(PROBE[1]))]):
        shape = (1, channels, height, width)
        try:
            with torch.no_grad():
                out = net(torch.rand(shape))
        except Exception as exc:  # a model's forward raises anything (RuntimeError, AssertionError, ...)
            return 0, f"its forward failed on {'x'.join(map(str, shape))}: {_detail(exc)}"
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            what = f"a {out.ndim}-D tensor" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise UserError(f"{name}: the model returns {what}; unet-export exports models that return one "
                            "N x classes x H x W tensor of mask logits (wrap it in an nn.Module that does)")  # fmt: skip
        if tuple(out.shape[-2:]) != (height, width):
            return 0, f"its output is {tuple(out.shape[-2:])} for a {height}x{width} input"
        classes = int(out.shape[1])
    return classes, ""


def _rebuilt(recorded, ref: str | None) -> dict:
    """The recorded config, with the model built by the user's factory, after checking that it is
    the recorded one (a file: the same callable and sha256). Nothing the manifest names is imported."""
    config = checked_record(FACTORY, recorded)
    if not ref:
        raise unavailable(FACTORY, config)
    factory = parse_ref(ref)
    target, _, name = config["factory"].rpartition(":")
    if config["factory_sha256"] is None:
        if factory.ref != config["factory"]:
            raise UserError(f"--model-factory {ref}: the artefacts' model was built by {config['factory']}")
    elif factory.sha256 is None or factory.name != name:
        raise UserError(f"--model-factory {ref}: the artefacts' model was built by {name} in the file {target}: "
                        f"pass path/to/{Path(target).name}:{name}")  # fmt: skip
    elif factory.sha256 != config["factory_sha256"]:
        raise UserError(f"--model-factory {ref}: {factory.target} has changed since the artefacts were exported "
                        f"(sha256 {factory.sha256[:12]}..., recorded {config['factory_sha256'][:12]}...): "
                        "pass the file they were exported with, or export again")  # fmt: skip
    return config | {"built": _called(load_factory(factory), ref, config["kwargs"])}


def checked_record(family: str, config) -> dict:
    """A config read back from a manifest (untrusted): the shape configure writes, or exit 2."""
    sizes = config.get("sizes") if isinstance(config, dict) else None
    fine = (isinstance(config, dict) and isinstance(sizes, dict)
            and all(type(sizes.get(k)) is int for k in ("min", "multiple", "offset", "shrink"))
            and sizes["multiple"] > 0 and all(type(config.get(k)) is int for k in ("n_channels", "n_classes")))
    if fine and family == FACTORY:
        digest = config.get("factory_sha256")
        fine = (isinstance(config.get("factory"), str) and ":" in config["factory"]
                and isinstance(config.get("kwargs"), dict) and (digest is None or isinstance(digest, str)))  # fmt: skip
    if not fine:
        raise UserError(f"the manifest's {family} model config is damaged (sizes, n_channels, n_classes"
                        f"{', factory, kwargs' if family == FACTORY else ''}): export again")  # fmt: skip
    return config


def unavailable(family: str, config: dict) -> EagerUnavailable:
    """Why the eager model of a workdir cannot be rebuilt here without the user's say."""
    if family == MODULE:
        return EagerUnavailable(f"the artefacts were exported from an in-memory module ({_shown(config.get('class'))}):"
                                " its eager model cannot be rebuilt from the workdir; pass the module itself from "
                                "Python (model=net)")  # fmt: skip
    factory = _shown(config.get("factory"))
    return EagerUnavailable(f"the model was built by the factory {factory}, which runs code: it is imported only "
                            f"when named on the command, so pass --model-factory {factory} to rebuild the eager model")


def _shown(value) -> str:
    return str(value)[:200] if isinstance(value, str) else "unknown"


def check_rebuild(family: str, config, options: dict) -> None:
    """Refuse, before the workdir's checkpoint is read, what cannot rebuild its eager model: no
    factory or module of the user's for a family that needs one, or one given for another family."""
    given = FACTORY if options.get("factory") else MODULE if isinstance(options.get("module"), nn.Module) else None
    if family in (FACTORY, MODULE) and given is None:
        raise unavailable(family, config if isinstance(config, dict) else {})
    if given is not None and given != family:
        what = "--model-factory" if given == FACTORY else "an in-memory module"
        raise UserError(f"{what} was given, but the workdir's artefacts are of a {family!r} model")


def configure_module(state_dict: dict, options: dict) -> dict:
    """The "module" family's config: {"class", "n_channels", "n_classes", "sizes", "threshold"}
    (+ "built": a CPU copy of the module, "preprocess"), from ``options["inputs"]`` (an InputSpec)."""
    if "recorded" in options:
        raise unavailable(MODULE, options["recorded"] if isinstance(options["recorded"], dict) else {})
    if not isinstance(options.get("built"), nn.Module):
        raise UserError("the 'module' model is an in-memory nn.Module: pass it from Python (model=net)")
    net, spec = options["built"], options.get("inputs") or InputSpec()
    if not isinstance(spec, InputSpec):
        raise UserError(f"inputs must be an InputSpec, got a {type(spec).__name__}")
    if spec.preprocess is not None:
        Preprocess.from_dict(spec.preprocess)
    name = f"{type(net).__module__}.{type(net).__qualname__}"
    channels = int(spec.channels or _first_conv_channels(net))
    rule, classes = asked(net, channels, spec.sizes, name, "give InputSpec(sizes=SizeRule(min=N, multiple=N))")
    config = {"class": name, "n_channels": channels, "n_classes": classes, "sizes": rule.to_dict(),
              "threshold": float(spec.threshold)}  # fmt: skip
    return config | {"preprocess": spec.preprocess}


def module_copy(net: nn.Module) -> nn.Module:
    """The user's module, copied to the CPU in eval mode: exporting never changes the caller's."""
    if not isinstance(net, nn.Module):
        raise UserError(f"model must be an nn.Module, got a {type(net).__name__}")
    try:
        return copy.deepcopy(net).cpu().eval()
    except Exception as exc:  # a module holding something deepcopy cannot copy (a lock, a handle)
        raise UserError(f"cannot copy the module {type(net).__name__} to export it: {_detail(exc)}") from None


def state_digest(state_dict: dict) -> str:
    """sha256 over the state_dict (names, dtypes, shapes and bytes, in key order): an in-memory
    module's checkpoint identity, as a file's sha256 is a checkpoint's."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def unbuildable(**config) -> nn.Module:
    """The registry's constructor for these families: their model comes from configure."""
    raise EagerUnavailable("a factory's or an in-memory module's model is built by load_checkpoint (with "
                           "--model-factory or model=net), not by create_model")  # fmt: skip
