"""checkpoint.py's records and one-line messages, pinned exactly (the corruption cases that
produce them are in test_checkpoint_corrupt.py)."""

import pickle
from pathlib import Path

import pytest
import torch

from unet_export import checkpoint as ck
from unet_export import checkpoint_archive as archive
from unet_export.errors import UserError
from unet_export.fileio import sha256_file

P = Path("/data/w.pth")


def _record(**kw):
    return ck.Checkpoint(P, "ab" * 32, "milesial", {"n_classes": 2}, {}, **kw).record()


def test_record_without_a_sidecar_has_milesials_preprocessing():
    assert _record() == {"architecture": "milesial", "config": {"n_classes": 2}, "mask_values": None,
                         "preprocess": {"scale": 1.0, "square": None},
                         "checkpoint": {"path": str(P.resolve()), "sha256": "ab" * 32}}  # fmt: skip


def test_record_carries_the_sidecars_preprocessing_mask_values_and_validation_images():
    record = _record(mask_values=[0, 255], preprocess={"scale": 0.5, "square": 96}, validation="/data/val")
    assert record["mask_values"] == [0, 255] and record["preprocess"] == {"scale": 0.5, "square": 96}
    assert record["validation"] == "/data/val"
    assert "validation" not in _record()


@pytest.mark.parametrize("values, n, expected", [(None, 1, [0, 1]), (None, 2, [0, 1]), (None, 3, [0, 1, 2]),
                                                 (None, 5, [0, 1, 2, 3, 4]), ([0, 255], 2, [0, 255])])  # fmt: skip
def test_class_mask_values(values, n, expected):
    assert ck.class_mask_values(values, n) == expected


def test_a_refused_global_is_named_with_the_fix():
    exc = pickle.UnpicklingError("Weights only load failed. ... GLOBAL os.system whose module os is blocked.")
    assert str(ck._load_failure(P, "zip", "archive", exc)) == (
        f"refusing to load {P}: it pickles Python objects that could run code (os.system). Load it in the project "
        "that made it and re-save the weights with torch.save(model.state_dict(), 'weights.pth')")


def test_a_refused_global_only_counts_from_the_unpickler():
    exc = RuntimeError("GLOBAL os.system whose module os is blocked")  # not pickle's error: damage, not a threat
    assert str(ck._load_failure(P, "zip", "archive", exc)).startswith(f"{P} is corrupt: its pickled data")


def test_a_newer_pytorch_is_named():
    exc = RuntimeError("version 99 is greater than the maximum supported version 10 of this reader")
    assert str(ck._load_failure(P, "zip", "a", exc)) == (
        f"{P} was written by a newer PyTorch than this one ({torch.__version__}): version 99 is greater than the "
        "maximum supported version 10 of this reader")


def test_an_unknown_container_is_unreadable():
    exc = KeyError(101)
    assert str(ck._load_failure(P, None, None, exc)) == (
        f"{P} is not a readable PyTorch checkpoint (truncated, or not made by torch.save): KeyError: 101")


def test_damage_in_a_zip_or_a_legacy_file_says_corrupt():
    exc = EOFError("Ran out of input while reading the pickle stream of this checkpoint")
    assert str(ck._load_failure(P, "zip", "archive", exc)) == (
        f"{P} is corrupt: its pickled data (archive/data.pkl) is damaged: Ran out of input while reading the pickle "
        "stream of this checkpoint; re-download or re-save it")
    assert str(ck._load_failure(P, "legacy", None, exc)) == (
        f"{P} is corrupt: the legacy (non-zip) checkpoint is truncated or damaged: Ran out of input while reading "
        "the pickle stream of this checkpoint; re-download or re-save it")


def test_a_malformed_global_is_damage_and_is_cut_to_80_characters():
    name = "torch!_utils" + "x" * 100
    exc = pickle.UnpicklingError(f"GLOBAL {name} was not an allowed global by default")
    message = str(ck._load_failure(P, "zip", "archive", exc))
    assert message == f"{P} is corrupt: its pickled data (archive/data.pkl) is damaged: it names a malformed global " \
                      f"{name[:80]!r}; re-download or re-save it"


def test_detail_drops_torchs_boilerplate():
    exc = pickle.UnpicklingError(
        "Weights only load failed. This file can still be loaded, to do so you have two options.\n\n"
        "(1) In PyTorch 2.6, we changed the default.\n\n"
        "Unsupported operand 118 in the pickle stream of this file. More text follows here.\n\n"
        "Check the documentation of torch.load to learn more about types accepted by default.")
    assert archive.error_detail(exc) == "Unsupported operand 118 in the pickle stream of this file"


