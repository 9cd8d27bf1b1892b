"""The manifest store (unet_export/workdir/manifest.py) in-process: validation messages, the transaction's
save/recover/sweep steps, publish, the model record and the artefact checks. The crash and
concurrency cases with real processes are in tests/e2e/test_store.py."""

import json
import os
import shutil
from datetime import datetime

import pytest
import torch

from tests.conftest import milesial_state_dict
from unet_export.api import export_artifact
from unet_export.workdir import manifest as m
from unet_export.errors import IntegrityError, UserError
from unet_export.fileio import sha256_file
from unet_export.workdir.manifest import load_manifest, set_model


def _model(sha="a" * 64):
    return {"architecture": "milesial", "config": {}, "checkpoint": {"sha256": sha, "path": "w.pth"}}


def _entry(fmt="onnx", precision="fp32", path="weights.onnx", **extra):
    return {"format": fmt, "path": path, "precision": precision, "status": "verified", "inputs": [], "outputs": []} | extra


def _write(workdir, data):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / m.MANIFEST_NAME).write_text(json.dumps(data))


def test_empty_manifest_and_names():
    assert m.empty_manifest() == {"schema": 1, "model": None, "artifacts": []}
    assert (m.MANIFEST_NAME, m.LOCK_NAME, m.SCHEMA_VERSION) == ("manifest.json", ".manifest.lock", 1)


def test_load_of_a_missing_manifest_is_empty(tmp_path):
    assert m.load_manifest(tmp_path) == m.empty_manifest()


def test_save_then_load_round_trips(tmp_path):
    data = m.empty_manifest() | {"model": _model(), "artifacts": [_entry()]}
    m.save_manifest(tmp_path, data)
    assert m.load_manifest(tmp_path) == data
    assert (tmp_path / "manifest.json").read_text().endswith("}\n")


@pytest.mark.parametrize("text", ["{not json", "\xff\xfe"])
def test_unreadable_manifest_is_a_user_error_naming_the_file(tmp_path, text):
    (tmp_path / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match=r"manifest.json is not valid JSON \(.+\); delete it and export again"):
        m.load_manifest(tmp_path)


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "is not an unet-export manifest (no 'artifacts' list); delete it and export again"),
        ({"artifacts": {}}, "is not an unet-export manifest (no 'artifacts' list)"),
        ({"artifacts": [], "model": 3}, ": 'model' is a int, not an object; delete it and export again"),
        ({"artifacts": [], "model": {"config": {}, "checkpoint": {}}},
         ": 'model'.architecture is missing, expected a str; delete it and export again"),
        ({"artifacts": [], "model": {"architecture": 1, "config": {}, "checkpoint": {}}},
         ": 'model'.architecture is a int, expected a str"),
        ({"artifacts": [], "model": {"architecture": "x", "config": [], "checkpoint": {}}},
         ": 'model'.config is a list, expected a dict"),
        ({"artifacts": [], "model": {"architecture": "x", "config": {}, "checkpoint": {}}},
         ": 'model.checkpoint.sha256' is missing or not a string; delete it and export again"),
        ({"artifacts": [], "model": {"architecture": "x", "config": {}, "checkpoint": {"sha256": 5}}},
         ": 'model.checkpoint.sha256' is missing or not a string"),
        ({"artifacts": ["x"]}, ": artifacts[0] is a str, not an object"),
        ({"artifacts": [_entry(), {k: v for k, v in _entry().items() if k != "status"}]},
         ": artifacts[1].status is missing, expected a str"),
        ({"artifacts": [_entry(inputs="x")]}, ": artifacts[0].inputs is a str, expected a list"),
        ({"artifacts": [_entry(outputs=None)]}, ": artifacts[0].outputs is a NoneType, expected a list"),
    ],
)
def test_validation_names_the_first_bad_field(tmp_path, data, message):
    _write(tmp_path, data)
    with pytest.raises(UserError) as err:
        m.load_manifest(tmp_path)
    assert str(err.value).startswith(str(tmp_path / "manifest.json")) and message in str(err.value)


def test_a_valid_manifest_with_a_model_and_entries_loads(tmp_path):
    data = {"schema": 1, "model": _model(), "artifacts": [_entry(), _entry("torchscript", path="w.ts")]}
    _write(tmp_path, data)
    assert m.load_manifest(tmp_path) == data


