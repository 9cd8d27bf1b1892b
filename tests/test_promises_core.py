"""The logic that decides "verified", pinned value by value, and README promises that had no test.

Each test fails when the behaviour it names breaks: the FP32 bound's max(1, |logit|) floor, ties
judged by float64's margin (not the artefact's), every gate rule alone and both sides of each
threshold, "new checkpoint" decided by sha256, atomic writes, the parity table's tie count and
failure hints, exit 1 for an artefact that could not be exported, and UNET_EXPORT_DEBUG (a DeepLabV3
checkpoint without aux_classifier: tests/runtimes/test_registry.py). About 10 s on 2 cores: most of it three
exports of a width-8 model at 32x32 and one CLI subprocess; the rest is milliseconds.
"""

import errno
import io
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from tests.conftest import milesial_state_dict
from unet_export.api import ExportResult, export_artifact
from unet_export.cli.main import app
from unet_export.errors import ArtifactError
from unet_export.fileio import atomic_path, sha256_file, sweep_stale_temps, temp_path
from unet_export.workdir.manifest import load_manifest, set_model
from unet_export.parity.gate import FP16, FP32, Tolerance, compare, tolerance_for

# ---------------------------------------------------------------------------------------------
# Logits built from values float32 holds exactly, so that the noise floor and every error below
# are exact numbers (powers of two), not whatever rounding happens to give.

U = 2.0**-20  # a step float32 represents exactly next to +-0.5


def two_class_logits(high: float = 0.5, shape=(1, 2, 8, 8)) -> torch.Tensor:
    """float64 logits: class 0 at +high, class 1 at -high everywhere (margin 2 x high, no tie)."""
    exact = torch.empty(shape, dtype=torch.float64)
    exact[:, 0], exact[:, 1] = high, -high
    return exact


def only_failure(case) -> str:
    assert len(case.failures) == 1, case.failures
    return case.failures[0]


# A1: the FP32 bound is rtol x floor + atol x max(1, max |float64 logit|) ---------------------


def test_fp32_bound_uses_max_1_when_every_logit_is_below_1():
    """With logits under 1 the allowance is atol x 1, not atol x max|logit| (which would be half)."""
    exact = two_class_logits(0.5)
    eager = exact.float()  # the noise floor is exactly 0: only the atol term is left
    exact[0, 1, 3, 3] = eager[0, 1, 3, 3] = 0.0  # a logit near 0, where float32 resolves 1e-8
    within, beyond = eager.clone(), eager.clone()
    within[0, 1, 3, 3] = 0.9e-7
    beyond[0, 1, 3, 3] = 1.1e-7
    ok = compare(within, eager, FP32, exact=exact)
    assert ok.noise_floor == 0.0 and ok.max_abs_ref == 0.5
    assert ok.atol == FP32.rel_atol * 1.0  # max(1, 0.5) = 1
    assert 0.5e-7 < ok.max_err_fp64 < 1e-7
    assert ok.passed, ok.failures  # 0.9e-7 <= 1e-7 x max(1, 0.5); 1e-7 x 0.5 would fail it
    bad = compare(beyond, eager, FP32, exact=exact)
    assert 1e-7 < bad.max_err_fp64 < 1.2e-7
    assert "max error vs float64" in only_failure(bad)


def test_fp32_bound_scales_with_the_largest_float64_logit_above_1():
    exact = two_class_logits(4.0)
    eager = exact.float()
    exact[0, 1, 3, 3] = eager[0, 1, 3, 3] = 0.0
    within, beyond = eager.clone(), eager.clone()
    within[0, 1, 3, 3] = 3.6e-7
    beyond[0, 1, 3, 3] = 4.4e-7
    ok = compare(within, eager, FP32, exact=exact)
    assert ok.atol == pytest.approx(FP32.rel_atol * 4.0, rel=1e-12)
    assert ok.passed, ok.failures  # a bound of 1e-7 x 1 would fail it
    assert not compare(beyond, eager, FP32, exact=exact).passed


# A3: ties are where float64's own top two logits are close, whatever the artefact says ------


