"""Damaged checkpoints: the zip container's CRCs and headers are checked before torch.load, each
storage's size against what data.pkl declares, and "corrupt" is told apart from "unsafe" (a pickle
that names a Python global weights_only refuses). A fuzz test mutates a small checkpoint ~40 ways:
every run ends with the original weights or one UserError line, never anything else."""

import io
import os
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import milesial_state_dict
from unet_export.checkpoint import load_checkpoint
from unet_export.errors import UserError

UNSAFE = "could run code"
FUZZ_WIDTH = 4  # a ~300 KB checkpoint with every milesial key: fast to mutate and reload 40 times


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    state = milesial_state_dict("v4", width=FUZZ_WIDTH)
    path = tmp_path_factory.mktemp("original") / "small.pth"
    torch.save(state, path)
    return path, state


def _members(data: bytes) -> dict[str, dict]:
    """Byte offsets of each member: local header, central directory entry, and its data."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    central, out = zf.start_dir, {}
    for info in zf.infolist():  # central directory order
        assert data[central : central + 4] == b"PK\x01\x02"
        n, m, k = struct.unpack("<HHH", data[central + 28 : central + 34])
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        end = start + info.compress_size
        out[info.filename] = dict(local=info.header_offset, central=central, start=start, end=end)
        central += 46 + n + m + k
    return out


def _flip(data: bytes, at: int, mask: int = 0xFF) -> bytes:
    b = bytearray(data)
    b[at] ^= mask
    return bytes(b)


def _rezip(src: Path, dst: Path, edit) -> Path:
    """A valid zip (fresh CRCs) whose members are ``edit(name, bytes)``; None drops the member."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            body = edit(info.filename, zin.read(info))
            if body is not None:
                zout.writestr(info.filename, body)
    return dst


def _error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def _corrupt(path: Path, *fragments: str) -> str:
    message = _error(path)
    assert f"{path} is corrupt" in message, message
    assert UNSAFE not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _storage(members: dict, index: int) -> str:
    return sorted(n for n in members if "/data/" in n)[index]


# --- one case each -------------------------------------------------------------------------------


def test_intact_checkpoint_still_loads(small):
    path, state = small
    ckpt = load_checkpoint(path)
    assert list(ckpt.state_dict) == [k for k in state if k != "mask_values"]


def test_corrupted_crc_in_the_central_directory(small, tmp_path):
    path, _ = small
    data = path.read_bytes()
    member = _storage(_members(data), 3)
    bad = tmp_path / "crc.pth"
    bad.write_bytes(_flip(data, _members(data)[member]["central"] + 16))
    _corrupt(bad, "CRC", member)


def test_corrupted_crc_in_the_local_header_or_data_descriptor(small, tmp_path):
    path, _ = small
    data = path.read_bytes()
    members = _members(data)
    member = _storage(members, 5)
    local = tmp_path / "local.pth"  # torch writes 0 there (the CRC follows the data)
    local.write_bytes(_flip(data, members[member]["local"] + 14))
    _corrupt(local, member)
    descriptor = tmp_path / "descriptor.pth"
    descriptor.write_bytes(_flip(data, members[member]["end"] + 4))  # after the PK\x07\x08 signature
    _corrupt(descriptor, member)


def test_flipped_byte_inside_a_tensor_payload(small, tmp_path):
    path, _ = small
    data = path.read_bytes()
    member = _storage(_members(data), 7)
    span = _members(data)[member]
    bad = tmp_path / "payload.pth"
    bad.write_bytes(_flip(data, (span["start"] + span["end"]) // 2, 0x01))
    _corrupt(bad, "CRC mismatch", member)


@pytest.mark.parametrize("keep", [0.5, 0.999, 22 / 300_000])
def test_truncated_zip(small, tmp_path, keep):
    path, _ = small
    data = path.read_bytes()
    bad = tmp_path / "cut.pth"
    bad.write_bytes(data[: max(1, int(len(data) * keep))])
    _corrupt(bad, "truncated")


def test_storage_member_removed_or_shortened(small, tmp_path):
    path, _ = small
    member = _storage(_members(path.read_bytes()), 2)
    gone = _rezip(path, tmp_path / "gone.pth", lambda name, body: None if name == member else body)
    _corrupt(gone, member, "missing")
    short = _rezip(path, tmp_path / "short.pth", lambda name, body: body[:-4] if name == member else body)
    _corrupt(short, member, "bytes")
    longer = _rezip(path, tmp_path / "long.pth", lambda name, body: body + b"\0" * 4 if name == member else body)
    _corrupt(longer, member, "bytes")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.01, 12])