def test_transaction_saves_on_success_and_counts_revisions(tmp_path):
    workdir = tmp_path / "new" / "dir"
    with m.transaction(workdir) as manifest:
        m.upsert_artifact(manifest, _entry())
    assert (workdir / ".manifest.lock").exists()
    saved = m.load_manifest(workdir)
    assert saved["revision"] == 1 and saved["artifacts"] == [_entry()]
    with m.transaction(workdir):
        pass
    assert m.load_manifest(workdir)["revision"] == 2


def test_transaction_saves_nothing_when_the_block_fails(tmp_path):
    with m.transaction(tmp_path) as manifest:
        m.upsert_artifact(manifest, _entry())
    with pytest.raises(RuntimeError):
        with m.transaction(tmp_path) as manifest:
            m.upsert_artifact(manifest, _entry("torchscript"))
            raise RuntimeError("boom")
    saved = m.load_manifest(tmp_path)
    assert saved["revision"] == 1 and [a["format"] for a in saved["artifacts"]] == ["onnx"]


def _pending_workdir(tmp_path, staged_bytes, recorded_bytes):
    staged = tmp_path / ".weights.999.tmp.onnx"
    staged.write_bytes(staged_bytes)
    (tmp_path / "scratch").write_bytes(recorded_bytes)
    sha = sha256_file(tmp_path / "scratch")
    (tmp_path / "scratch").unlink()
    data = m.empty_manifest() | {"artifacts": [_entry(sha256=sha, pending=staged.name), _entry("torchscript")]}
    _write(tmp_path, data)
    return staged


def test_transaction_finishes_a_publish_a_killed_process_left(tmp_path, monkeypatch):
    monkeypatch.setattr(m, "sweep_stale_temps", lambda d: [])  # isolate recovery from the sweep
    staged = _pending_workdir(tmp_path, b"verified", b"verified")
    saves = []
    real_save = m.save_manifest
    monkeypatch.setattr(m, "save_manifest", lambda w, man: (saves.append(json.loads(json.dumps(man))), real_save(w, man)))
    with m.transaction(tmp_path) as manifest:
        assert all("pending" not in a for a in manifest["artifacts"])
        assert len(saves) == 1 and "revision" not in saves[0]  # the recovery was saved before the block ran
    assert (tmp_path / "weights.onnx").read_bytes() == b"verified" and not staged.exists()
    assert all("pending" not in a for a in m.load_manifest(tmp_path)["artifacts"])


def test_recovery_never_renames_a_staged_file_that_is_not_the_verified_one(tmp_path, monkeypatch):
    monkeypatch.setattr(m, "sweep_stale_temps", lambda d: [])
    staged = _pending_workdir(tmp_path, b"torn write", b"verified")
    with m.transaction(tmp_path) as manifest:
        assert all("pending" not in a for a in manifest["artifacts"])
    assert not (tmp_path / "weights.onnx").exists() and staged.read_bytes() == b"torn write"


def test_recover_reports_whether_anything_changed(tmp_path):
    clean = m.empty_manifest() | {"artifacts": [_entry()]}
    assert m._recover(tmp_path, clean) is False
    gone = m.empty_manifest() | {"artifacts": [_entry(pending=".weights.1.tmp.onnx", sha256="0")]}
    assert m._recover(tmp_path, gone) is True and "pending" not in gone["artifacts"][0]
    assert not (tmp_path / "weights.onnx").exists()


def test_transaction_sweeps_dead_processes_temp_files(tmp_path):
    dead = tmp_path / ".weights.999999999.tmp.onnx"
    dead.write_bytes(b"x")
    with m.transaction(tmp_path):
        assert not dead.exists()


def test_publish_records_the_entry_moves_the_file_and_leaves_no_redo_record(tmp_path, monkeypatch):
    staged = tmp_path / ".weights.1.tmp.onnx"
    staged.write_bytes(b"model")
    manifest = m.empty_manifest()
    seen = []
    real_replace = os.replace
    # At the rename, the manifest on disk already names the staged file (the redo record).
    def replace(src, dst):
        if src == staged:
            seen.append(m.load_manifest(tmp_path))
        real_replace(src, dst)

    monkeypatch.setattr(m.os, "replace", replace)
    m.publish(tmp_path, manifest, _entry(sha256="s"), staged)
    assert len(seen) == 1 and seen[0]["artifacts"][0]["pending"] == staged.name
    assert (tmp_path / "weights.onnx").read_bytes() == b"model" and not staged.exists()
    assert manifest["artifacts"] == [_entry(sha256="s")]


