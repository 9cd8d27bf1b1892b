"""Safe checkpoint loading: weights_only=True always, every milesial release format, and one-line
errors for everything that is not a usable checkpoint."""

import json
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from unet_export.errors import UserError
from unet_export.fileio import loads_json, sha256_file
from unet_export.models import MODELS, create_model, detect_model
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

    def record(self) -> dict:
        """What the manifest and the artefacts' metadata say about the model."""
        return {
            "architecture": self.architecture,
            "config": self.config,
            "mask_values": self.mask_values,
            "preprocess": self.preprocess or {"scale": 1.0, "square": None},
            **({"validation": self.validation} if self.validation else {}),
            "checkpoint": {"path": str(self.path.resolve()), "sha256": self.sha256},
        }


def load_checkpoint(path: str | Path, model: str | None = None) -> Checkpoint:
    """Read a checkpoint and work out its architecture: ``model`` if given, else the one its
    training sidecar records (a variant such as valid-same has its family's keys), else the keys."""
    path = Path(path)
    raw = _torch_load(path)
    state_dict, mask_values = _unwrap(raw, path)
    sidecar = read_sidecar(path)
    recorded = sidecar.get("model") if isinstance(sidecar.get("model"), str) else None
    found = detect_model(state_dict, model or recorded)
    if found is None:
        sample = ", ".join(list(state_dict)[:3]) or "none"
        target = f"a {model or recorded!r} model" if model or recorded else f"a known architecture ({', '.join(MODELS)})"
        source = f" (as its sidecar {path.with_suffix('.json').name} says)" if recorded and not model else ""
        raise UserError(f"{path} is not a checkpoint of {target}{source}: its keys begin {sample}")
    name, config = found
    preprocess = sidecar.get("preprocess") if isinstance(sidecar.get("preprocess"), dict) else None
    return Checkpoint(path, sha256_file(path), name, config, state_dict, mask_values, preprocess,
                      _validation_dir(path, sidecar))  # fmt: skip


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
    kind = _container(path, head)
    exported = _exported_model(path, head, kind)
    if exported:
        raise UserError(f"{path} is {exported}, not a checkpoint: pass it to predict or unet-bench, "
                        "or export from the checkpoint it came from")  # fmt: skip
    prefix = _check_zip(path) if kind == "zip" else None
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles; the user gets one line, below
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load of damaged bytes raises anything (KeyError, EOFError, ...)
        failure = exc
    raise _load_failure(path, kind, prefix, failure)


# torch.save's zip format (the default since torch 1.6) and its legacy format, which begins with
# this pickled magic number (protocol 2 unless the caller chose another).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGICS = tuple(
    pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p) for p in range(2, pickle.HIGHEST_PROTOCOL + 1)
)


# What this tool (and others) write; a checkpoint is .pth/.pt, so the suffix alone tells them apart.
_EXPORTED_SUFFIXES = {".onnx": "an ONNX model", ".ts": "a TorchScript model", ".pt2": "an AOTInductor package",
                      ".xml": "an OpenVINO model", ".engine": "a TensorRT engine"}  # fmt: skip


def _exported_model(path: Path, head: bytes, kind: str | None) -> str | None:
    """What an exported model passed as a checkpoint is, before unpickling it fails obscurely
    ("Unsupported operand 8"): by suffix, or by content for a renamed ONNX or OpenVINO file."""
    if path.suffix.lower() in _EXPORTED_SUFFIXES:
        return _EXPORTED_SUFFIXES[path.suffix.lower()]
    if kind is None and head[:1] == b"\x08":  # protobuf field 1 (ir_version): a pickle begins 0x80
        return "an ONNX model"
    if kind is None and head.lstrip().startswith((b"<?xml", b"<net")):
        return "an OpenVINO model"
    return None


def _container(path: Path, head: bytes) -> str | None:
    """The format: "zip", "legacy", or None when it is neither (a text file, an image, ...)."""
    if _ZIP_MAGIC.startswith(head[:4]):  # also a zip cut to less than its first header
        return "zip"
    if len(head) >= 3 and any(magic.startswith(head[: len(magic)]) for magic in _LEGACY_MAGICS):
        return "legacy"
    try:
        return "zip" if zipfile.is_zipfile(path) else None  # a zip whose first bytes are damaged
    except OSError:
        return None


def _corrupt(path: Path, what: str) -> UserError:
    return UserError(f"{path} is corrupt: {what}; re-download or re-save it")


_CHUNK = 1 << 20  # CRCs are checked reading this much at a time: memory stays flat for any size
_DATA_DESCRIPTOR = b"PK\x07\x08"
_ZIP64_SIZE = 0xFFFFFFFF  # a local header's size field when the real size is in the zip64 extra


