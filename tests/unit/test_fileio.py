"""Atomic writes, hashing, free space and stale temp files (unet_export/fileio.py), in-process."""

import errno
import hashlib
import json
import os
import subprocess
import sys
from collections import namedtuple

import pytest

from unet_export import fileio
from unet_export.errors import UserError
from unet_export.fileio import atomic_path, sweep_stale_temps, temp_path


def test_temp_path_keeps_the_suffix_last_and_names_the_pid(tmp_path):
    assert fileio.temp_path(tmp_path / "weights.onnx") == tmp_path / f".weights.{os.getpid()}.tmp.onnx"
    assert fileio.temp_path(tmp_path / "model.pt2").name.endswith(".tmp.pt2")
    assert fileio._TEMP.match(fileio.temp_path(tmp_path / "a.b.json").name).group(1) == str(os.getpid())


def test_atomic_path_renames_into_place_only_on_success(tmp_path):
    dest = tmp_path / "reports" / "new" / "bench.json"  # folders created, as for a new reports/
    with fileio.atomic_path(dest) as tmp:
        assert tmp == fileio.temp_path(dest) and tmp.parent == dest.parent
        tmp.write_text("new")
        assert not dest.exists()
    assert dest.read_text() == "new" and os.listdir(dest.parent) == ["bench.json"]
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert dest.read_text() == "new" and os.listdir(dest.parent) == ["bench.json"]


@pytest.mark.parametrize("leftover", ["link", "file"])
def test_a_temp_name_taken_before_the_write_is_cleared_never_written_through(tmp_path, leftover):
    """A workdir may arrive holding a link at this process's temp name (pids repeat): writing
    through it would change a file outside the workdir."""
    victim, dest = tmp_path / "victim", tmp_path / "w" / "manifest.json"
    victim.write_text("mine")
    dest.parent.mkdir()
    tmp = fileio.temp_path(dest)
    if leftover == "link":
        tmp.symlink_to(victim)
    else:
        tmp.write_text("a dead process's half write")
    fileio.write_json(dest, {"a": 1})
    assert victim.read_text() == "mine" and json.loads(dest.read_text()) == {"a": 1} and not tmp.exists()
    tmp.symlink_to(victim)
    assert fileio.claim_temp_path(dest) == tmp and not tmp.is_symlink() and victim.read_text() == "mine"


@pytest.mark.parametrize("leftover", ["file", "dangling link", "link to a file", "none"])
def test_claim_temp_path_removes_any_leftover_at_the_name(tmp_path, leftover):
    """Whatever a dead process (or a planted link) left at this process's temp name is gone, and
    nothing else is touched; a folder there (never written by a writer) stays."""
    dest, victim = tmp_path / "manifest.json", tmp_path / "victim"
    victim.write_text("mine")
    tmp = fileio.temp_path(dest)
    if leftover == "file":
        tmp.write_text("a dead process's half write")
    elif leftover == "dangling link":
        tmp.symlink_to(tmp_path / "absent")
    elif leftover == "link to a file":
        tmp.symlink_to(victim)
    assert fileio.claim_temp_path(dest) == tmp
    assert not tmp.exists() and not tmp.is_symlink() and victim.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]


def test_claim_temp_path_leaves_a_folder_at_the_name(tmp_path):
    tmp = fileio.temp_path(tmp_path / "model.pt2")
    tmp.mkdir()
    assert fileio.claim_temp_path(tmp_path / "model.pt2") == tmp and tmp.is_dir()


def test_atomic_path_flushes_before_the_rename(tmp_path, monkeypatch):
    order = []
    monkeypatch.setattr(fileio, "fsync_file", lambda p: order.append(("fsync", p.name)))
    real_replace = os.replace
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (order.append(("rename", a.name)), real_replace(a, b)))
    with fileio.atomic_path(tmp_path / "x.json") as tmp:
        tmp.write_text("{}")
    assert order == [("fsync", tmp.name), ("rename", tmp.name)]


def test_atomic_path_errors_name_the_destination_not_the_temp_file(tmp_path):
    dest = tmp_path / "out.json"
    with pytest.raises(OSError) as err:
        with fileio.atomic_path(dest) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert err.value.filename == str(dest)
    other = tmp_path / "elsewhere"
    with pytest.raises(OSError) as err:
        with fileio.atomic_path(dest):
            raise OSError(errno.ENOENT, "missing", str(other))
    assert err.value.filename == str(other)  # an error about another file keeps its name


def test_a_failed_cleanup_never_masks_the_real_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError) as err:  # the folder is a file: mkdir fails, so does the unlink
        with fileio.atomic_path(tmp_path / "file" / "out.json"):
            pass
    assert err.value.errno in (errno.EEXIST, errno.ENOTDIR)


def test_fsync_file_syncs_files_and_skips_the_rest(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: synced.append(fd))
    (tmp_path / "f").write_text("x")
    fileio.fsync_file(tmp_path / "f")
    fileio.fsync_file(tmp_path)  # AOTInductor writes a folder: nothing to flush, no error
    fileio.fsync_file(tmp_path / "missing")
    assert len(synced) == 1