@pytest.mark.parametrize("point", ["before-publish", "before-rename"])
def test_fault_points_kill_only_when_named(monkeypatch, point):
    killed = []
    monkeypatch.setattr(m.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setenv("UNET_EXPORT_KILL_AT", "elsewhere")
    m._fault_point(point)
    assert killed == []
    monkeypatch.setenv("UNET_EXPORT_KILL_AT", point)
    m._fault_point(point)
    assert killed == [(os.getpid(), m.signal.SIGKILL)]


def test_set_model_keeps_artefacts_of_the_same_checkpoint_content():
    manifest = m.empty_manifest() | {"model": _model("a" * 64), "artifacts": [_entry()]}
    moved = _model("a" * 64) | {"checkpoint": {"sha256": "a" * 64, "path": "elsewhere/w.pth"}}
    assert m.set_model(manifest, moved) == 0
    assert manifest["artifacts"] == [_entry()] and manifest["model"] is moved


def test_set_model_drops_artefacts_of_other_content_even_at_the_same_path():
    manifest = m.empty_manifest() | {"model": _model("a" * 64), "artifacts": [_entry(), _entry("torchscript")]}
    assert m.set_model(manifest, _model("b" * 64)) == 2
    assert manifest["artifacts"] == [] and manifest["model"]["checkpoint"]["sha256"] == "b" * 64


def test_set_model_on_an_empty_manifest():
    manifest = m.empty_manifest()
    assert m.set_model(manifest, _model()) == 0 and manifest["model"] == _model()


def test_upsert_replaces_only_the_same_format_and_precision():
    manifest = m.empty_manifest()
    for entry in (_entry(), _entry(precision="fp16"), _entry("torchscript"), _entry(path="new.onnx")):
        m.upsert_artifact(manifest, entry)
    assert [(a["format"], a["precision"], a["path"]) for a in manifest["artifacts"]] == [
        ("onnx", "fp16", "weights.onnx"), ("torchscript", "fp32", "weights.onnx"), ("onnx", "fp32", "new.onnx")]
    assert m.find_artifacts(manifest, "onnx") == [manifest["artifacts"][0], manifest["artifacts"][2]]
    assert m.find_artifacts(manifest) == manifest["artifacts"]
    assert m.find_artifacts(manifest, "openvino") == []


def test_checked_path_accepts_only_the_verified_file(tmp_path):
    (tmp_path / "weights.onnx").write_bytes(b"model")
    entry = _entry(sha256=sha256_file(tmp_path / "weights.onnx"), bytes=5)
    assert m.checked_path(tmp_path, entry) == tmp_path / "weights.onnx"
    assert m.checked_path(tmp_path, {"path": "weights.onnx"}) == tmp_path / "weights.onnx"  # an old manifest
    with pytest.raises(IntegrityError, match="changed since it was verified"):
        m.checked_path(tmp_path, entry | {"bytes": 6})  # the size alone differs
    (tmp_path / "weights.onnx").write_bytes(b"MODEL")  # same size, other content
    with pytest.raises(IntegrityError, match=r"weights.onnx changed since it was verified \(its sha256 is not the one in "
                                             r"manifest.json\); export it again"):  # fmt: skip
        m.checked_path(tmp_path, entry)
    (tmp_path / "weights.onnx").unlink()
    with pytest.raises(IntegrityError, match="weights.onnx is in manifest.json but missing on disk; export it again"):
        m.checked_path(tmp_path, entry)
    (tmp_path / "weights.onnx").mkdir()  # a folder is not the file
    with pytest.raises(IntegrityError, match="missing on disk"):
        m.checked_path(tmp_path, entry)


def test_tool_versions():
    found = m.tool_versions("torch", "onnx", "no-such-package-xyz")
    import onnx
    import torch

    assert found == {"torch": torch.__version__, "cuda": torch.version.cuda, "onnx": onnx.__version__,
                     "no-such-package-xyz": None}  # fmt: skip
    defaults = m.tool_versions()
    assert set(defaults) == {"unet-export", "torch", "cuda", "onnx", "onnxruntime", "onnxscript"}
    assert defaults["onnxruntime"] is not None
    assert m.tool_versions("onnx") == {"onnx": onnx.__version__}


def test_utc_now_is_an_iso_timestamp_in_utc_to_the_second():
    stamp = m.utc_now()
    parsed = datetime.fromisoformat(stamp)
    assert stamp.endswith("+00:00") and parsed.microsecond == 0 and parsed.utcoffset().total_seconds() == 0


def test_an_entry_error_says_how_to_fix_it(tmp_path):
    _write(tmp_path, {"artifacts": [_entry(format=3)]})
    with pytest.raises(UserError) as err:
        m.load_manifest(tmp_path)
    assert str(err.value) == (f"{tmp_path / 'manifest.json'}: artifacts[0].format is a int, expected a str; "
                              "delete it and export again")  # fmt: skip


def test_recovery_looks_past_entries_without_a_redo_record(tmp_path):
    staged = tmp_path / ".w.1.tmp.ts"
    staged.write_bytes(b"ts")
    manifest = m.empty_manifest() | {"artifacts": [_entry(), _entry("torchscript", path="w.ts", pending=staged.name,
                                                                    sha256=sha256_file(staged))]}  # fmt: skip
    assert m._recover(tmp_path, manifest) is True
    assert (tmp_path / "w.ts").read_bytes() == b"ts" and "pending" not in manifest["artifacts"][1]


@pytest.mark.parametrize("point, published", [("before-publish", False), ("before-rename", True)])
def test_publish_passes_its_two_kill_points(tmp_path, monkeypatch, point, published):
    staged = tmp_path / ".weights.1.tmp.onnx"
    staged.write_bytes(b"model")
    monkeypatch.setenv("UNET_EXPORT_KILL_AT", point)

    class Killed(Exception):
        pass

    def kill(pid, sig):
        raise Killed  # where SIGKILL would stop the process

    monkeypatch.setattr(m.os, "kill", kill)
    with pytest.raises(Killed):
        m.publish(tmp_path, m.empty_manifest(), _entry(sha256="s"), staged)
    # killed before the redo record was saved: nothing on disk names the file; after: the record does
    on_disk = m.load_manifest(tmp_path)["artifacts"]
    assert [a.get("pending") for a in on_disk] == ([staged.name] if published else [])
    assert staged.exists() and not (tmp_path / "weights.onnx").exists()


# -- a workdir cannot reach outside itself (issue 24): names, links, the lock -------------------


@pytest.mark.parametrize("field", ["path", "pending", "source", "source_onnx", "weights.path", "weights.pending"])
@pytest.mark.parametrize("name", ["../victim.txt", "/etc/passwd", "sub/w.onnx", "", ".", "..", "w\0.onnx", 3])
def test_every_file_name_field_is_a_plain_name_inside_the_workdir(tmp_path, field, name):
    entry = _entry(weights={"path": "w.bin"})
    record = entry["weights"] if field.startswith("weights.") else entry
    record[field.split(".")[-1]] = name
    _write(tmp_path, {"artifacts": [_entry(), entry]})
    with pytest.raises(UserError) as err:
        m.load_manifest(tmp_path)
    problem = f"{name!r} is not a file name inside the workdir"
    if (field, name) == ("path", 3):  # the type check comes first
        problem = "is a int, expected a str"
    assert str(err.value) == f"{tmp_path / 'manifest.json'}: artifacts[1].{field} {problem}; delete it and export again"


@pytest.mark.parametrize("weights", ["w.bin", [], {"sha256": "s"}])
def test_ir_weights_must_be_a_record_with_a_path(tmp_path, weights):
    _write(tmp_path, {"artifacts": [_entry(weights=weights)]})
    with pytest.raises(UserError, match=r"artifacts\[0\].weights is not an object with a 'path'"):
        m.load_manifest(tmp_path)


def test_a_null_path_is_not_a_cleared_redo_record(tmp_path):
    """null clears only a redo record (``pending``); the IR weights' ``path`` names its file and must be one."""
    _write(tmp_path, {"artifacts": [_entry("openvino", weights={"path": None, "pending": None})]})
    with pytest.raises(UserError) as err:
        m.load_manifest(tmp_path)
    assert str(err.value) == (f"{tmp_path / 'manifest.json'}: artifacts[0].weights.path None is not a file name "
                              "inside the workdir; delete it and export again")  # fmt: skip


def test_workdir_file_refuses_a_name_that_is_not_a_plain_file_name(tmp_path):
    assert m.workdir_file(tmp_path, "weights.onnx") == tmp_path / "weights.onnx"
    with pytest.raises(UserError) as err:
        m.workdir_file(tmp_path, "../victim.txt")
    assert str(err.value) == f"'../victim.txt' is not a file name inside the workdir {tmp_path}"


def test_a_workdir_that_is_a_file_is_a_user_error_when_read(tmp_path):
    (tmp_path / "w").write_text("not a folder")
    with pytest.raises(UserError) as err:
        m.load_manifest(tmp_path / "w")
    assert str(err.value) == f"--workdir {tmp_path / 'w'} is a file, not a folder"


def test_make_workdir_creates_the_folders_and_names_a_file_in_the_way(tmp_path):
    m.make_workdir(tmp_path / "a" / "b")
    m.make_workdir(tmp_path / "a" / "b")  # already there: nothing to do
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError) as err:
        m.make_workdir(tmp_path / "f")
    assert str(err.value) == f"--workdir {tmp_path / 'f'} is a file, not a folder"
    with pytest.raises(UserError) as err:
        m.make_workdir(tmp_path / "f" / "sub" / "w")  # the file is a parent: named after the workdir
    assert str(err.value) == f"--workdir {tmp_path / 'f' / 'sub' / 'w'}: {tmp_path / 'f'} is a file, not a folder"
    (tmp_path / "dangling").symlink_to(tmp_path / "absent")  # a link to nothing is in the way too
    with pytest.raises(UserError) as err:
        m.make_workdir(tmp_path / "dangling")
    assert str(err.value) == f"--workdir {tmp_path / 'dangling'} is a file, not a folder"
    assert not (tmp_path / "absent").exists()