@pytest.mark.parametrize(
    "exc, detail",
    [
        (ValueError("x" * 23), "ValueError: " + "x" * 23),  # short: the type says more
        (ValueError("x" * 24), "x" * 24),
        (ValueError(""), "ValueError"),
        (ValueError("y" * 300), "y" * 160),
        (ValueError("first sentence here, long enough. second"), "first sentence here, long enough"),
        (ValueError("spread\n  over   lines and longer than 24"), "spread over lines and longer than 24"),
    ],
)
def test_detail(exc, detail):
    assert archive.error_detail(exc) == detail


def test_unreadable_names_the_file_and_the_detail():
    assert str(ck._unreadable(P, EOFError("Ran out of input entirely here"))) == (
        f"{P} is not a readable PyTorch checkpoint (truncated, or not made by torch.save): Ran out of input entirely "
        "here")


def test_corrupt_message():
    assert str(archive.corrupt(P, "member x is truncated")) == f"{P} is corrupt: member x is truncated; re-download or re-save it"
    assert isinstance(archive.corrupt(P, "x"), UserError)


# --- sidecar, model building, unwrap, the storage scan, zip data descriptors ---------------------

import io  # noqa: E402
import json  # noqa: E402
import struct  # noqa: E402
import zipfile  # noqa: E402

from unet_export.flows.demo import random_milesial  # noqa: E402


def test_validation_folder_is_relative_to_the_sidecar_through_a_symlink(tmp_path):
    real = tmp_path / "run"
    (real / "val").mkdir(parents=True)
    (real / "w.json").write_text(json.dumps({"validation": {"path": "val"}}))
    link_dir = tmp_path / "release"
    link_dir.mkdir()
    (link_dir / "w.json").symlink_to(real / "w.json")
    assert ck._validation_dir(link_dir / "w.pth", ck.read_sidecar(link_dir / "w.pth")) == str(real / "val")
    assert ck._validation_dir(link_dir / "w.pth", {"validation": "val"}) is None  # not {"path": ...}
    assert ck._validation_dir(link_dir / "w.pth", {"validation": {"path": "missing"}}) is None


def test_a_sidecar_that_is_not_an_object_is_ignored(tmp_path):
    (tmp_path / "w.json").write_text("[1, 2]")
    assert ck.read_sidecar(tmp_path / "w.pth") == {}
    (tmp_path / "w.json").write_text('{"model": "plain"}')
    assert ck.read_sidecar(tmp_path / "w.pth") == {"model": "plain"}


def _ckpt(state):
    return ck.Checkpoint(P, "0" * 64, "milesial", {"n_channels": 3, "n_classes": 2, "width": 8}, state)


def test_build_model_names_the_first_keys_that_do_not_fit():
    state = random_milesial(width=8).state_dict()
    model = ck.build_model(_ckpt(dict(state)))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()) and not model.training
    extra = dict(state) | {f"unexpected_{i}": torch.zeros(1) for i in range(40)}
    with pytest.raises(UserError) as err:
        ck.build_model(_ckpt(extra))
    assert str(err.value) == (f"{P} does not fit the milesial model: 40 unexpected keys (unexpected_0, unexpected_1, "
                              "unexpected_2 and 37 more)")
    short = {k: v for k, v in state.items() if k not in list(state)[:2]} | {"unexpected_0": torch.zeros(1)}
    with pytest.raises(UserError) as err:
        ck.build_model(_ckpt(short))
    first = ", ".join(list(state)[:2])
    assert str(err.value) == f"{P} does not fit the milesial model: 2 missing keys ({first}); 1 unexpected keys (unexpected_0)"


def test_build_model_names_the_first_weights_of_another_shape():
    state = random_milesial(width=8).state_dict()
    wide = dict(state) | {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in list(state.items())[:30] if v.ndim}
    with pytest.raises(UserError) as err:
        ck.build_model(_ckpt(wide))
    first = [f"{k}: {[v.shape[0] + 1, *v.shape[1:]]} here, {list(v.shape)} in the model"
             for k, v in list(state.items())[:30] if v.ndim][:3]  # fmt: skip
    count = sum(1 for v in list(state.values())[:30] if v.ndim)
    assert str(err.value) == (f"{P} does not fit the milesial model: {count} keys of another shape "
                              f"({', '.join(first)} and {count - 3} more)")


def test_unwrap_messages():
    with pytest.raises(UserError, match=r"w.pth holds a list, not a state_dict$"):
        ck._unwrap([1], P)
    with pytest.raises(UserError, match=r"w.pth: mask_values must be a list, got int$"):
        ck._unwrap({"a": torch.zeros(1), "mask_values": 5}, P)