def test_write_json_is_indented_with_a_final_newline(tmp_path):
    fileio.write_json(tmp_path / "a.json", {"b": [1, 2]})
    assert (tmp_path / "a.json").read_text() == json.dumps({"b": [1, 2]}, indent=2) + "\n"


def test_loads_json_parses_like_json_loads():
    assert fileio.loads_json('{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}
    with pytest.raises(json.JSONDecodeError) as err:
        fileio.loads_json('{"a": ')
    assert (err.value.msg, err.value.pos) == ("Expecting value", 6)


def test_json_nested_too_deeply_is_a_decode_error_at_its_start():
    """RecursionError becomes the JSONDecodeError every caller handles, pointing at the first
    character (the message a user sees names the place)."""
    with pytest.raises(json.JSONDecodeError) as err:
        fileio.loads_json("[" * 200_000)
    assert (err.value.msg, err.value.doc, err.value.pos) == ("nested too deeply to parse", "[", 0)
    assert (err.value.lineno, err.value.colno) == (1, 1)
    assert str(err.value) == "nested too deeply to parse: line 1 column 1 (char 0)"
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no RecursionError traceback


def test_decode_metadata_turns_json_strings_back_into_values():
    metadata = {"classes": "[0, 1]", "config": '{"bilinear": false}', "scale": "0.5", "architecture": "milesial",
                "empty": "", "decoded": [0, 1], "height": 256}  # fmt: skip
    assert fileio.decode_metadata(metadata) == {
        "classes": [0, 1], "config": {"bilinear": False}, "scale": 0.5,
        "architecture": "milesial",  # not JSON: a plain string stays a string
        "empty": "", "decoded": [0, 1], "height": 256}  # fmt: skip
    assert fileio.decode_metadata({}) == {}


def test_write_bytes_checked(tmp_path):
    fileio.write_bytes_checked(tmp_path / "b", b"\x00\x01")
    fileio.write_bytes_checked(tmp_path / "b", b"\x02")  # replaces, never appends
    assert (tmp_path / "b").read_bytes() == b"\x02"


@pytest.mark.parametrize("size, chunk", [(0, 4), (10, 3), (10, 5), (3000, 1 << 20)])
def test_sha256_file_in_chunks(tmp_path, size, chunk):
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    (tmp_path / "f").write_bytes(data)
    assert fileio.sha256_file(tmp_path / "f", chunk=chunk) == hashlib.sha256(data).hexdigest()


def test_pid_alive(monkeypatch):
    assert fileio.pid_alive(os.getpid()) is True
    assert fileio.pid_alive(2**22 + 12345) is False  # above Linux's pid_max

    def denied(pid, sig):
        raise PermissionError(errno.EPERM, "not yours")

    monkeypatch.setattr(fileio.os, "kill", denied)
    assert fileio.pid_alive(1) is True  # alive, owned by someone else


def test_pid_alive_sends_its_own_process_no_signal():
    """Signal 0 only asks: a real one (SIGHUP) to this process fails the test (tests/unit/conftest.py)
    instead of hanging it up."""
    assert fileio.pid_alive(os.getpid()) is True


def test_sweep_removes_only_dead_writers_temp_files(tmp_path):
    dead, live = tmp_path / ".weights.4206969.tmp.onnx", tmp_path / f".weights.{os.getpid()}.tmp.onnx"
    plain, folder = tmp_path / "weights.onnx", tmp_path / ".model.4206969.tmp.pt2"
    for path in (dead, live, plain):
        path.write_bytes(b"x")
    folder.mkdir()
    assert fileio.sweep_stale_temps(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and plain.exists() and folder.exists()
    assert fileio.sweep_stale_temps(tmp_path / "absent") == []
    assert fileio.sweep_stale_temps(plain) == []


def test_stale_temp_pattern():
    assert fileio._TEMP.match(".a.12.tmp").group(1) == "12"
    assert fileio._TEMP.match(".a.b.12.tmp.json").group(1) == "12"
    for name in ("a.12.tmp.json", ".a.12.tmpx", ".a.x.tmp.json", "..12.tmp", ".a.12.tmp..json"):
        assert fileio._TEMP.match(name) is None, name


Usage = namedtuple("Usage", "total used free")


def test_ensure_free_space_probes_the_nearest_existing_folder(tmp_path, monkeypatch):
    probed = []
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: (probed.append(p), Usage(0, 0, 5_000_000))[1])
    fileio.ensure_free_space(tmp_path / "not" / "yet", 5_000_000, "the export")  # exactly enough
    assert probed == [tmp_path]
    with pytest.raises(UserError) as err:
        fileio.ensure_free_space(tmp_path / "not" / "yet", 5_000_001, "the export")
    assert str(err.value) == (f"not enough free space in {tmp_path / 'not' / 'yet'} for the export: about 5 MB needed, "
                              "5 MB free")  # fmt: skip


def test_environment_error_finds_the_os_error_behind_wrappers():
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError as inner:
            raise RuntimeError("inductor failed") from inner
    except RuntimeError as outer:
        assert fileio.environment_error(outer) is full
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError:
            raise ValueError("while handling")  # implicit chaining: __context__
    except ValueError as outer:
        assert fileio.environment_error(outer).errno == errno.EROFS
    assert fileio.environment_error(OSError(errno.EIO, "I/O error")) is None  # not the environment's
    assert fileio.environment_error(ValueError("x")) is None
    assert fileio.environment_error(None) is None


def test_environment_error_survives_a_cycle():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert fileio.environment_error(a) is None


def test_environment_errnos():
    assert fileio.ENVIRONMENT_ERRNOS == {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                                         errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENOENT,
                                         errno.ENAMETOOLONG}  # fmt: skip


def test_os_error_message():
    assert fileio.os_error_message(OSError(errno.ENOSPC, "No space left on device", "/x/w.onnx")) == (
        "cannot write or read /x/w.onnx: No space left on device")
    assert fileio.os_error_message(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")) == (
        "cannot write or read /a -> /b: Invalid cross-device link")
    assert fileio.os_error_message(OSError("bare")) == "cannot write or read a file: bare"


def test_free_space_message_rounds_megabytes(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: Usage(0, 0, 1_499_999_600_000))
    with pytest.raises(UserError) as err:
        fileio.ensure_free_space(tmp_path, 1_500_000_400_000, "it")
    assert str(err.value).endswith("for it: about 1500000 MB needed, 1500000 MB free")


def test_sha256_reads_in_bounded_chunks(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"x" * 10)
    sizes = []
    real_open = open

    def recording_open(path, mode="r"):
        fh = real_open(path, mode)
        read = fh.read
        fh_read = lambda n=-1: (sizes.append(n), read(n))[1]  # noqa: E731
        return type("F", (), {"read": staticmethod(fh_read), "__enter__": lambda s: s,
                              "__exit__": lambda s, *e: fh.close()})()  # fmt: skip

    monkeypatch.setattr(fileio, "open", recording_open, raising=False)
    assert fileio.sha256_file(tmp_path / "f", chunk=4) == hashlib.sha256(b"x" * 10).hexdigest()
    assert sizes == [4, 4, 4, 4]  # memory stays one chunk whatever the file's size


def test_pid_alive_only_asks_it_never_signals(tmp_path):
    import signal
    import subprocess
    import sys

    # a child that dies on SIGHUP (the default), whatever this process ignores
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP, "
                              "signal.SIG_DFL); time.sleep(30)"])  # fmt: skip
    try:
        assert fileio.pid_alive(child.pid) is True
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.5)  # still running: pid_alive sent signal 0, not a real one
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=10)