def test_the_lock_file_is_created_readable_and_writable_never_executable(tmp_path):
    """Mode 0o666 less the umask, as for any file the user creates (the umask decides who else may
    open it): never executable."""
    old = os.umask(0o022)
    try:
        fd = m._open_lock(tmp_path)
    finally:
        os.umask(old)
    os.close(fd)
    assert (tmp_path / ".manifest.lock").stat().st_mode & 0o7777 == 0o644


def test_plain_names_and_cleared_redo_records_load(tmp_path):
    entry = _entry(path="w.int8.xml", pending=None, source="w.onnx", weights={"path": "w.int8.bin", "pending": None})
    _write(tmp_path, {"artifacts": [entry, _entry("tensorrt", path="w.fp16.engine", source_onnx="w.fp16.onnx")]})
    assert m.load_manifest(tmp_path)["artifacts"][0] == entry


def test_deeply_nested_json_is_not_a_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("[" * 200_000)
    with pytest.raises(UserError, match=r"manifest.json is not valid JSON \(maximum recursion depth"):
        m.load_manifest(tmp_path)


def test_a_link_leading_out_of_the_workdir_is_refused_where_it_is_opened(tmp_path):
    workdir, outside = tmp_path / "w", tmp_path / "outside.onnx"
    workdir.mkdir()
    outside.write_bytes(b"model")
    (workdir / "weights.onnx").symlink_to(outside)
    entry = _entry(sha256=sha256_file(outside), bytes=5)
    with pytest.raises(IntegrityError, match=f"weights.onnx is a link to {outside}, outside the workdir"):
        m.checked_path(workdir, entry)
    (workdir / "inside.onnx").write_bytes(b"model")  # a link to a file of the workdir is that file
    (workdir / "weights.onnx").unlink()
    (workdir / "weights.onnx").symlink_to("inside.onnx")
    assert m.checked_path(workdir, entry) == workdir / "weights.onnx"
    (workdir / "weights.onnx").unlink()
    (workdir / "weights.onnx").symlink_to("weights.onnx")  # a loop
    with pytest.raises(IntegrityError, match="is a link that cannot be followed"):
        m.checked_path(workdir, entry)


