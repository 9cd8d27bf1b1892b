"""A workdir cannot reach outside itself (issue 24, section 3). A workdir travels (verify runs
"after copying the exports to the deployment host"), so its manifest is untrusted input: every
file name it records must be a plain name inside the workdir, links in it that lead out are
refused where a command opens them, and the lock is opened without following a link. A manifest
that breaks this is bad input: exit 2, one line naming the field, nothing touched.

One small ONNX + OpenVINO IR export is made per session (tests/conftest.py) and copied into a sandbox per test; the
sandbox holds the workdir and the files an attacker aims at beside it."""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from unet_export.cli.bench import app as bench_app
from unet_export.cli.main import app
from unet_export.fileio import sha256_file

pytest.importorskip("openvino")
runner = CliRunner()
SIZE = ["--height", "64", "--width", "64", "--device", "cpu"]
FAST_BENCH = ["--backends", "onnxruntime", "--batch", "1", "--warmup", "0", "--iters", "1", "--device", "cpu"]
VICTIM = b"the user's own file, outside the workdir\n"


@pytest.fixture(scope="module")
def exported(exports):
    """unet_v3.pth and its verified ONNX model and FP32 OpenVINO IR, exported once per session (read only)."""
    weights = exports.checkpoint("unet_v3.pth")
    return weights, exports.run(weights, ("onnx", "openvino"), 64, 64).workdir


@dataclass
class Sandbox:
    root: Path  # everything a command may reach: the checkpoint, the workdir, the user's files
    workdir: Path
    weights: Path
    image: Path
    victim: Path  # a file of the user's beside the workdir
    outside: Path  # a copy of the workdir's ONNX model, outside it (same sha256 as the recorded one)
    out: Path  # the commands' --out / --repo: the one place besides the workdir they may write

    def edit(self, change) -> None:
        """Apply ``change`` to the workdir's manifest as an attacker would: by hand, no checks."""
        path = self.workdir / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))

    def entry(self, manifest: dict, fmt: str) -> dict:
        return next(a for a in manifest["artifacts"] if a["format"] == fmt)


@pytest.fixture
def sandbox(exported, tmp_path) -> Sandbox:
    root = tmp_path / "sandbox"
    root.mkdir()
    weights, workdir = exported
    shutil.copy(weights, root / "unet_v3.pth")
    shutil.copytree(workdir, root / "W")
    box = Sandbox(root, root / "W", root / "unet_v3.pth", root / "img.png", root / "victim.txt", root / "outside.onnx",
                  tmp_path / "out")  # fmt: skip
    box.edit(lambda m: m["model"]["checkpoint"].update(path=str(box.weights)))
    Image.new("RGB", (64, 64), (120, 40, 200)).save(box.image)
    box.victim.write_bytes(VICTIM)
    shutil.copy(box.workdir / "unet_v3.onnx", box.outside)
    return box


