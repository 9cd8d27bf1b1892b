"""checkpoint.py's records and one-line messages, pinned exactly (the corruption cases that
produce them are in test_checkpoint_corrupt.py)."""

import pickle
from pathlib import Path

import pytest
import torch

from unet_export import checkpoint as ck
from unet_export.errors import UserError

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
    assert ck._detail(exc) == "Unsupported operand 118 in the pickle stream of this file"


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
    assert ck._detail(exc) == detail


def test_unreadable_names_the_file_and_the_detail():
    assert str(ck._unreadable(P, EOFError("Ran out of input entirely here"))) == (
        f"{P} is not a readable PyTorch checkpoint (truncated, or not made by torch.save): Ran out of input entirely "
        "here")


def test_corrupt_message():
    assert str(ck._corrupt(P, "member x is truncated")) == f"{P} is corrupt: member x is truncated; re-download or re-save it"
    assert isinstance(ck._corrupt(P, "x"), UserError)


# --- sidecar, model building, unwrap, the storage scan, zip data descriptors ---------------------

import io  # noqa: E402
import json  # noqa: E402
import struct  # noqa: E402
import zipfile  # noqa: E402

from unet_export.demo import random_milesial  # noqa: E402


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


def test_build_model_refuses_extra_keys_and_cuts_the_detail_at_300():
    state = random_milesial(width=8).state_dict()
    model = ck.build_model(_ckpt(dict(state)))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()) and not model.training
    extra = dict(state) | {f"unexpected_{i}": torch.zeros(1) for i in range(40)}
    with pytest.raises(UserError) as err:
        ck.build_model(_ckpt(extra))
    try:
        random_milesial(width=8).load_state_dict(extra, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
    assert len(detail) > 300
    assert str(err.value) == f"{P} does not fit the milesial model {_ckpt({}).config}: {detail[:300]}"


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
    scan = ck._StorageScan(io.BytesIO(b""))
    scan.persistent_load(("storage", _Typed, "0", "cpu", 10))
    scan.persistent_load((b"storage", _Typed, "1", "cpu", 3))  # protocol 0-2 pickles give bytes
    scan.persistent_load(("storage", object(), "2", "cpu", 4))  # a type the scan did not make
    scan.persistent_load(("other", _Typed, "3", "cpu", 1))
    scan.persistent_load(("storage", _Typed, 4, "cpu", 1))  # key not a string
    scan.persistent_load(("storage", _Typed, "5"))  # too short
    scan.persistent_load("storage")
    assert scan.storages == {"0": ("FloatStorage", 10), "1": ("FloatStorage", 3), "2": (None, 4)}


def test_storage_scan_types_only_torch_globals():
    scan = ck._StorageScan(io.BytesIO(b""))
    assert scan.find_class("torch", "FloatStorage").storage == "FloatStorage"
    assert scan.find_class("mymodule", "FloatStorage").storage is None
    assert issubclass(scan.find_class("torch", "x"), ck._Inert)


def _info(crc=0x12345678, csize=3_000_000_000, usize=3_500_000_000):
    info = zipfile.ZipInfo("a/data/0")
    info.CRC, info.compress_size, info.file_size = crc, csize, usize
    return info


def test_data_descriptor_forms():
    info = _info()
    short = struct.pack("<III", info.CRC, info.compress_size, info.file_size)  # 12 bytes, sizes above 2 GiB
    assert ck._descriptor_matches(short, info)
    assert not ck._descriptor_matches(short[:11], info)
    assert not ck._descriptor_matches(struct.pack("<III", info.CRC + 1, info.compress_size, info.file_size), info)
    assert not ck._descriptor_matches(struct.pack("<III", info.CRC, info.compress_size, 5), info)
    zip64 = struct.pack("<IQQ", info.CRC, info.compress_size, info.file_size)  # exactly 20 bytes
    assert ck._descriptor_matches(zip64, info)
    assert ck._descriptor_matches(zip64 + b"PK\x03\x04", info)  # the next header follows: 24 bytes read
    assert not ck._descriptor_matches(struct.pack("<IQQ", info.CRC, info.compress_size, 1), info)
    assert not ck._descriptor_matches(struct.pack("<IQ", info.CRC, info.compress_size) + b"\0" * 4, _info(csize=9))