def test_a_workdir_reached_through_a_link_is_still_its_own(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "weights.onnx").write_bytes(b"model")
    (tmp_path / "real" / "alias.onnx").symlink_to("weights.onnx")
    (tmp_path / "linked").symlink_to("real")
    assert m.checked_path(tmp_path / "linked", _entry(path="alias.onnx")) == tmp_path / "linked" / "alias.onnx"


def test_a_linked_manifest_leading_out_is_refused(tmp_path):
    _write(tmp_path / "elsewhere", {"artifacts": []})
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "manifest.json").symlink_to(tmp_path / "elsewhere" / "manifest.json")
    with pytest.raises(IntegrityError, match="manifest.json is a link to .*, outside the workdir"):
        m.load_manifest(tmp_path / "w")


def test_recovery_checks_every_name_before_it_moves_anything(tmp_path, monkeypatch):
    """A redo record whose target is a link out of the workdir: refused before the first rename,
    the one before it included, and nothing is saved."""
    monkeypatch.setattr(m, "sweep_stale_temps", lambda d: [])
    (tmp_path / "w").mkdir()
    staged = [tmp_path / "w" / f".{i}.1.tmp.onnx" for i in (1, 2)]
    for path in staged:
        path.write_bytes(b"attacker")
    (tmp_path / "victim").write_bytes(b"mine")
    (tmp_path / "w" / "b.onnx").symlink_to(tmp_path / "victim")
    sha = sha256_file(staged[0])
    entries = [_entry(path="a.onnx", pending=staged[0].name, sha256=sha),
               _entry("torchscript", path="b.onnx", pending=staged[1].name, sha256=sha)]
    _write(tmp_path / "w", {"artifacts": entries})
    saved = (tmp_path / "w" / "manifest.json").read_bytes()
    with pytest.raises(IntegrityError, match="b.onnx is a link to"):
        with m.transaction(tmp_path / "w"):
            pass
    assert (tmp_path / "victim").read_bytes() == b"mine" and all(p.exists() for p in staged)
    assert not (tmp_path / "w" / "a.onnx").exists() and (tmp_path / "w" / "manifest.json").read_bytes() == saved