def _check_zip(path: Path) -> str:
    """Check the container before torch reads it (torch checks no CRC): every member's CRC, its
    local header and data descriptor against the central directory, the layout torch.save writes
    (one <archive>/data.pkl and a version record), and each storage data.pkl names present with
    the byte size it declares. Returns the archive folder's name."""
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:  # noqa: BLE001 - BadZipFile, OSError on a bad offset, struct.error, ...
        detail = "no end-of-archive record" if str(exc) == "File is not a zip file" else _detail(exc)
        raise _corrupt(path, f"the zip archive is truncated or its directory is damaged ({detail})") from None
    with zf, path.open("rb") as raw:
        infos = zf.infolist()
        if not any(i.filename.endswith("/data.pkl") and i.filename.count("/") == 1 for i in infos):
            raise UserError(f"{path} is a zip archive but not a PyTorch checkpoint: it has no <folder>/data.pkl")
        for info in infos:
            _check_member(path, zf, raw, info)
        by_name = {i.filename: i for i in infos}
        prefix = infos[0].filename.split("/")[0]
        if len(by_name) != len(infos):
            twice = next(n for n in by_name if sum(i.filename == n for i in infos) > 1)
            raise _corrupt(path, f"member {twice} appears twice")
        stray = next((n for n in by_name if not n.startswith(f"{prefix}/")), None)
        if stray is not None:
            raise _corrupt(path, f"member {stray} lies outside the archive folder {prefix}/")
        if f"{prefix}/data.pkl" not in by_name:
            raise _corrupt(path, f"{prefix}/data.pkl is missing")
        if f"{prefix}/constants.pkl" in by_name or any(n.startswith(f"{prefix}/code/") for n in by_name):
            raise UserError(
                f"{path} is a TorchScript archive (torch.jit.save), not a checkpoint: "
                "pass the state_dict (.pth) it was made from"
            )
        if f"{prefix}/version" not in by_name and f"{prefix}/.data/version" not in by_name:
            raise _corrupt(path, f"{prefix}/version is missing")
        for key, (storage, numel) in (_declared_storages(zf, f"{prefix}/data.pkl") or {}).items():
            member = f"{prefix}/data/{key}"
            if member not in by_name:
                raise _corrupt(path, f"storage {member}, named in {prefix}/data.pkl, is missing")
            itemsize = _STORAGE_ITEMSIZE.get(storage)
            if itemsize and isinstance(numel, int) and by_name[member].file_size != numel * itemsize:
                raise _corrupt(
                    path,
                    f"storage {member} holds {by_name[member].file_size} bytes but "
                    f"{prefix}/data.pkl declares {numel * itemsize}",
                )
    return prefix


def _check_member(path: Path, zf: zipfile.ZipFile, raw, info: zipfile.ZipInfo) -> None:
    """Its data against the directory's CRC, then its local header and data descriptor: torch
    reads neither CRC, and a field that disagrees means the file was damaged."""
    name = info.filename
    try:
        with zf.open(info) as member:
            while member.read(_CHUNK):
                pass
    except zipfile.BadZipFile as exc:
        what = f"CRC mismatch in member {name}" if "CRC" in str(exc) else f"member {name} is damaged ({exc})"
        raise _corrupt(path, what) from None
    except EOFError:
        raise _corrupt(path, f"member {name} is truncated") from None
    except Exception as exc:  # noqa: BLE001 - encrypted flag, unknown compression, zlib.error, a bad seek
        raise _corrupt(path, f"member {name} cannot be read ({_detail(exc)})") from None
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) < 30 or header[:4] != _ZIP_MAGIC:
        raise _corrupt(path, f"the local header of member {name} is missing or damaged (truncated?)")
    _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = struct.unpack("<4sHHHHHIIIHH", header)
    if (flags ^ info.flag_bits) & 0x09 or method != info.compress_type:  # encrypted / data descriptor bits
        raise _corrupt(path, f"the local header of member {name} disagrees with the zip directory")
    sizes = (info.compress_size, _ZIP64_SIZE), (info.file_size, _ZIP64_SIZE)
    if flags & 0x08:  # CRC and sizes follow the data; the header has zeros (or the same values)
        ok = crc in (0, info.CRC) and csize in (0, *sizes[0]) and usize in (0, *sizes[1])
    else:
        ok = crc == info.CRC and csize in sizes[0] and usize in sizes[1]
    if not ok:
        raise _corrupt(path, f"the CRC or size in the local header of member {name} disagrees with the zip directory")
    if flags & 0x08:
        raw.seek(info.header_offset + 30 + name_len + extra_len + info.compress_size)
        tail = raw.read(24)
        forms = (tail[4:], tail) if tail[:4] == _DATA_DESCRIPTOR else (tail,)
        if not any(_descriptor_matches(form, info) for form in forms):
            raise _corrupt(path, f"the data descriptor of member {name} disagrees with the zip directory (CRC or size)")