def test_truncated_legacy_checkpoint(tmp_path, keep):
    path = tmp_path / "legacy.pth"
    torch.save(milesial_state_dict("v3", width=FUZZ_WIDTH), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    load_checkpoint(path)  # intact, it loads
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    _corrupt(path, "truncated")


class RunsCode:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TrainingConfig:  # what a training script pickles beside the weights
    lr = 0.1


def test_pickle_that_calls_os_system_is_unsafe_and_is_not_run(tmp_path):
    RunsCode.marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"inc.double_conv.0.weight": torch.zeros(1), "hook": RunsCode()}, path)
    message = _error(path)
    assert UNSAFE in message and "is corrupt" not in message and "system" in message
    assert not RunsCode.marker.exists()


@pytest.mark.parametrize("obj, what", [(torch.nn.Conv2d(1, 1, 1), "a whole model (torch.nn.modules.conv.Conv2d), "),
                                       ({"config": TrainingConfig()}, "")], ids=["module", "class"])  # fmt: skip
def test_whole_objects_are_unsafe_not_corrupt(tmp_path, obj, what):
    path = tmp_path / "object.pth"
    torch.save(obj, path)
    message = _error(path)
    assert message.startswith(f"refusing to load {path}: it pickles {what}Python objects that {UNSAFE}"), message
    assert "is corrupt" not in message


def _damage_pickle(*where):
    def edit(name, body):
        if name.endswith("/data.pkl"):
            for at in where:
                body = _flip(body, at(body), 0x0F)
        return body

    return edit


@pytest.mark.parametrize(
    "at",
    [
        lambda pkl: 0,  # the PROTO opcode
        lambda pkl: pkl.index(b"torch._utils") + 5,  # "torch!_utils": a global no Python object has
        lambda pkl: len(pkl) - 1,  # the STOP opcode
        lambda pkl: pkl.index(b"FloatStorage") - 7,  # the GLOBAL opcode before "torch FloatStorage"
    ],
    ids=["proto-op", "global-name", "stop", "global-op"],
)
def test_damaged_pickle_in_a_valid_zip_is_corrupt_not_unsafe(small, tmp_path, at):
    path, _ = small
    bad = _rezip(path, tmp_path / "pkl.pth", _damage_pickle(at))
    with zipfile.ZipFile(bad) as zf:
        assert zf.testzip() is None  # the container is fine: only the pickle is damaged
    _corrupt(bad, "data.pkl")


def test_zip_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "images.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images/a.png", b"\x89PNG")
    message = _error(path)
    assert "not a PyTorch checkpoint" in message and UNSAFE not in message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    assert "empty" in _error(path)


# --- fuzzing -------------------------------------------------------------------------------------