def test_the_lock_is_never_opened_through_a_link(tmp_path):
    target = tmp_path / "created-outside"
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / ".manifest.lock").symlink_to(target)
    with pytest.raises(UserError, match=r"\.manifest\.lock is a symbolic link; a workdir's lock is its own file"):
        with m.transaction(tmp_path / "w"):
            pass
    assert not target.exists() and not (tmp_path / "w" / "manifest.json").exists()


# A new checkpoint is a new sha256: issue 14 pinned the proof value by value (these were tests/test_promises_core.py, section A5).

# A5: a new checkpoint is a new sha256, not a new path ----------------------------------------


def _record(path: str, sha: str) -> dict:
    return {"architecture": "milesial", "config": {}, "checkpoint": {"path": path, "sha256": sha}}


def _manifest_with_two_artefacts(path: str, sha: str) -> dict:
    entries = [{"format": fmt, "path": f"m.{fmt}", "precision": "fp32"} for fmt in ("onnx", "torchscript")]
    return {"schema": 1, "model": _record(path, sha), "artifacts": entries}


def test_set_model_keeps_artefacts_of_the_same_sha256_at_another_path():
    manifest = _manifest_with_two_artefacts("/a/model.pth", "aaa")
    assert set_model(manifest, _record("/elsewhere/copy.pth", "aaa")) == 0
    assert [a["format"] for a in manifest["artifacts"]] == ["onnx", "torchscript"]
    assert manifest["model"]["checkpoint"]["path"] == "/elsewhere/copy.pth"  # the record is the new one


def test_set_model_drops_artefacts_when_the_same_path_holds_new_content():
    manifest = _manifest_with_two_artefacts("/a/model.pth", "aaa")
    assert set_model(manifest, _record("/a/model.pth", "bbb")) == 2
    assert manifest["artifacts"] == [] and manifest["model"]["checkpoint"]["sha256"] == "bbb"
    first = {"schema": 1, "model": None, "artifacts": []}
    assert set_model(first, _record("/a/model.pth", "aaa")) == 0 and first["model"]["checkpoint"]["sha256"] == "aaa"


def test_export_decides_a_new_checkpoint_by_content(tmp_path):
    """The same bytes at another path are the same model (nothing dropped); new bytes at the same
    path are a new one (its predecessor's artefacts dropped)."""
    small = dict(device="cpu", height=32, width=32, static=True)
    out, original, copy = tmp_path / "out", tmp_path / "a" / "model.pth", tmp_path / "b" / "model.pth"
    original.parent.mkdir()
    copy.parent.mkdir()
    torch.save(milesial_state_dict("v3"), original)
    shutil.copy(original, copy)
    assert export_artifact(original, "torchscript", out, **small).dropped == 0
    assert export_artifact(copy, "torchscript", out, **small).dropped == 0  # same bytes, another path
    assert load_manifest(out)["model"]["checkpoint"] == {"path": str(copy.resolve()), "sha256": sha256_file(original)}
    torch.save(milesial_state_dict("v3", seed=5), copy)  # same path, new weights
    assert export_artifact(copy, "torchscript", out, **small).dropped == 1
    manifest = load_manifest(out)
    assert [a["path"] for a in manifest["artifacts"]] == ["model.ts"]
    assert manifest["model"]["checkpoint"]["sha256"] == sha256_file(copy) != sha256_file(original)