def test_a_tie_is_decided_by_float64s_margin_not_the_artefacts():
    exact = two_class_logits(0.5, shape=(1, 2, 4, 4))
    # pixels (0, 0) and (0, 1): float64 barely prefers class 1 (margin 2^-30); the artefact
    # prefers class 0 by 0.25. Pixel (1, 1): float64 prefers class 0 by 1.0; the artefact flips it
    # by a hair (margin 2^-24). Judged by float64's margin: 2 ties and 1 class change; by the
    # artefact's it would be the other way round.
    exact[0, 0, 0, :2], exact[0, 1, 0, :2] = 0.25, 0.25 + 2.0**-30
    eager = exact.float()  # (0, 0) and (0, 1) round to exact ties in float32; the floor is 2^-30
    out = eager.clone()
    out[0, 0, 0, :2] = 0.5
    out[0, 0, 1, 1], out[0, 1, 1, 1] = 0.0, 2.0**-24
    case = compare(out, eager, FP16, exact=exact)
    margin_bound = 2 * FP32.allowed(case.noise_floor, 1.0)  # FP16 has no error bound: ties use FP32's
    assert case.noise_floor == 2.0**-30 and 2.0**-24 <= margin_bound < 0.25
    assert case.differing_pixels == 3
    assert case.tie_pixels == 2  # float64 cannot decide (0, 0) and (0, 1); (1, 1) is a real class change
    assert case.argmax_disagreement == 1 / 16


# A4: each gate rule alone, and both sides of every threshold -------------------------------


def test_fp32_error_bound_alone_fails_with_no_class_change():
    exact = two_class_logits(0.5)
    eager = exact.float()
    out = eager.clone()
    out[0, 0, 2, 2] += 16 * U  # far beyond 1e-7, far from changing the class (margin 1.0)
    case = compare(out, eager, FP32, exact=exact)
    assert case.differing_pixels == 0 and case.argmax_disagreement == 0.0
    assert "max error vs float64" in only_failure(case)


def test_fp32_class_change_alone_fails_when_the_error_bound_is_off():
    exact = two_class_logits(0.5)
    eager = exact.float()
    out = eager.clone()
    out[0, 1, 2, 2] = 0.75  # one pixel of 64 now class 1; float64 says class 0 by 1.0
    no_bound = Tolerance("fp32", rel_atol=None, max_disagreement=0.0, min_dice=None, rtol=None)
    case = compare(out, eager, no_bound, exact=exact)
    assert case.atol is None and case.argmax_disagreement == 1 / 64 and case.tie_pixels == 0
    assert "change class" in only_failure(case)
    assert compare(eager.clone(), eager, no_bound, exact=exact).passed


def test_rtol_exactly_at_the_limit_passes_and_just_below_fails():
    exact = two_class_logits(0.5)
    eager = exact.float()
    eager[0, 0, 0, 0] += U  # the noise floor: exactly 2^-20
    out = exact.float()
    out[0, 1, 5, 5] += 3 * U  # exactly 3 x the floor
    at = compare(out, eager, tolerance_for("fp32", rtol=3.0, atol=0.0), exact=exact)
    assert at.noise_floor == U and at.max_err_fp64 == 3 * U and at.atol == 3 * U
    assert at.passed, at.failures
    below = compare(out, eager, tolerance_for("fp32", rtol=math.nextafter(3.0, 0), atol=0.0), exact=exact)
    message = only_failure(below)
    assert "would pass with --rtol 3 " in message  # the limit that passed, never the one in force


def test_atol_exactly_at_the_limit_passes_and_just_below_fails():
    exact = two_class_logits(0.5)
    eager = exact.float()  # floor 0; max(1, 0.5) = 1: the bound is atol itself
    out = eager.clone()
    out[0, 1, 5, 5] += 3 * U
    assert compare(out, eager, tolerance_for("fp32", atol=3 * U), exact=exact).passed
    below = compare(out, eager, tolerance_for("fp32", atol=math.nextafter(3 * U, 0)), exact=exact)
    assert "max error vs float64" in only_failure(below)