def test_plain_mask_values_are_json_ready():
    assert ck._plain(None) is None
    assert ck._plain(torch.tensor([0, 255])) == [0, 255] and type(ck._plain(torch.tensor([0, 255]))[0]) is int
    assert ck._plain([torch.tensor([0, 0, 0]), (255, 0, 0), 7]) == [[0, 0, 0], [255, 0, 0], 7]
    assert type(ck._plain([(255, 0, 0)])[0]) is list


class _Typed:
    storage = "FloatStorage"


def test_storage_scan_records_only_storage_references():
    scan = archive._StorageScan(io.BytesIO(b""))
    scan.persistent_load(("storage", _Typed, "0", "cpu", 10))
    scan.persistent_load((b"storage", _Typed, "1", "cpu", 3))  # protocol 0-2 pickles give bytes
    scan.persistent_load(("storage", object(), "2", "cpu", 4))  # a type the scan did not make
    scan.persistent_load(("other", _Typed, "3", "cpu", 1))
    scan.persistent_load(("storage", _Typed, 4, "cpu", 1))  # key not a string
    scan.persistent_load(("storage", _Typed, "5"))  # too short
    scan.persistent_load("storage")
    assert scan.storages == {"0": ("FloatStorage", 10), "1": ("FloatStorage", 3), "2": (None, 4)}


def test_storage_scan_types_only_torch_globals():
    scan = archive._StorageScan(io.BytesIO(b""))
    assert scan.find_class("torch", "FloatStorage").storage == "FloatStorage"
    assert scan.find_class("mymodule", "FloatStorage").storage is None
    assert issubclass(scan.find_class("torch", "x"), archive._Inert)


def _info(crc=0x12345678, csize=3_000_000_000, usize=3_500_000_000):
    info = zipfile.ZipInfo("a/data/0")
    info.CRC, info.compress_size, info.file_size = crc, csize, usize
    return info


def test_data_descriptor_forms():
    info = _info()
    short = struct.pack("<III", info.CRC, info.compress_size, info.file_size)  # 12 bytes, sizes above 2 GiB
    assert archive._descriptor_matches(short, info)
    assert not archive._descriptor_matches(short[:11], info)
    assert not archive._descriptor_matches(struct.pack("<III", info.CRC + 1, info.compress_size, info.file_size), info)
    assert not archive._descriptor_matches(struct.pack("<III", info.CRC, info.compress_size, 5), info)
    zip64 = struct.pack("<IQQ", info.CRC, info.compress_size, info.file_size)  # exactly 20 bytes
    assert archive._descriptor_matches(zip64, info)
    assert archive._descriptor_matches(zip64 + b"PK\x03\x04", info)  # the next header follows: 24 bytes read
    assert not archive._descriptor_matches(struct.pack("<IQQ", info.CRC, info.compress_size, 1), info)
    assert not archive._descriptor_matches(struct.pack("<IQ", info.CRC, info.compress_size) + b"\0" * 4, _info(csize=9))


def test_detail_keeps_a_short_message_whole():
    assert archive.error_detail(ValueError("ends in X")) == "ValueError: ends in X"


# --- the zip container, byte by byte (load_checkpoint's corruption tests are in test_checkpoint_corrupt)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.arange(6.0)}, path)
    return path


