"""What a checkpoint file is, found before torch.load reads it: torch.save's zip or legacy
container, a safetensors file, an exported model passed by mistake, and a zip whose bytes are
damaged (every CRC, header and data descriptor checked, and the storages data.pkl declares against
the files there: torch checks none of this, and damaged bytes fail in it obscurely or not at all)."""

import pickle
import struct
import zipfile
from pathlib import Path

import torch

from unet_export.errors import UserError


# torch.save's zip format (the default since torch 1.6) and its legacy format, which begins with
# this pickled magic number (protocol 2 unless the caller chose another).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGICS = tuple(
    pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p) for p in range(2, pickle.HIGHEST_PROTOCOL + 1)
)


# What this tool (and others) write; a checkpoint is .pth/.pt, so the suffix alone tells them apart.
_EXPORTED_SUFFIXES = {".onnx": "an ONNX model", ".ts": "a TorchScript model", ".pt2": "an AOTInductor package",
                      ".xml": "an OpenVINO model", ".engine": "a TensorRT engine"}  # fmt: skip


def is_safetensors(path: Path, head: bytes) -> bool:
    """The safetensors format (Hugging Face's; segmentation_models_pytorch's save_pretrained): an
    8-byte little-endian header length, then the JSON header. Told by suffix, or by content for a
    renamed file; asked before the ONNX sniff, which a header length ending in 0x08 would fool."""
    if path.suffix.lower() == ".safetensors":
        return True
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return struct.unpack("<Q", head[:8])[0] <= path.stat().st_size - 8


def exported_model(path: Path, head: bytes, kind: str | None) -> str | None:
    """What an exported model passed as a checkpoint is, before unpickling it fails obscurely
    ("Unsupported operand 8"): by suffix, or by content for a renamed ONNX or OpenVINO file."""
    if path.suffix.lower() in _EXPORTED_SUFFIXES:
        return _EXPORTED_SUFFIXES[path.suffix.lower()]
    if kind is None and head[:1] == b"\x08":  # protobuf field 1 (ir_version): a pickle begins 0x80
        return "an ONNX model"
    if kind is None and head.lstrip().startswith((b"<?xml", b"<net")):
        return "an OpenVINO model"
    return None


def container(path: Path, head: bytes) -> str | None:
    """The format: "zip", "legacy", or None when it is neither (a text file, an image, ...)."""
    if _ZIP_MAGIC.startswith(head[:4]):  # also a zip cut to less than its first header
        return "zip"
    if len(head) >= 3 and any(magic.startswith(head[: len(magic)]) for magic in _LEGACY_MAGICS):
        return "legacy"
    try:
        return "zip" if zipfile.is_zipfile(path) else None  # a zip whose first bytes are damaged
    except OSError:
        return None


def corrupt(path: Path, what: str) -> UserError:
    return UserError(f"{path} is corrupt: {what}; re-download or re-save it")


_CHUNK = 1 << 20  # CRCs are checked reading this much at a time: memory stays flat for any size
_DATA_DESCRIPTOR = b"PK\x07\x08"
_ZIP64_SIZE = 0xFFFFFFFF  # a local header's size field when the real size is in the zip64 extra


def check_zip(path: Path) -> str:
    """Check the container before torch reads it (torch checks no CRC): every member's CRC, its
    local header and data descriptor against the central directory, the layout torch.save writes
    (one <archive>/data.pkl and a version record), and each storage data.pkl names present with
    the byte size it declares. Returns the archive folder's name."""
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:  # noqa: BLE001 - BadZipFile, OSError on a bad offset, struct.error, ...
        detail = "no end-of-archive record" if str(exc) == "File is not a zip file" else error_detail(exc)
        raise corrupt(path, f"the zip archive is truncated or its directory is damaged ({detail})") from None
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
            raise corrupt(path, f"member {twice} appears twice")
        stray = next((n for n in by_name if not n.startswith(f"{prefix}/")), None)
        if stray is not None:
            raise corrupt(path, f"member {stray} lies outside the archive folder {prefix}/")
        if f"{prefix}/data.pkl" not in by_name:
            raise corrupt(path, f"{prefix}/data.pkl is missing")
        if f"{prefix}/constants.pkl" in by_name or any(n.startswith(f"{prefix}/code/") for n in by_name):
            raise UserError(
                f"{path} is a TorchScript archive (torch.jit.save), not a checkpoint: "
                "pass the state_dict (.pth) it was made from"
            )
        if f"{prefix}/version" not in by_name and f"{prefix}/.data/version" not in by_name:
            raise corrupt(path, f"{prefix}/version is missing")
        for key, (storage, numel) in (_declared_storages(zf, f"{prefix}/data.pkl") or {}).items():
            member = f"{prefix}/data/{key}"
            if member not in by_name:
                raise corrupt(path, f"storage {member}, named in {prefix}/data.pkl, is missing")
            itemsize = _STORAGE_ITEMSIZE.get(storage)
            if itemsize and isinstance(numel, int) and by_name[member].file_size != numel * itemsize:
                raise corrupt(
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
        raise corrupt(path, what) from None
    except EOFError:
        raise corrupt(path, f"member {name} is truncated") from None
    except Exception as exc:  # noqa: BLE001 - encrypted flag, unknown compression, zlib.error, a bad seek
        raise corrupt(path, f"member {name} cannot be read ({error_detail(exc)})") from None
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) < 30 or header[:4] != _ZIP_MAGIC:
        raise corrupt(path, f"the local header of member {name} is missing or damaged (truncated?)")
    _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = struct.unpack("<4sHHHHHIIIHH", header)
    if (flags ^ info.flag_bits) & 0x09 or method != info.compress_type:  # encrypted / data descriptor bits
        raise corrupt(path, f"the local header of member {name} disagrees with the zip directory")
    sizes = (info.compress_size, _ZIP64_SIZE), (info.file_size, _ZIP64_SIZE)
    if flags & 0x08:  # CRC and sizes follow the data; the header has zeros (or the same values)
        ok = crc in (0, info.CRC) and csize in (0, *sizes[0]) and usize in (0, *sizes[1])
    else:
        ok = crc == info.CRC and csize in sizes[0] and usize in sizes[1]
    if not ok:
        raise corrupt(path, f"the CRC or size in the local header of member {name} disagrees with the zip directory")
    if flags & 0x08:
        raw.seek(info.header_offset + 30 + name_len + extra_len + info.compress_size)
        tail = raw.read(24)
        forms = (tail[4:], tail) if tail[:4] == _DATA_DESCRIPTOR else (tail,)
        if not any(_descriptor_matches(form, info) for form in forms):
            raise corrupt(path, f"the data descriptor of member {name} disagrees with the zip directory (CRC or size)")


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


def error_detail(exc: Exception) -> str:
    """The first sentence of what torch or pickle said, without weights_only's boilerplate."""
    text = str(exc).split("Check the documentation of torch.load")[0]
    if text.startswith("Weights only load failed"):
        text = [p for p in text.split("\n\n") if p.strip()][-1]
    detail = " ".join(text.split()).split(". ")[0][:160]
    if len(detail) < 24:  # e.g. KeyError: 101 from a text file; the type says more than the value
        detail = f"{type(exc).__name__}: {detail}".rstrip(": ")
    return detail
