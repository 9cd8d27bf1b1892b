"""What a pickled whole model (``torch.save(model)``) holds, read without running any of it: the
class it was saved from, and the names and shapes of its state_dict. weights_only refuses such a
file (its classes could run code); these tell the user whether re-saving the state_dict helps.

The pickle is run on a Python unpickler whose every global is an inert stand-in: nothing is
imported, no function of the file is called, and nothing it names is trusted."""

import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

_SCAN_LIMIT = 32 << 20  # bytes of pickle: a whole U-Net's is ~35 KB, its tensors live outside it
_WRAPPER_KEYS = ("model", "net", "module", "state_dict", "model_state_dict")  # {"model": model, "epoch": 3}
_PARAMETER = ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state")
_TENSOR = "torch._utils._rebuild_tensor_v2"
_TENSOR_SUBCLASS = "torch._utils._rebuild_from_type_v2"  # (rebuild function, type, its args, state)


@dataclass(frozen=True)
class PickledModel:
    cls: str  # "unet.unet_model.UNet": the class the root module was pickled from
    shapes: dict[str, tuple[int, ...]]  # its state_dict's keys -> shapes, as model.state_dict() gives
    complete: bool  # every parameter and persistent buffer had a shape that could be read


class _Stub:
    """Stands in for every global the pickle names. Called (REDUCE), created (NEWOBJ) or filled
    (BUILD, SETITEMS), it only records what it was given."""

    name = ""  # module.qualname of the global, set on each stand-in class
    args: tuple = ()
    state = None

    def __new__(cls, *args, **kwargs):
        stub = super().__new__(cls)
        stub.args, stub.items = args, {}
        return stub

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _Scan(pickle._Unpickler):  # the Python unpickler: find_class below is the only way to a global
    def find_class(self, module, name):
        return type("_Global", (_Stub,), {"name": f"{module}.{name}"})

    def persistent_load(self, pid):
        # The legacy format names each module class by persistent id ("module", class, file, source).
        if isinstance(pid, tuple) and len(pid) > 1 and pid[0] in ("module", b"module") and isinstance(pid[1], type):
            return pid[1]
        return _Stub()  # a storage: its bytes are never read


def read_pickled_model(path: Path, kind: str | None, prefix: str | None) -> PickledModel | None:
    """The whole model pickled in the checkpoint at ``path`` (``kind`` "zip" with archive folder
    ``prefix``, or "legacy"), or None when it holds no nn.Module or cannot be scanned."""
    try:
        root = _scan_root(Path(path), kind, prefix)
    except Exception:  # noqa: BLE001 - a damaged or hostile pickle raises anything: no answer, no harm
        return None
    if not _is_module(root) and isinstance(root, dict):
        root = next((root[k] for k in _WRAPPER_KEYS if _is_module(root.get(k))), None)
    if not _is_module(root):
        return None
    children = _mapping(root.state.get("_modules"))
    if list(children) == ["module"] and _is_module(children["module"]):  # nn.DataParallel(model): the model
        root = children["module"]
    shapes: dict[str, tuple[int, ...]] = {}
    complete = _collect(root, "", shapes, set())
    return PickledModel(type(root).name, shapes, complete)


def _scan_root(path: Path, kind: str | None, prefix: str | None):
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            name = f"{prefix}/data.pkl"
            if zf.getinfo(name).file_size > _SCAN_LIMIT:
                return None
            return _Scan(io.BytesIO(zf.read(name)), encoding="utf-8").load()
    if kind == "legacy":  # torch.save's old format: magic number, protocol, sys info, then the object
        with path.open("rb") as fh:
            scan = _Scan(io.BytesIO(fh.read(_SCAN_LIMIT)), encoding="utf-8")
        for _ in range(3):
            scan.load()
        return scan.load()
    return None


def _is_module(obj) -> bool:
    return isinstance(obj, _Stub) and isinstance(obj.state, dict) and "_modules" in obj.state


def _mapping(obj) -> dict:
    """A dict, or an OrderedDict (a stand-in filled by SETITEMS)."""
    return obj if isinstance(obj, dict) else obj.items if isinstance(obj, _Stub) else {}


def _collect(module: _Stub, prefix: str, shapes: dict, seen: set) -> bool:
    """Add ``module``'s parameters and persistent buffers to ``shapes`` under ``prefix``, then its
    children's, in state_dict order; False if a shape could not be read."""
    if id(module) in seen:  # a module shared or looped back is counted once, as state_dict does
        return True
    seen.add(id(module))
    state, complete = module.state, True
    transient = state.get("_non_persistent_buffers_set")  # set([...]): a REDUCE of builtins.set
    skip = set(transient.args[0]) if isinstance(transient, _Stub) and transient.args and \
        isinstance(transient.args[0], list) else set()  # fmt: skip
    for group in ("_parameters", "_buffers"):
        for name, value in _mapping(state.get(group)).items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            shape = _shape(value)
            complete &= shape is not None
            if shape is not None:
                shapes[f"{prefix}{name}"] = shape
    for name, child in _mapping(state.get("_modules")).items():
        if _is_module(child):
            complete &= _collect(child, f"{prefix}{name}.", shapes, seen)
        elif child is not None:
            complete = False
    return complete


def _shape(value) -> tuple[int, ...] | None:
    """The shape a pickled tensor or Parameter was saved with, from its rebuild call's arguments."""
    if isinstance(value, _Stub) and value.name in _PARAMETER and value.args:
        value = value.args[0]
    if not isinstance(value, _Stub):
        return None
    args = value.args
    if value.name == _TENSOR_SUBCLASS and len(args) > 2 and getattr(args[0], "name", "") == _TENSOR:
        args = args[2]
    elif value.name != _TENSOR:
        return None
    size = args[2] if isinstance(args, tuple) and len(args) > 2 else None
    if isinstance(size, _Stub):  # torch.Size(tuple)
        size = size.args[0] if size.args else None
    if isinstance(size, (tuple, list)) and all(isinstance(n, int) and n >= 0 for n in size):
        return tuple(size)
    return None