def _plain_zip(src: Path, dst: Path, first=None) -> Path:
    """The same members written by zipfile (no data descriptors), optionally after ``first``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        if first:
            zout.writestr(first, b"x")
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    return dst


def _local_offset(path: Path, member_index: int = 0) -> int:
    with zipfile.ZipFile(path) as zf:
        return zf.infolist()[member_index].header_offset


def _patch(path: Path, at: int, fmt: str, value) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at, value)
    path.write_bytes(bytes(data))


def test_both_zip_layouts_pass_the_container_check(saved, tmp_path):
    assert archive.check_zip(saved) == "w"  # torch's: data descriptors after each member
    assert archive.check_zip(_plain_zip(saved, tmp_path / "plain.pth")) == "w"  # sizes in the local headers


def test_a_zip_cut_before_its_directory(saved):
    saved.write_bytes(saved.read_bytes()[:100])
    with pytest.raises(UserError) as err:
        archive.check_zip(saved)
    assert str(err.value) == (f"{saved} is corrupt: the zip archive is truncated or its directory is damaged "
                              "(no end-of-archive record); re-download or re-save it")  # fmt: skip


def test_a_member_outside_the_archive_folder(saved, tmp_path):
    stray = _plain_zip(saved, tmp_path / "stray.pth", first="other/readme.txt")
    with pytest.raises(UserError) as err:
        archive.check_zip(stray)
    assert str(err.value) == f"{stray} is corrupt: member w/data.pkl lies outside the archive folder other/; " \
                             "re-download or re-save it"


def test_a_member_written_twice(saved, tmp_path):
    twice = tmp_path / "twice.pth"
    with zipfile.ZipFile(saved) as zin, zipfile.ZipFile(twice, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
        with pytest.warns(UserWarning):
            zout.writestr("w/version", b"3\n")
    with pytest.raises(UserError) as err:
        archive.check_zip(twice)
    assert str(err.value) == f"{twice} is corrupt: member w/version appears twice; re-download or re-save it"


def test_a_damaged_local_header_magic(saved):
    _patch(saved, _local_offset(saved, 1), "<4s", b"PK\x09\x09")
    with pytest.raises(UserError) as err:
        archive.check_zip(saved)
    assert str(err.value) == (f"{saved} is corrupt: member w/.format_version is damaged (Bad magic number for file "
                              "header); re-download or re-save it")  # fmt: skip


@pytest.mark.parametrize("field, fmt, flip", [("flags", "<H", 0x01), ("flags", "<H", 0x08), ("method", "<H", 8)])
def test_a_local_header_that_disagrees_with_the_directory(saved, tmp_path, field, fmt, flip):
    plain = _plain_zip(saved, tmp_path / "plain.pth")
    at = _local_offset(plain, 0) + (6 if field == "flags" else 8)
    (value,) = struct.unpack_from(fmt, plain.read_bytes(), at)
    _patch(plain, at, fmt, value ^ flip)
    with pytest.raises(UserError) as err:
        archive.check_zip(plain)
    assert str(err.value) == (f"{plain} is corrupt: the local header of member w/data.pkl disagrees with the zip "
                              "directory; re-download or re-save it")  # fmt: skip


@pytest.mark.parametrize("offset, zero", [(14, False), (18, False), (22, False), (14, True)])  # CRC, sizes
def test_a_local_crc_or_size_that_disagrees(saved, tmp_path, offset, zero):
    # zero: a CRC of 0 is allowed only where a data descriptor follows; this zip has none
    plain = _plain_zip(saved, tmp_path / "plain.pth")
    at = _local_offset(plain, 0) + offset
    (value,) = struct.unpack_from("<I", plain.read_bytes(), at)
    _patch(plain, at, "<I", 0 if zero else value ^ 0x1)
    with pytest.raises(UserError) as err:
        archive.check_zip(plain)
    assert str(err.value) == (f"{plain} is corrupt: the CRC or size in the local header of member w/data.pkl "
                              "disagrees with the zip directory; re-download or re-save it")  # fmt: skip


def test_a_deflated_zip_passes_the_container_check(saved, tmp_path):
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(saved) as zin, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info) + b"\0" * 64 if info.filename.endswith("/data/0") else
                          zin.read(info))  # fmt: skip
    with zipfile.ZipFile(deflated) as zf:  # compressed and stored sizes now differ
        assert any(i.compress_size != i.file_size for i in zf.infolist())
    with pytest.raises(UserError, match="storage w/data/0 holds 88 bytes but w/data.pkl declares 24"):
        archive.check_zip(deflated)  # the headers pass; the storage size check is what fails


def test_a_data_descriptor_whose_signature_is_damaged(saved):
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as zf:
        info = zf.getinfo("w/data.pkl")
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        at = info.header_offset + 30 + name_len + extra_len + info.compress_size
    assert data[at : at + 4] == b"PK\x07\x08" and info.flag_bits & 0x08
    data[at : at + 4] = b"JUNK"  # the CRC and sizes after it are intact
    saved.write_bytes(bytes(data))
    with pytest.raises(UserError) as err:
        archive.check_zip(saved)
    assert str(err.value) == (f"{saved} is corrupt: the data descriptor of member w/data.pkl disagrees with the zip "
                              "directory (CRC or size); re-download or re-save it")  # fmt: skip


def test_container_kinds(saved, tmp_path):
    assert archive.container(saved, saved.read_bytes()[:64]) == "zip"
    assert archive.container(saved, b"PK") == "zip"  # a zip cut inside its first header
    legacy = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
    assert archive.container(saved, legacy[:3]) == "legacy"  # the shortest head that tells
    assert archive.container(tmp_path / "none", legacy[:2]) is None
    damaged = bytearray(saved.read_bytes())
    damaged[:4] = b"XXXX"  # the first bytes are gone, the directory at the end is intact
    (tmp_path / "d.pth").write_bytes(bytes(damaged))
    assert archive.container(tmp_path / "d.pth", bytes(damaged[:64])) == "zip"
    (tmp_path / "t.txt").write_text("hello there, not a checkpoint")
    assert archive.container(tmp_path / "t.txt", b"hello there") is None


def test_the_storage_scan_reads_data_pkl_up_to_its_limit(saved, monkeypatch):
    with zipfile.ZipFile(saved) as zf:
        size = zf.getinfo("w/data.pkl").file_size
        monkeypatch.setattr(archive, "_SCAN_LIMIT", size)
        assert archive._declared_storages(zf, "w/data.pkl") == {"0": ("FloatStorage", 6)}
        monkeypatch.setattr(archive, "_SCAN_LIMIT", size - 1)
        assert archive._declared_storages(zf, "w/data.pkl") is None


# --- load_checkpoint: which architecture, and what it says when none fits -------------------------

from unet_export.models import MODELS  # noqa: E402
from tests.conftest import milesial_state_dict  # noqa: E402


def test_a_checkpoint_of_no_known_architecture_names_its_first_keys(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({f"k{i}": torch.zeros(1) for i in range(5)}, path)
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(path)
    # smp (its folder, --arch/--encoder), a factory's model and an in-memory module are named, never
    # guessed from keys: not in the list
    by_keys = [name for name in MODELS if name not in ("smp", "factory", "module")]
    assert str(err.value) == (f"{path} is not a checkpoint of a known architecture ({', '.join(by_keys)}): its keys "
                              "begin k0, k1, k2")  # fmt: skip
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(path, "plain")
    assert str(err.value) == f"{path} is not a checkpoint of a 'plain' model: its keys begin k0, k1, k2"


def test_the_sidecars_architecture_is_named_when_the_keys_do_not_fit_it(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(milesial_state_dict("v3"), path)
    (tmp_path / "w.json").write_text(json.dumps({"model": "plain"}))
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(path)
    assert str(err.value).startswith(f"{path} is not a checkpoint of a 'plain' model (as its sidecar w.json says): "
                                     "its keys begin inc.double_conv.0.weight")  # fmt: skip
    assert ck.load_checkpoint(path, "milesial").architecture == "milesial"  # --model wins over the sidecar
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(path, "reflect")
    assert str(err.value) == (f"{path} is not a checkpoint of a 'reflect' model: its keys begin "
                              "inc.double_conv.0.weight, inc.double_conv.1.weight, inc.double_conv.1.bias")


def test_sidecar_fields_of_the_wrong_type_are_ignored(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(milesial_state_dict("v3"), path)
    (tmp_path / "w.json").write_text(json.dumps({"model": 5, "preprocess": "half"}))
    ckpt = ck.load_checkpoint(path)
    assert ckpt.architecture == "milesial" and ckpt.preprocess is None


def test_a_file_that_holds_no_state_dict_is_named(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(path)
    assert str(err.value) == f"{path} holds a list, not a state_dict"


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path):
    # torch.save on a GPU records the storage location "cuda:0"; written here by editing data.pkl
    cpu = tmp_path / "cpu.pth"
    torch.save({"w": torch.arange(4.0)}, cpu)
    gpu = tmp_path / "gpu.pth"
    with zipfile.ZipFile(cpu) as zin, zipfile.ZipFile(gpu, "w") as zout:
        for info in zin.infolist():
            body = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in body
                body = body.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(info.filename, body)
    with pytest.raises(RuntimeError):  # what torch.load does without a map_location, on a CPU machine
        torch.load(gpu, weights_only=True)
    assert torch.equal(ck._torch_load(gpu)["w"], torch.arange(4.0))


def test_weights_only_is_asked_for_not_left_to_the_default(tmp_path, monkeypatch):
    class Exploit:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": Exploit()}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # flips torch.load's default, not an explicit True
    with pytest.raises(UserError, match="could run code"):
        ck._torch_load(path)


def test_a_file_that_cannot_be_opened(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"x")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(UserError) as err:
        ck._torch_load(path)
    assert str(err.value) == f"cannot read {path}: Permission denied"


def test_damaged_pickle_names_the_archive_folder(saved, tmp_path):
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(saved) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            body = zin.read(info)
            zout.writestr(info.filename, body[:-3] if info.filename.endswith("/data.pkl") else body)
    with pytest.raises(UserError) as err:
        ck._torch_load(bad)
    assert str(err.value).startswith(f"{bad} is corrupt: its pickled data (w/data.pkl) is damaged: ")


def _deflated(saved: Path, dst: Path) -> Path:
    with zipfile.ZipFile(saved) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    return dst


def test_a_deflated_member_that_does_not_inflate(saved, tmp_path):
    path = _deflated(saved, tmp_path / "d.pth")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("w/data.pkl")
    start = info.header_offset + 30 + len(info.filename)
    data[start : start + 4] = b"\xff\xff\xff\xff"  # an invalid deflate block header
    path.write_bytes(bytes(data))
    with pytest.raises(UserError) as err:
        archive.check_zip(path)
    with zipfile.ZipFile(path) as zf, pytest.raises(Exception) as raw:
        zf.read("w/data.pkl")  # what zipfile says about it
    assert str(err.value) == (f"{path} is corrupt: member w/data.pkl cannot be read ({archive.error_detail(raw.value)}); "
                              "re-download or re-save it")  # fmt: skip
    assert "CRC" not in str(err.value) and "NoneType" not in str(err.value)


def _with_members(saved: Path, dst: Path, drop=(), add=()) -> Path:
    with zipfile.ZipFile(saved) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename not in drop:
                zout.writestr(info.filename, zin.read(info))
        for name in add:
            zout.writestr(name, b"")
    return dst


def test_a_torchscript_archive_is_named(saved, tmp_path):
    code_only = _with_members(saved, tmp_path / "ts.pth", add=["w/code/__torch__.py"])
    with pytest.raises(UserError) as err:
        archive.check_zip(code_only)
    assert str(err.value) == (f"{code_only} is a TorchScript archive (torch.jit.save), not a checkpoint: pass the "
                              "state_dict (.pth) it was made from")  # fmt: skip


def test_an_archive_without_its_version_record(saved, tmp_path):
    path = _with_members(saved, tmp_path / "nov.pth", drop=["w/version", "w/.data/version"])
    with pytest.raises(UserError) as err:
        archive.check_zip(path)
    assert str(err.value) == f"{path} is corrupt: w/version is missing; re-download or re-save it"


def test_a_zip_whose_central_directory_is_damaged(saved):
    data = bytearray(saved.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central : central + 4] = b"PK\x09\x09"
    saved.write_bytes(bytes(data))
    with pytest.raises(zipfile.BadZipFile) as raw:
        zipfile.ZipFile(saved)
    with pytest.raises(UserError) as err:
        archive.check_zip(saved)
    assert str(err.value) == (f"{saved} is corrupt: the zip archive is truncated or its directory is damaged "
                              f"({archive.error_detail(raw.value)}); re-download or re-save it")  # fmt: skip
    assert "no end-of-archive record" not in str(err.value)


def test_a_member_that_runs_past_the_end_of_the_file_is_truncated(saved, tmp_path):
    plain = _plain_zip(saved, tmp_path / "plain.pth")
    data = bytearray(plain.read_bytes())
    with zipfile.ZipFile(plain) as zf:
        info = zf.getinfo("w/data.pkl")
    central = next(i for i in range(len(data)) if data[i : i + 4] == b"PK\x01\x02"
                   and data[i + 46 : i + 46 + len(info.filename)] == info.filename.encode())  # fmt: skip
    for header, csize_at, usize_at in ((info.header_offset, 18, 22), (central, 20, 24)):
        struct.pack_into("<I", data, header + csize_at, 10**8)  # both headers agree on a size the file lacks
        struct.pack_into("<I", data, header + usize_at, 10**8)
    plain.write_bytes(bytes(data))
    with pytest.raises(UserError) as err:
        archive.check_zip(plain)
    assert str(err.value) == f"{plain} is corrupt: member w/data.pkl is truncated; re-download or re-save it"


def test_a_pickled_whole_model_is_told_whether_its_state_dict_would_load(tmp_path):
    """Read from the pickle without running it: a supported architecture (here inside nn.DataParallel)
    is told to re-save its state_dict; any other is told that would not help (issue 25, rough edge 9)."""
    from unet_export.models import create_model

    path = tmp_path / "whole.pth"
    torch.save(torch.nn.DataParallel(create_model("valid-same", n_channels=3, n_classes=2, width=4)), path)
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(path)
    assert str(err.value) == (
        f"refusing to load {path}: it pickles a whole model (unet_export.models.valid.ValidUNet), Python objects that "
        "could run code. Its weights are a valid model (or valid-pad, valid-same: the keys cannot tell, --model can), "
        "which unet-export supports: load it in the project that made it and re-save only the weights with "
        "torch.save(model.state_dict(), 'weights.pth'), then pass weights.pth")
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1)), path)
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(path)
    assert str(err.value) == (
        f"refusing to load {path}: it pickles a whole model (torch.nn.modules.container.Sequential), Python objects "
        "that could run code, of an architecture no --model names (keys 0.weight, 0.bias, ...): re-save its weights "
        "with torch.save(model.state_dict(), 'weights.pth') in the project that made it and pass --model-factory "
        "path/to/file.py:CALLABLE, the function that builds the model")


class _Declared:
    """Pickles as torch.save pickles a tensor, rebuilt from a 4-byte storage with the shape given
    here: what a damaged or hostile file can declare."""

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape

    def __reduce__(self):
        args = (torch.zeros(1).untyped_storage(), 0, self.shape, (self.shape[1], 1), False, {})
        return torch._utils._rebuild_tensor_v2, args


def test_whole_models_are_judged_by_their_weights_read_without_allocating_them(tmp_path):
    """The keys of a whole pickled model decide the advice: a network held as `.module` beside a
    parameter-free loss is a milesial model (no other family shares its keys, so no "or ..."); a
    model of no known family is named by its first three keys, or "none" when it has no weights.
    The shapes become meta tensors: a 2**52-element weight the file declares is never allocated."""
    from unet_export.models import create_model

    path = tmp_path / "whole.pth"
    net = create_model("milesial", n_channels=3, n_classes=2, width=4)
    torch.save(torch.nn.ModuleDict({"module": net, "loss": torch.nn.CrossEntropyLoss()}), path)
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(path)
    assert str(err.value) == (
        f"refusing to load {path}: it pickles a whole model (torch.nn.modules.container.ModuleDict), Python objects "
        "that could run code. Its weights are a milesial model, which unet-export supports: load it in the project "
        "that made it and re-save only the weights with torch.save(model.state_dict(), 'weights.pth'), then pass "
        "weights.pth")
    huge = torch.nn.Linear(1, 1)
    huge._parameters["weight"] = _Declared((2**26, 2**26))  # 16 PiB of float32 if it were ever allocated
    for model, keys in ((torch.nn.Sequential(huge, torch.nn.Conv2d(3, 2, 1)), "0.weight, 0.bias, 1.weight"),
                        (torch.nn.ReLU(), "none")):  # fmt: skip
        torch.save(model, path)
        with pytest.raises(UserError) as err:
            ck.load_checkpoint(path)
        assert str(err.value) == (
            f"refusing to load {path}: it pickles a whole model ({type(model).__module__}.{type(model).__name__}), "
            f"Python objects that could run code, of an architecture no --model names (keys {keys}, ...): re-save its "
            "weights with torch.save(model.state_dict(), 'weights.pth') in the project that made it and pass "
            "--model-factory path/to/file.py:CALLABLE, the function that builds the model")


def _onnx_bytes() -> bytes:
    import onnx

    return onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])).SerializeToString()


_IR = b'<?xml version="1.0"?>\n<net name="unet" version="11">\n</net>\n'


@pytest.mark.parametrize("name, content, what", [
    ("m.onnx", b"anything", "an ONNX model"), ("M.ONNX", b"anything", "an ONNX model"),
    ("m.ts", b"PK\x03\x04", "a TorchScript model"), ("m.pt2", b"PK\x03\x04", "an AOTInductor package"),
    ("m.xml", b"anything", "an OpenVINO model"), ("m.engine", b"ftrt", "a TensorRT engine"),
    ("renamed.pth", "onnx", "an ONNX model"), ("renamed.pth", _IR, "an OpenVINO model"),
    ("renamed.pth", b"\n \t" + _IR[_IR.index(b"<net"):], "an OpenVINO model"),
])  # fmt: skip
def test_an_exported_model_passed_as_a_checkpoint_is_named(tmp_path, name, content, what):
    """By its suffix whatever its bytes, or by its first bytes when renamed: ONNX's protobuf begins
    0x08, OpenVINO's IR <?xml or <net (after any whitespace)."""
    path = tmp_path / name
    path.write_bytes(_onnx_bytes() if content == "onnx" else content)
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(path)
    assert str(err.value) == (f"{path} is {what}, not a checkpoint: pass it to predict or unet-bench, or export from "
                              "the checkpoint it came from")  # fmt: skip