# Atomic writes: issue 14 pinned the proof value by value (these were tests/test_promises_core.py, section B).

# B: atomic writes --------------------------------------------------------------------------


def test_temp_files_are_hidden_beside_the_destination_with_pid_and_real_suffix(tmp_path):
    pid = os.getpid()
    assert temp_path(tmp_path / "model.onnx") == tmp_path / f".model.{pid}.tmp.onnx"
    assert temp_path(tmp_path / "weights.fp16.onnx") == tmp_path / f".weights.fp16.{pid}.tmp.onnx"
    assert temp_path(tmp_path / "manifest") == tmp_path / f".manifest.{pid}.tmp"
    with atomic_path(tmp_path / "model.pt2") as tmp:
        assert tmp == tmp_path / f".model.{pid}.tmp.pt2" and tmp.parent == tmp_path
        tmp.write_bytes(b"new")
    assert (tmp_path / "model.pt2").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]


def test_an_error_inside_the_block_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"old, verified")
    with pytest.raises(RuntimeError, match="exporter crashed"):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half writ")
            raise RuntimeError("exporter crashed")
    assert dest.read_bytes() == b"old, verified"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_an_os_error_names_the_destination_not_the_temp_file(tmp_path):
    dest = tmp_path / "model.onnx"
    with pytest.raises(OSError) as info:
        with atomic_path(dest) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert info.value.filename == str(dest) and info.value.errno == errno.ENOSPC
    dest.mkdir()  # the rename itself fails: a folder (not empty) is in the way
    (dest / "keep").write_text("x")
    with pytest.raises(OSError) as info:
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"new")
    assert info.value.filename == str(dest) and ".tmp" not in str(info.value.filename)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # the folder; no temp left
    assert (dest / "keep").read_text() == "x"


def test_sweep_removes_a_dead_writers_temp_and_keeps_a_live_ones_and_other_files(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".model.{dead_pid}.tmp.onnx"
    live = tmp_path / f".model.{os.getpid()}.tmp.onnx"
    keep = [tmp_path / "model.onnx", tmp_path / f"model.{dead_pid}.tmp.onnx", tmp_path / ".manifest.lock"]
    for path in (stale, live, *keep):
        path.write_bytes(b"x")
    (tmp_path / f".dir.{dead_pid}.tmp").mkdir()  # only files are swept
    assert sweep_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and all(p.exists() for p in keep)
    assert (tmp_path / f".dir.{dead_pid}.tmp").is_dir()