def snapshot(root: Path) -> dict:
    """Every file, folder and link under ``root``: a file by its mtime and sha256, a link by its target."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                seen[key] = ("link", os.readlink(path))
            elif path.is_dir():
                seen[key] = ("dir",)
            else:
                seen[key] = ("file", path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return seen


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def commands(box: Sandbox) -> dict[str, tuple]:
    """Every command that reads or writes a workdir, each with its own place under --out."""
    w = str(box.workdir)
    return {
        "verify": (app, ["verify", "-w", w, "--device", "cpu"]),
        "predict": (app, ["predict", w, str(box.image), "--runtime", "onnxruntime", "--device", "cpu",
                          "--out", str(box.out / "masks")]),  # fmt: skip
        "predict-openvino": (app, ["predict", w, str(box.image), "--runtime", "openvino", "--device", "cpu",
                                   "--out", str(box.out / "masks-ov")]),  # fmt: skip
        "unet-bench": (bench_app, ["-w", w, *FAST_BENCH]),
        "triton": (app, ["triton", "-w", w, "--repo", str(box.out / "repo"), "--formats", "onnx,openvino"]),
        "export": (app, ["onnx", str(box.weights), "-w", w, *SIZE]),
    }


def run_command(box: Sandbox, name: str):
    cli, args = commands(box)[name]
    return runner.invoke(cli, args)


def staged_redo(box: Sandbox, target: str) -> Path:
    """The ONNX entry renamed to ``target`` with a redo record (``pending``) of attacker content:
    recovery would rename the staged file onto ``target``."""
    staged = box.workdir / ".unet_v3.999999.tmp.onnx"
    staged.write_bytes(b"attacker content")

    def change(manifest):
        box.entry(manifest, "onnx").update(path=target, pending=staged.name, sha256=sha256_file(staged))

    box.edit(change)
    return staged


# -- overwrite anywhere: a redo record renamed onto a path outside the workdir ----------------


@pytest.mark.parametrize("where", ["relative", "absolute"])
@pytest.mark.parametrize("command", ["verify", "export"])
def test_a_redo_record_cannot_overwrite_a_file_outside(sandbox, where, command):
    target = "../victim.txt" if where == "relative" else str(sandbox.victim)
    staged = staged_redo(sandbox, target)
    result = run_command(sandbox, command)
    assert sandbox.victim.read_bytes() == VICTIM and staged.read_bytes() == b"attacker content"
    assert result.exit_code == 2, result.output
    assert f"artifacts[0].path {target!r} is not a file name inside the workdir" in one_error_line(result)


# -- delete anywhere: an IR's parked .bin named outside the workdir ----------------------------


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_pending_ir_weights_record_cannot_delete_a_file_outside(sandbox, where):
    target = "../victim.txt" if where == "relative" else str(sandbox.victim)
    (sandbox.workdir / "unet_v3.bin").unlink()  # the reader then finishes the "pending" rename
    sandbox.edit(lambda m: sandbox.entry(m, "openvino")["weights"].update(pending=target))
    result = run_command(sandbox, "predict-openvino")
    assert sandbox.victim.read_bytes() == VICTIM
    assert result.exit_code == 2, result.output
    assert f"artifacts[1].weights.pending {target!r} is not a file name inside the workdir" in one_error_line(result)


def test_ir_weights_named_outside_the_workdir_exit_2(sandbox):
    """Was `ValueError: Invalid name` from Path.with_name, exit 3."""
    shutil.copy(sandbox.workdir / "unet_v3.bin", sandbox.root / "outside.bin")
    sandbox.edit(lambda m: sandbox.entry(m, "openvino")["weights"].update(path="../outside.bin"))
    result = run_command(sandbox, "predict-openvino")
    assert result.exit_code == 2, result.output
    assert "artifacts[1].weights.path '../outside.bin' is not a file name inside the workdir" in one_error_line(result)


# -- read anywhere: recorded paths and links that lead out -------------------------------------


@pytest.mark.parametrize("where", ["relative", "absolute"])
@pytest.mark.parametrize("command", ["predict", "unet-bench", "triton"])
def test_an_artefact_path_outside_the_workdir_is_not_read(sandbox, where, command):
    target = "../outside.onnx" if where == "relative" else str(sandbox.outside)
    sandbox.edit(lambda m: sandbox.entry(m, "onnx").update(path=target))
    result = run_command(sandbox, command)
    assert result.exit_code == 2, result.output
    assert f"artifacts[0].path {target!r} is not a file name inside the workdir" in one_error_line(result)
    assert not (sandbox.out / "repo").exists()


OPENED = [("verify", "unet_v3.onnx"), ("verify", "unet_v3.bin"), ("predict", "unet_v3.onnx"),
          ("predict-openvino", "unet_v3.xml"), ("predict-openvino", "unet_v3.bin"), ("unet-bench", "unet_v3.onnx"),
          ("triton", "unet_v3.onnx"), ("triton", "unet_v3.bin")]  # fmt: skip


@pytest.mark.parametrize("command, link", OPENED)
def test_a_link_out_of_the_workdir_is_refused_where_it_is_opened(sandbox, link, command):
    """The file behind the link is the verified one (same sha256): only where it lives is wrong."""
    outside = sandbox.root / f"outside-{link}"
    shutil.move(sandbox.workdir / link, outside)
    (sandbox.workdir / link).symlink_to(os.path.relpath(outside, sandbox.workdir))
    before = snapshot(sandbox.root)
    result = run_command(sandbox, command)
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert f"{sandbox.workdir / link} is a link to {outside}, outside the workdir" in line
    after = snapshot(sandbox.root)
    if command == "verify":  # it records the verdicts of the artefacts it could check, as for a changed file
        del before["W/manifest.json"], after["W/manifest.json"]
    assert after == before and not (sandbox.out / "repo").exists()


@pytest.mark.parametrize("command", ["predict-openvino", "triton"])
def test_an_ir_without_a_weights_record_reads_no_bin_through_a_link(sandbox, command):
    """A manifest from before the .bin was recorded (or one that dropped the record): the .bin
    beside the .xml is still the workdir's own file, never one a link leads to."""
    sandbox.edit(lambda m: sandbox.entry(m, "openvino").pop("weights"))
    outside = sandbox.root / "outside.bin"
    shutil.move(sandbox.workdir / "unet_v3.bin", outside)
    (sandbox.workdir / "unet_v3.bin").symlink_to(outside)
    result = run_command(sandbox, command)
    assert result.exit_code == 2, result.output
    assert f"{sandbox.workdir / 'unet_v3.bin'} is a link to {outside}, outside the workdir" in one_error_line(result)
    assert not (sandbox.out / "repo").exists()
    (sandbox.workdir / "unet_v3.bin").unlink()
    shutil.move(outside, sandbox.workdir / "unet_v3.bin")  # the file itself: served as before
    assert run_command(sandbox, command).exit_code == 0