@pytest.mark.parametrize("first", [b"\x08", b"<net", b"<?xml"])
def test_a_checkpoint_zip_whose_first_bytes_look_exported_is_corrupt(saved, first):
    """The zip's directory still says checkpoint: damage that happens to begin like ONNX or an
    OpenVINO IR is reported as damage, not as an exported model."""
    _patch(saved, 0, f"<{len(first)}s", first)
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(saved)
    assert str(err.value) == (f"{saved} is corrupt: member w/data.pkl is damaged (Bad magic number for file header); "
                              "re-download or re-save it")  # fmt: skip


# --- safetensors (issue 27, item 3: the format segmentation_models_pytorch and Hugging Face save) ---


def _save_safetensors(path: Path, state: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("name", ["w.safetensors", "w.SAFETENSORS", "renamed.pth"])
def test_a_safetensors_checkpoint_loads_as_its_pth_does(tmp_path, name):
    """By suffix, or by content for a renamed file: the same tensors, the same architecture, and
    milesial's mask_values carried as JSON in the header's metadata."""
    state = milesial_state_dict("v4")
    mask_values = state.pop("mask_values")
    path = _save_safetensors(tmp_path / name, state, {"mask_values": json.dumps(mask_values)})
    loaded = ck.load_checkpoint(path)
    assert (loaded.architecture, loaded.config["n_classes"], loaded.mask_values) == ("milesial", 3, [0, 127, 255])
    assert loaded.state_dict.keys() == state.keys()
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in state.items())
    assert loaded.sha256 == sha256_file(path)
    ck.build_model(loaded)  # strict load_state_dict: every key fits