def _descriptor_matches(form: bytes, info: zipfile.ZipInfo) -> bool:
    if len(form) < 12 or struct.unpack("<I", form[:4])[0] != info.CRC:
        return False
    sizes = (info.compress_size, info.file_size)
    return struct.unpack("<II", form[4:12]) == sizes or (len(form) >= 20 and struct.unpack("<QQ", form[4:20]) == sizes)


# Bytes per element of the storage types a checkpoint's data.pkl names (the legacy class names are
# frozen); UntypedStorage counts bytes.
_STORAGE_ITEMSIZE = {
    "UntypedStorage": 1, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1, "QUInt8Storage": 1,
    "QInt8Storage": 1, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1, "ShortStorage": 2, "HalfStorage": 2,
    "BFloat16Storage": 2, "IntStorage": 4, "FloatStorage": 4, "QInt32Storage": 4, "LongStorage": 8,
    "DoubleStorage": 8, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
}  # fmt: skip


class _Inert:
    """Stands in for every global while data.pkl is scanned: nothing is imported or called."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _StorageScan(pickle._Unpickler):  # the Python one: its memo is a dict, so no index can balloon it
    """Reads data.pkl for its storage references ("storage", type, key, location, numel) only."""

    def __init__(self, file):
        super().__init__(file, encoding="utf-8")
        self.storages: dict[str, tuple[str | None, object]] = {}

    def find_class(self, module, name):
        return type("_Global", (_Inert,), {"storage": name if module == "torch" else None})

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage") and isinstance(pid[2], str):
            self.storages[pid[2]] = (getattr(pid[1], "storage", None), pid[4])
        return _Inert()


_SCAN_LIMIT = 32 << 20  # bytes of data.pkl: ~100 KB for a U-Net, a few MB for a very large model


def _declared_storages(zf: zipfile.ZipFile, name: str) -> dict | None:
    """key -> (storage type, numel) as data.pkl declares them; None when the pickle cannot be
    scanned (then torch.load says what is wrong with it, and checks the sizes itself)."""
    if zf.getinfo(name).file_size > _SCAN_LIMIT:
        return None
    try:
        with zf.open(name) as fh:
            scan = _StorageScan(fh)
            scan.load()
    except Exception:  # noqa: BLE001 - a damaged pickle raises anything
        return None
    return scan.storages


# weights_only names the global it refuses: "GLOBAL x.y was not an allowed global by default" or
# "GLOBAL os.system whose module os is blocked". Anything else it raises is a damaged pickle.
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)")


def _load_failure(path: Path, kind: str | None, prefix: str | None, exc: Exception) -> UserError:
    message = str(exc)
    refused = _REFUSED_GLOBAL.search(message) if isinstance(exc, pickle.UnpicklingError) else None
    if refused and all(part.isidentifier() for part in refused.group(1).split(".")):
        return _refused(path, kind, prefix, refused.group(1))
    if "maximum supported version" in message:
        return UserError(f"{path} was written by a newer PyTorch than this one ({torch.__version__}): {_detail(exc)}")
    if kind is None:
        return _unreadable(path, exc)
    # A refused global that no Python object could have ("torch!_utils") is damage, not a threat.
    detail = f"it names a malformed global {refused.group(1)[:80]!r}" if refused else _detail(exc)
    if kind == "zip":
        return _corrupt(path, f"its pickled data ({prefix}/data.pkl) is damaged: {detail}")
    # The legacy format has no CRC: damage shows only where it breaks the pickle or a storage.
    return _corrupt(path, f"the legacy (non-zip) checkpoint is truncated or damaged: {detail}")


_RESAVE = "torch.save(model.state_dict(), 'weights.pth')"


def _refused(path: Path, kind: str | None, prefix: str | None, refused: str) -> UserError:
    """weights_only refused a global. A whole pickled model (torch.save(model)) is read without
    running it: re-saving its state_dict is advised only when those weights are an architecture
    that loads here; otherwise the user hears it is not supported, not sent round in a circle."""
    whole = read_pickled_model(path, kind, prefix)
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
                     f"run code, of an architecture unet-export does not support yet: its weights (keys {sample}, "
                     f"...) fit none of {', '.join(MODELS)} (see --model), so re-saving its state_dict would not "
                     "help either")  # fmt: skip


def _detail(exc: Exception) -> str:
    """The first sentence of what torch or pickle said, without weights_only's boilerplate."""
    text = str(exc).split("Check the documentation of torch.load")[0]
    if text.startswith("Weights only load failed"):
        text = [p for p in text.split("\n\n") if p.strip()][-1]
    detail = " ".join(text.split()).split(". ")[0][:160]
    if len(detail) < 24:  # e.g. KeyError: 101 from a text file; the type says more than the value
        detail = f"{type(exc).__name__}: {detail}".rstrip(": ")
    return detail


def _unreadable(path: Path, exc: Exception) -> UserError:
    return UserError(
        f"{path} is not a readable PyTorch checkpoint (truncated, or not made by torch.save): {_detail(exc)}"
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