def test_a_symlinked_lock_creates_nothing_outside(sandbox):
    target = sandbox.root / "created-through-the-lock"
    (sandbox.workdir / ".manifest.lock").unlink()
    (sandbox.workdir / ".manifest.lock").symlink_to(target)
    result = run_command(sandbox, "verify")
    assert not target.exists()
    assert result.exit_code == 2, result.output
    assert f"{sandbox.workdir / '.manifest.lock'} is a symbolic link" in one_error_line(result)


# -- section 5: bad input that exited 3 ---------------------------------------------------------


def test_a_deeply_nested_manifest_exits_2(sandbox):
    (sandbox.workdir / "manifest.json").write_text("[" * 200_000)
    result = run_command(sandbox, "verify")
    assert result.exit_code == 2, result.output
    assert "manifest.json is not valid JSON" in one_error_line(result)


def _external(onnx_path: Path, location: str, data: Path) -> str:
    """Move the largest initializer of ``onnx_path`` to the external file ``data``, recorded as
    ``location``; returns the tensor's name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data.write_bytes(numpy_helper.to_array(tensor).tobytes())
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(data.stat().st_size))):
        tensor.external_data.add(key=key, value=value)
    onnx_path.write_bytes(model.SerializeToString())
    return tensor.name


@pytest.mark.parametrize("where", ["relative", "absolute", "link"])
def test_onnx_external_data_outside_the_model_folder_exits_2(sandbox, where):
    """ONNX Runtime refuses the model (was "internal error", exit 3): bad input, exit 2 naming the tensor."""
    folder = sandbox.root / "model"
    folder.mkdir()
    model = folder / "model.onnx"
    shutil.copy(sandbox.workdir / "unet_v3.onnx", model)
    secret = sandbox.root / "secret.bin"
    location = {"relative": "../secret.bin", "absolute": str(secret), "link": "weights.bin"}[where]
    name = _external(model, location, secret)
    if where == "link":
        (folder / "weights.bin").symlink_to(secret)
    result = runner.invoke(app, ["predict", str(model), str(sandbox.image), "--device", "cpu", "--out",
                                 str(sandbox.out / "masks")])  # fmt: skip
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert f"{model}: tensor {name!r} keeps its data in {location!r}, outside the model's folder" in line
    assert not (sandbox.out / "masks").exists()


@pytest.mark.parametrize("command", ["verify", "predict", "unet-bench"])
def test_a_recorded_onnx_model_with_data_outside_the_workdir_exits_2(sandbox, command):
    """The workdir's ONNX model (its sha256 recorded to match) keeps a tensor in ../secret.bin."""
    model = sandbox.workdir / "unet_v3.onnx"
    name = _external(model, "../secret.bin", sandbox.root / "secret.bin")
    sandbox.edit(lambda m: sandbox.entry(m, "onnx").update(sha256=sha256_file(model), bytes=model.stat().st_size))
    result = run_command(sandbox, command)
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert f"{model}: tensor {name!r} keeps its data in '../secret.bin', outside the model's folder" in line