def _flipped(n_flipped: int, foreground_rows: int, size: int = 100):
    """(out, eager, exact) for a 2-class 1 x size x size image: class 1 on the top
    ``foreground_rows`` rows (margin 2, no ties), ``n_flipped`` of its pixels turned to class 0."""
    exact = torch.zeros(1, 2, size, size, dtype=torch.float64)
    exact[0, 1, :foreground_rows], exact[0, 0, foreground_rows:] = 1.0, 1.0
    exact[0, 0, :foreground_rows] = exact[0, 1, foreground_rows:] = -1.0
    eager = exact.float()
    out = eager.clone()
    flat = out[0, 0].view(-1)
    flat[:n_flipped] = 5.0  # the first n pixels of row 0 (foreground) become class 0
    return out, eager, exact


def test_max_class_change_exactly_at_the_limit_passes_and_just_below_fails():
    out, eager, exact = _flipped(5, foreground_rows=90)
    free_dice = dict(min_dice=0.0)
    case = compare(out, eager, tolerance_for("fp16", max_class_change=1.0, **free_dice), exact=exact)
    limit = case.argmax_disagreement
    assert limit == 5 / 10_000 and case.tie_pixels == 0
    assert compare(out, eager, tolerance_for("fp16", max_class_change=limit, **free_dice), exact=exact).passed
    below = compare(out, eager, tolerance_for("fp16", max_class_change=math.nextafter(limit, 0), **free_dice),
                    exact=exact)  # fmt: skip
    assert "change class" in only_failure(below)


def test_min_dice_exactly_at_the_limit_passes_and_just_above_fails():
    out, eager, exact = _flipped(5, foreground_rows=90)
    free = dict(max_class_change=1.0)
    dice = compare(out, eager, tolerance_for("fp16", min_dice=0.0, **free), exact=exact).dice_vs_eager
    assert dice == pytest.approx(2 * 8995 / (8995 + 9000), abs=1e-6) and dice < 1
    assert compare(out, eager, tolerance_for("fp16", min_dice=dice, **free), exact=exact).passed
    above = compare(out, eager, tolerance_for("fp16", min_dice=math.nextafter(dice, 1), **free), exact=exact)
    message = only_failure(above)
    assert "Dice vs eager" in message
    hint = float(message.split("--min-dice ")[1])  # rounded down, so it passes
    assert hint <= dice and compare(out, eager, tolerance_for("fp16", min_dice=hint, **free), exact=exact).passed


# A4 continued: a failure hint is an option that really passes with the gate that failed ------


def test_every_option_an_fp32_failure_names_makes_it_pass():
    """A failure names the option value that would have passed: for FP32 only --rtol/--atol,
    which the FP32 gate applies (it ignores --max-class-change, and the commands refuse it)."""
    exact = two_class_logits(0.5)
    eager = exact.float()
    eager[0, 0, 0, 0] += U  # a non-zero floor, so that --rtol is offered too
    out = exact.float()
    out[0, 1, 2, 2] = 0.75  # a class change, and an error of 1.25: both FP32 checks fail
    case = compare(out, eager, FP32, exact=exact)
    assert len(case.failures) == 2 and "change class" in case.failures[1]
    hints = [h for f in case.failures if "would pass with " in f for h in f.split("would pass with ")[1].split(" or ")]
    assert [h.split()[0] for h in hints] == ["--rtol", "--atol"]
    assert "--max-class-change" not in " ".join(case.failures) and "--min-dice" not in " ".join(case.failures)
    for hint in hints:
        option, value = hint.split()
        fixed = compare(out, eager, tolerance_for("fp32", **{option.removeprefix("--"): float(value)}), exact=exact)
        assert fixed.passed, f"{hint} does not pass: {fixed.failures}"


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


# B: the parity table's tie count and the failure hints as printed ---------------------------