def test_a_renamed_safetensors_file_is_never_taken_for_onnx(tmp_path):
    """safetensors pads its header to 8 bytes: a header length ending in 0x08 begins the file with
    the byte an ONNX model begins with, and must still be read as safetensors."""
    state = milesial_state_dict("v3")
    for pad in range(0, 512, 8):
        path = _save_safetensors(tmp_path / "w.pth", state, {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x08:
            break
    assert path.read_bytes()[0] == 0x08
    assert ck.load_checkpoint(path).architecture == "milesial"


def test_a_safetensors_file_of_no_tensors_is_sniffed_and_said_to_hold_none(tmp_path):
    """The header may fill the file (length == size - 8): still safetensors, with no weights."""
    path = _save_safetensors(tmp_path / "empty.pth", {})
    assert int.from_bytes(path.read_bytes()[:8], "little") == path.stat().st_size - 8
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(path)
    assert str(err.value) == f"{path} holds no tensors: it is not a model checkpoint"


def test_bytes_that_only_look_like_a_safetensors_header_are_not_one(tmp_path):
    """A '{' at byte 8 with a header length past the end of the file is no safetensors file."""
    path = tmp_path / "w.pth"
    path.write_bytes((1000).to_bytes(8, "little") + b"{}" + b" " * 6)
    assert not archive.is_safetensors(path, path.read_bytes()[:64])
    path.write_bytes((8).to_bytes(8, "little") + b"{}" + b" " * 6)
    assert archive.is_safetensors(path, path.read_bytes()[:64])
    assert not archive.is_safetensors(path, path.read_bytes()[:8])


def test_a_damaged_safetensors_file_is_corrupt(tmp_path):
    state = milesial_state_dict("v3")
    whole = _save_safetensors(tmp_path / "whole.safetensors", state).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(cut)
    assert str(err.value) == (
        f"{cut} is corrupt: it is not a readable safetensors file: Error while deserializing header: incomplete "
        "metadata, file not fully covered; re-download or re-save it"
    )
    bad = _save_safetensors(tmp_path / "bad.safetensors", state, {"mask_values": "[0, 127"})
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(bad)
    assert str(err.value) == (f"{bad} is corrupt: its metadata mask_values is not JSON: Expecting ',' delimiter; "
                              "re-download or re-save it")  # fmt: skip


def test_safetensors_is_told_at_the_edges_of_its_header(tmp_path):
    """The suffix alone decides (a stub named .safetensors is a damaged one); otherwise the 9th byte
    must open the JSON header and the declared length fit the file."""

    def sniff(data: bytes, name: str = "w.pth") -> bool:
        target = tmp_path / name
        target.write_bytes(data)
        return archive.is_safetensors(target, data[:64])

    assert sniff((0).to_bytes(8, "little") + b"{")  # 9 bytes: an empty header still fits
    assert not sniff((0).to_bytes(8, "little") + b"[" + b" " * 7)  # no JSON object
    assert not sniff((1).to_bytes(8, "little"))  # too short to say
    assert sniff((8).to_bytes(8, "little") + b"{}" + b" " * 6)  # length == size - 8
    assert not sniff((9).to_bytes(8, "little") + b"{}" + b" " * 6)  # one byte past the end
    assert not sniff((2**63 + 8).to_bytes(8, "little") + b"{}" + b" " * 6)  # unsigned, not negative
    assert sniff(b"PK\x03\x04", "x.SAFETENSORS")
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(b"PK\x03\x04")
    with pytest.raises(UserError, match=r"stub\.safetensors is corrupt: it is not a readable safetensors file: "):
        ck.load_checkpoint(stub)


def test_without_the_safetensors_package_the_install_line_is_named(tmp_path, monkeypatch):
    import sys

    path = _save_safetensors(tmp_path / "w.safetensors", milesial_state_dict("v3"))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import raises ImportError
    with pytest.raises(UserError) as err:
        ck.load_checkpoint(path)
    assert str(err.value).startswith("safetensors.torch is not installed (")
    assert str(err.value).endswith("); install it with: pip install safetensors")