def _mutations(data: bytes) -> list[tuple[str, bytes]]:
    """~40 deterministic ways to damage a zip checkpoint, aimed at payloads and CRC fields too."""
    rng = random.Random(20240611)
    members = _members(data)
    storages = [m for name, m in members.items() if "/data/" in name]
    pkl = next(m for name, m in members.items() if name.endswith("/data.pkl"))
    out = []
    for _ in range(10):
        at = rng.randrange(len(data))
        out.append((f"flip@{at}", _flip(data, at, rng.randrange(1, 256))))
    for _ in range(8):
        span = rng.choice(storages)
        at = rng.randrange(span["start"], span["end"])
        out.append((f"payload-flip@{at}", _flip(data, at, 1 << rng.randrange(8))))
    for _ in range(4):
        at = rng.randrange(pkl["start"], pkl["end"])
        out.append((f"pickle-flip@{at}", _flip(data, at, rng.randrange(1, 256))))
    for keep in (0, 1, 3, 200, len(data) // 3, len(data) - 22, len(data) - 1, rng.randrange(len(data))):
        out.append((f"truncate@{keep}", data[:keep]))
    for _ in range(4):
        at, size = rng.randrange(len(data)), rng.randrange(16, 4096)
        out.append((f"zero@{at}+{size}", data[:at] + bytes(len(data[at : at + size])) + data[at + size :]))
    spans = list(members.values())
    for field, offset in (("central-crc", "central"), ("local-crc", "local"), ("descriptor-crc", "end")):
        for span in rng.sample(spans, 2):
            at = span[offset] + {"central": 16, "local": 14, "end": 4}[offset] + rng.randrange(4)
            out.append((f"{field}@{at}", _flip(data, at, rng.randrange(1, 256))))
    span = rng.choice(storages)
    out.append(("central-size", _flip(data, span["central"] + 24, 0x04)))  # uncompressed size
    out.append(("local-extra-length", _flip(data, span["local"] + 28, 0x01)))
    out.append(("appended-garbage", data + bytes(rng.randrange(256) for _ in range(100))))
    return out


def _same_weights(ckpt, state: dict) -> bool:
    expected = {k: v for k, v in state.items() if k != "mask_values"}
    if list(ckpt.state_dict) != list(expected) or ckpt.mask_values != state.get("mask_values"):
        return False
    return all(
        v.dtype == expected[k].dtype and v.shape == expected[k].shape and torch.equal(v, expected[k])
        for k, v in ckpt.state_dict.items()
    )


def test_fuzzed_checkpoints_load_intact_or_fail_with_one_line(small, tmp_path):
    path, state = small
    mutations = _mutations(path.read_bytes())
    assert len(mutations) >= 40
    outcomes, wrong = {}, []
    for i, (label, body) in enumerate(mutations):
        target = tmp_path / f"m{i:02d}.pth"
        target.write_bytes(body)
        try:
            ckpt = load_checkpoint(target)
        except UserError as exc:
            message = str(exc)
            outcomes[label] = message
            if "\n" in message or UNSAFE in message:
                wrong.append(f"{label}: {message!r}")
        except Exception as exc:  # noqa: BLE001 - exactly what must not happen
            wrong.append(f"{label}: {type(exc).__name__}: {exc}")
        else:
            outcomes[label] = "loaded"
            if not _same_weights(ckpt, state):
                wrong.append(f"{label}: loaded different weights")
    assert not wrong, "\n".join(wrong)
    # whatever else may be harmless (a timestamp), damaged data and CRCs never load
    for label, outcome in outcomes.items():
        if label.startswith(("payload-flip", "pickle-flip", "truncate", "central-crc", "descriptor-crc")):
            assert outcome != "loaded", label


CLI_CASES = ["payload-flip", "central-crc", "truncate", "pickle-protocol"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_exits_2_with_one_line_and_leaves_nothing(small, tmp_path, case):
    path, _ = small
    data = path.read_bytes()
    members = _members(data)
    bad = tmp_path / f"{case}.pth"
    if case == "payload-flip":
        bad.write_bytes(_flip(data, members[_storage(members, 0)]["start"] + 3, 0x10))
    elif case == "central-crc":
        bad.write_bytes(_flip(data, members[_storage(members, 1)]["central"] + 17))
    elif case == "truncate":
        bad.write_bytes(data[: len(data) * 2 // 3])
    else:  # protocol 13 makes torch warn before the damaged STOP fails: no warning on stderr
        _rezip(path, bad, _damage_pickle(lambda pkl: 1, lambda pkl: len(pkl) - 1))
    out = tmp_path / "exports"
    env = {k: v for k, v in os.environ.items() if k != "UNET_EXPORT_DEBUG"}
    args = ["onnx", str(bad), "-w", str(out), "--height", "64", "--width", "64", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "unet_export", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "is corrupt" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()