def _rendered(renderable) -> str:
    console = Console(file=io.StringIO(), width=300, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_parity_table_shows_ties_apart_from_class_changes():
    from unet_export.cli.render import parity_table
    from unet_export.parity.gate import ParityReport

    exact = two_class_logits(0.5, shape=(1, 2, 4, 4))
    exact[0, 0, 0, 0], exact[0, 1, 0, 0] = 0.25, 0.25 + 2.0**-30
    eager = exact.float()
    out = eager.clone()
    out[0, 0, 0, 0] += 2.0**-25
    tied = compare(out, eager, FP32, exact=exact)
    plain = two_class_logits(0.5, shape=(1, 2, 4, 4))
    clean = compare(plain.float(), plain.float(), FP32, exact=plain)
    tied.shape, clean.shape = [1, 3, 4, 4], [2, 3, 4, 4]
    text = _rendered(parity_table(ParityReport("onnxruntime (cpu)", "fp32", [tied, clean], limits=FP32.to_dict())))
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│")}
    assert "0.0000% (+1 ties)" in rows["1x3x4x4"] and "pass" in rows["1x3x4x4"]
    assert "ties" not in rows["2x3x4x4"]


def test_a_failed_export_prints_each_failing_check_with_the_value_that_passes(tmp_path, monkeypatch):
    import unet_export.cli.render as render
    from unet_export.parity.gate import ParityReport

    exact = two_class_logits(0.5)
    eager = exact.float()
    eager[0, 0, 0, 0] += U
    out = exact.float()
    out[0, 1, 5, 5] += 40 * U
    case = compare(out, eager, FP32, exact=exact)
    parity = ParityReport("torchscript (cpu)", "fp32", [case], limits=FP32.to_dict())
    entry = {"format": "torchscript", "precision": "fp32", "bytes": 10**6, "dynamic_axes": {}}
    buffer = Console(file=io.StringIO(), width=300, color_system=None)
    monkeypatch.setattr(render, "console", buffer)
    render.export_report(ExportResult(tmp_path / "m.ts", entry, parity, 0.1), tmp_path)
    text = buffer.file.getvalue()
    assert "parity failed (1, 2, 8, 8): max error vs float64" in " ".join(text.split())
    rtol = float(text.split("would pass with --rtol ")[1].split()[0])
    assert rtol == 40.0  # (40 U - 1e-7) / U = 39.9, rounded up at two digits
    assert compare(out, eager, tolerance_for("fp32", rtol=rtol), exact=exact).passed
    assert f"FAILED: {tmp_path / 'm.ts'} recorded as failed" in text


# B: exit codes at the CLI boundary ----------------------------------------------------------


def test_an_artefact_that_cannot_be_exported_exits_1_and_publishes_nothing(make_checkpoint, tmp_path, monkeypatch):
    def cannot_script(*_, **__):
        raise RuntimeError("Python builtin <built-in function id> is currently not supported in Torchscript")

    monkeypatch.setattr(torch.jit, "script", cannot_script)
    weights = make_checkpoint("v3")
    with pytest.raises(ArtifactError, match="torch.jit.script failed: RuntimeError") as info:
        export_artifact(weights, "torchscript", tmp_path / "lib", device="cpu", height=32, width=32, static=True)
    assert info.value.exit_code == 1
    out = tmp_path / "exports"
    args = ["torchscript", str(weights), "-w", str(out), "--height", "32", "--width", "32", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: torch.jit.script failed")
    assert "Traceback" not in result.output
    assert not list(out.glob("*.ts")) and not list(out.glob(".*tmp*"))  # nothing published, no temp left
    assert not out.exists() or load_manifest(out)["artifacts"] == []


def test_debug_shows_the_traceback_and_an_internal_error_still_exits_3(make_checkpoint, tmp_path):
    """Through the real entry point (run_app), not Typer's test runner: the contract's 3, not 1."""
    code = (
        "import sys\n"
        "import unet_export.cli.main as m\n"
        "def broken(*a, **k):\n"
        "    raise ZeroDivisionError('a bug')\n"
        "m.export_artifact = broken\n"
        f"sys.argv = ['unet-export', 'torchscript', {str(make_checkpoint('v3'))!r}, '-w', {str(tmp_path / 'o')!r}]\n"
        "m.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"UNET_EXPORT_DEBUG": "1"})  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr and "in broken" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: internal error: ZeroDivisionError: a bug")