def test_onnx_external_data_inside_the_model_folder_still_runs(sandbox):
    folder = sandbox.root / "model"
    folder.mkdir()
    model = folder / "model.onnx"
    shutil.copy(sandbox.workdir / "unet_v3.onnx", model)
    _external(model, "weights.bin", folder / "weights.bin")
    result = runner.invoke(app, ["predict", str(model), str(sandbox.image), "--device", "cpu", "--out",
                                 str(sandbox.out / "masks")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (sandbox.out / "masks" / "img_mask.png").is_file()


def _tiny_model(folder: Path, location: str, where: str) -> Path:
    """An ONNX model whose one tensor keeps its data in ``location``: an initializer, or the
    constant of a node inside an If branch (a subgraph)."""
    import onnx
    from onnx import TensorProto, helper

    tensor = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    if where == "initializer":
        graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [out], [tensor])
    else:
        branch = helper.make_graph([helper.make_node("Constant", [], ["y"], value=tensor)], "b", [], [out])
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
                                  "g", [], [out], [cond])  # fmt: skip
    path = folder / "tiny.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("where", ["initializer", "subgraph constant"])
@pytest.mark.parametrize("location", ["../x.bin", "/x.bin", "sub/../../x.bin", "", "x\0.bin", "ok.bin"])
def test_every_tensor_of_an_onnx_model_keeps_its_data_beside_it(tmp_path, where, location):
    from unet_export.errors import IntegrityError
    from unet_export.runtimes.onnx.export import check_external_data

    path = _tiny_model(tmp_path, location, where)
    if location == "ok.bin":
        check_external_data(path)
        return
    with pytest.raises(IntegrityError, match=f"tiny.onnx: tensor 'w' keeps its data in .*, outside the model's folder"):
        check_external_data(path)


# -- the whole promise: a hostile manifest, every command ---------------------------------------


def _hostile(box: Sandbox, kind: str) -> None:
    if kind == "overwrite":
        staged_redo(box, "../victim.txt")
    elif kind == "overwrite-absolute":
        staged_redo(box, str(box.victim))
    elif kind == "delete":
        (box.workdir / "unet_v3.bin").unlink()
        box.edit(lambda m: box.entry(m, "openvino")["weights"].update(pending=str(box.victim)))
    elif kind == "read":
        box.edit(lambda m: box.entry(m, "onnx").update(path="../outside.onnx"))
    elif kind == "read-weights":
        box.edit(lambda m: box.entry(m, "openvino")["weights"].update(path="../victim.txt"))
    elif kind == "source":
        box.edit(lambda m: box.entry(m, "openvino").update(source="/etc/passwd"))
    elif kind == "nested":
        (box.workdir / "manifest.json").write_text("[" * 200_000)


@pytest.mark.parametrize("kind", ["overwrite", "overwrite-absolute", "delete", "read", "read-weights", "source",
                                  "nested"])  # fmt: skip
def test_a_hostile_manifest_changes_nothing_outside_the_workdir_and_out(sandbox, kind):
    """verify, predict, unet-bench, triton and an export: each exits 2 with one line, and no file
    under the sandbox (the workdir included) is created, changed or deleted."""
    _hostile(sandbox, kind)
    before = snapshot(sandbox.root)
    for command in ("verify", "predict", "predict-openvino", "unet-bench", "triton", "export"):
        result = run_command(sandbox, command)
        assert result.exit_code == 2, (command, result.output)
        one_error_line(result)
        assert snapshot(sandbox.root) == before, command
        assert not [p for p in sandbox.out.rglob("*") if not p.is_dir()], command
