"""parity/gate.py's records and messages, pinned value by value (the gate's arithmetic is in
test_gate.py; `make mutation` runs these against mutants)."""

import io
from dataclasses import replace

import pytest
import torch
from rich.console import Console

from tests.unit.test_gate import U, two_class_logits
from unet_export.api import ExportResult
from unet_export.flows.demo import random_milesial
from unet_export.errors import UserError
from unet_export.metrics import center_crop
from unet_export.runtimes import EagerRunner
from unet_export.runtimes.base import Runner
from unet_export.parity.gate import (
    FP16,
    FP32,
    TOLERANCES,
    CaseResult,
    ParityReport,
    Tolerance,
    _exact_logits,
    compare,
    exact_runner,
    tolerance_for,
    tolerance_from_record,
)


def test_the_default_gates():
    assert (FP32.name, FP32.rtol, FP32.rel_atol, FP32.max_disagreement, FP32.min_dice) == ("fp32", 5.0, 1e-7, 0.0, None)
    assert (FP16.name, FP16.rtol, FP16.rel_atol, FP16.max_disagreement, FP16.min_dice) == ("fp16", None, None, 1e-3,
                                                                                           0.999)  # fmt: skip
    # one reduced-precision gate, named after each precision (a rule printed as "fp16" over INT8 misled)
    assert TOLERANCES == {"fp32": FP32, "fp16": FP16, "bf16": replace(FP16, name="bf16"), "int8": replace(FP16, name="int8")}


def test_tolerance_arithmetic_and_record():
    tol = Tolerance("x", rel_atol=0.5, max_disagreement=0.25, min_dice=0.75, rtol=3.0)
    assert tol.allowed(floor=2.0, scale=4.0) == 3.0 * 2.0 + 0.5 * 4.0
    assert Tolerance("y", None, 0.0, None, rtol=2.0).allowed(3.0, 10.0) == 6.0
    assert Tolerance("z", 0.5, 0.0, None).allowed(3.0, 10.0) == 5.0
    assert tol.bounds_error and Tolerance("y", None, 0.0, None, rtol=1.0).bounds_error
    assert Tolerance("z", 0.1, 0.0, None).bounds_error and not FP16.bounds_error
    assert tol.to_dict() == {"name": "x", "rtol": 3.0, "atol": 0.5, "max_class_change": 0.25, "min_dice": 0.75}


def test_tolerance_from_record_reads_every_limit():
    record = {"name": "fp32", "rtol": 7.0, "atol": 2e-6, "max_class_change": 0.5, "min_dice": 0.9}
    tol = tolerance_from_record(record, "fp32")
    assert tol == Tolerance("fp32", rel_atol=2e-6, max_disagreement=0.5, min_dice=0.9, rtol=7.0)
    half = tolerance_from_record({"max_class_change": 0.01, "min_dice": 0.99}, "int8")
    assert half == Tolerance("int8", rel_atol=None, max_disagreement=0.01, min_dice=0.99, rtol=None)
    assert tolerance_from_record({"rtol": 1.0}, "fp32").max_disagreement == FP32.max_disagreement
    assert tolerance_from_record(None, "fp32") is FP32 and tolerance_from_record({}, "bf16") is TOLERANCES["bf16"]
    assert tolerance_from_record(None, "unknown") == replace(FP16, name="unknown")
    assert tolerance_from_record(FP32.to_dict(), "fp32") == FP32  # a recorded default reads back as itself


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("rtol", -1.0, "--rtol must be a finite number >= 0, got -1.0"),
        ("atol", float("inf"), "--atol must be a finite number >= 0, got inf"),
        ("max_class_change", float("nan"), "--max-class-change must be a finite number >= 0, got nan"),
        ("min_dice", 1.5, "--min-dice must be a finite number >= 0 and <= 1, got 1.5"),
        ("min_dice", -0.1, "--min-dice must be a finite number >= 0 and <= 1, got -0.1"),
    ],
)
def test_tolerance_options_are_checked(option, value, message):
    with pytest.raises(UserError) as err:
        tolerance_for("fp16" if option in ("max_class_change", "min_dice") else "fp32", **{option: value})
    assert str(err.value) == message


def test_tolerance_options_at_their_limits_are_accepted():
    assert tolerance_for("fp16", min_dice=1.0).min_dice == 1.0
    assert tolerance_for("fp16", min_dice=0.0, max_class_change=0.0) == Tolerance("fp16", None, 0.0, 0.0)
    assert tolerance_for("fp32", rtol=0.0, atol=0.0) == Tolerance("fp32", 0.0, 0.0, None, 0.0)


def test_tolerance_for_sets_only_its_precisions_options():
    assert tolerance_for("fp32", rtol=9.0) == Tolerance("fp32", 1e-7, 0.0, None, 9.0)
    assert tolerance_for("fp32", atol=3e-7) == Tolerance("fp32", 3e-7, 0.0, None, 5.0)
    assert tolerance_for("fp32", max_class_change=0.5, min_dice=0.5) == FP32  # the FP32 gate takes no such option
    assert tolerance_for("bf16", max_class_change=0.5) == Tolerance("bf16", None, 0.5, 0.999)
    assert tolerance_for("int8", min_dice=0.9, rtol=3.0) == Tolerance("int8", None, 1e-3, 0.9)
    base = Tolerance("mine", 1.0, 0.2, 0.3, 4.0)
    assert tolerance_for("fp16", base=base) == base and tolerance_for("fp32", rtol=1.0, base=base).rtol == 1.0


def _case(**kw):
    return CaseResult(shape=[1, 3, 8, 8], **kw)


def test_case_result_properties():
    assert _case().passed and not _case(failures=["x"]).passed
    assert _case(max_abs_err=2.0).judged_err == 2.0
    assert _case(max_abs_err=2.0, max_err_fp64=3.0).judged_err == 3.0
    assert _case(max_err_fp64=0.0).judged_err == 0.0  # zero is an error value, not "none"
    assert _case(max_err_fp64=3.0, noise_floor=1.5).floor_ratio == 2.0
    assert _case(max_err_fp64=3.0, noise_floor=0.0).floor_ratio is None
    assert _case(max_err_fp64=None, noise_floor=1.0).floor_ratio is None
    assert _case().reference == "eager fp32" and _case().label == "" and _case().tie_pixels == 0


def test_parity_report_verdict_failures_and_record():
    ok, bad = _case(), _case(failures=["too far", "class change"])
    bad.shape = [2, 3, 16, 16]
    report = ParityReport("onnxruntime (cpu)", "fp32", [ok, bad], limits=FP32.to_dict())
    assert not report.passed and not bool(report)
    assert report.failures() == ["(2, 3, 16, 16): too far", "(2, 3, 16, 16): class change"]
    record = report.to_dict()
    assert record["passed"] is False and record["runner"] == "onnxruntime (cpu)" and record["tolerance"] == "fp32"
    assert record["limits"] == FP32.to_dict() and record["error"] is None
    assert [c["passed"] for c in record["cases"]] == [True, False] and record["cases"][1]["failures"] == bad.failures
    assert record["cases"][1]["shape"] == [2, 3, 16, 16]
    good = ParityReport("r", "fp32", [ok])
    assert good.passed and bool(good) and good.failures() == [] and good.to_dict()["passed"] is True
    assert not ParityReport("r", "fp32", []).passed  # nothing compared is not a pass
    crashed = ParityReport("r", "fp32", [ok], error="runtime crashed")
    assert not crashed.passed and crashed.failures() == ["runtime crashed"]
    assert crashed.to_dict()["error"] == "runtime crashed"


def test_an_error_without_a_float64_reference_names_the_bound_that_would_pass():
    ref = torch.zeros(1, 2, 4, 4)
    ref[:, 0] = 0.5  # max |logit| 0.5: the max(1, .) floor sets the scale
    case = compare(ref + 2e-4, ref, FP32)
    assert case.atol == pytest.approx(1e-4) and case.max_abs_ref == 0.5
    assert case.failures == ["max abs error 0.0002 > 0.0001 against eager fp32 (no float64 reference): would pass "
                             "with a bound of 0.0002 x max(1, max |logit|)"]  # fmt: skip


def test_a_zero_noise_floor_suggests_only_atol():
    exact = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    exact[:, 0] = 3.0
    out = exact.float().clone()
    out[0, 0, 0, 0] += 0.01  # eager fp32 is exact here (floor 0): only --atol can help
    case = compare(out, exact.float(), FP32, exact=exact)
    assert case.noise_floor == 0.0 and len(case.failures) == 1
    message = case.failures[0]
    assert message.startswith("max error vs float64 0.01 > 3e-07 = 5 x noise floor 0 + 1e-07 x 3: would pass with --atol ")
    assert "--rtol" not in message and " x)" not in message


def test_an_error_failure_gives_both_options_and_the_floor_ratio():
    exact = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    exact[:, 0] = 2.0
    ref = exact.clone()
    ref[0, 0, 0, 0] += 1e-6
    out = exact.clone()
    out[0, 0, 0, 1] += 1e-4
    case = compare(out.float(), ref.float(), FP32, exact=exact)
    message = case.failures[0]
    floor = case.noise_floor
    assert floor > 0 and f"({case.max_err_fp64 / floor:.3g} x)" in message
    assert f"= 5 x noise floor {floor:.3g} + 1e-07 x 2: would pass with --rtol " in message and " or --atol " in message


def test_center_crop_takes_the_middle():
    target = torch.arange(6 * 8).reshape(1, 6, 8)
    assert torch.equal(center_crop(target, (2, 4)), target[..., 2:4, 2:6])
    assert torch.equal(center_crop(target, (6, 8)), target)
    assert torch.equal(center_crop(target, (3, 3)), target[..., 1:4, 2:5])  # odd margins round down on top/left
    assert center_crop(torch.zeros(2, 3, 10, 12), (4, 6)).shape == (2, 3, 4, 6)


def test_exact_runner_is_the_eager_fp32_models_float64_twin():
    model = random_milesial(width=8)
    twin = exact_runner(EagerRunner(model))
    assert isinstance(twin, EagerRunner) and twin.model is model and twin.precision == "fp64"
    assert twin.device == torch.device("cpu")
    assert exact_runner(EagerRunner(model, precision="bf16")) is None
    assert exact_runner(EagerRunner(model, channels_last=True)) is None
    assert exact_runner(Runner()) is None


class _Broken(Runner):
    name = "broken"

    def _activate_impl(self):
        pass

    def _infer_impl(self, x):
        raise RuntimeError("expected scalar type Double\n  but found   Float")


def test_a_model_that_cannot_run_in_float64_is_an_input_error_not_a_failure():
    with _Broken() as broken, pytest.raises(UserError) as err:
        _exact_logits(broken, torch.zeros(1, 3, 4, 4))
    assert str(err.value) == ("the eager model does not run in float64 (RuntimeError: expected scalar type Double but "
                              "found Float), so no artefact of it can be judged against the exact answer")  # fmt: skip


# --- the option value a failure suggests: the smallest 2-significant-digit value that passes -----

from unet_export.parity.gate import _error_failure, check_parity, loosest, seeded_inputs  # noqa: E402


def _suggested(message: str, option: str) -> float:
    return float(message.split(f"{option} ")[1].split()[0])


def _is_loosest(value: float, passes) -> bool:
    """``value`` passes, and one step down in its second significant digit does not (0: passes)."""
    if value == 0:
        return passes(0.0)
    exact = Decimal(repr(value))
    below = float(exact - Decimal(1).scaleb(exact.adjusted() - 1))  # in decimal: no float noise in the step
    return passes(value) and not passes(below)


import math  # noqa: E402
from decimal import Decimal  # noqa: E402


def _failing_case(err: float, scale: float) -> CaseResult:
    return CaseResult(shape=[1, 2, 4, 4], max_abs_err=err, max_err_fp64=err, max_abs_ref=scale, atol=0.0)


@pytest.mark.parametrize("err, scale", [(4e-4, 2.0), (0.015000000000000001, 1.5), (7e-3, 3.3)])
def test_without_float64_the_suggested_bound_is_the_loosest(err, scale):
    # (4e-4, 2): err is exactly 2e-4 x 2, which passes; (0.015.., 1.5): one ulp over 0.01 x 1.5,
    # so the first rounding fails and the value steps up
    message = _error_failure(_failing_case(err, scale), FP32, None)
    value = _suggested(message, "bound of")
    assert _is_loosest(value, lambda v: err <= v * scale), message


@pytest.mark.parametrize(
    "err, scale, floor",
    [
        (6.95, 1.5, 0.1),  # one ulp over 5 x 0.1 + 4.3 x 1.5: the --atol value steps up once
        (0.00010015000000000002, 1.5, 0.1),  # one ulp over 0.001 x 0.1 + 1e-7 x 1.5: --rtol steps
        (3.0, 4.0, 0.5),  # exactly 4 x 0.5 + 0.25 x 4 with rtol 1, atol 0.25 below
        (0.37, 2.5, 0.03),
    ],
)
def test_the_suggested_rtol_and_atol_are_the_loosest(err, scale, floor):
    tol = FP32 if err != 3.0 else Tolerance("fp32", rel_atol=0.25, max_disagreement=0.0, min_dice=None, rtol=1.0)
    rtol, atol = tol.rtol, tol.rel_atol
    message = _error_failure(_failing_case(err, scale), tol, floor)
    assert _is_loosest(_suggested(message, "--rtol"), lambda v: err <= v * floor + atol * scale), message
    assert _is_loosest(_suggested(message, "--atol"), lambda v: err <= rtol * floor + v * scale), message


def test_an_error_bound_without_rtol_says_zero_times_the_floor():
    tol = Tolerance("fp32", rel_atol=1e-3, max_disagreement=0.0, min_dice=None, rtol=None)
    message = _error_failure(_failing_case(0.5, 2.0), tol, 0.25)
    assert "= 0 x noise floor 0.25 + 0.001 x 2: would pass with --rtol " in message


@pytest.mark.parametrize("needed", [-1e-3, -5.0, 0.0])
def test_loosest_of_nothing_needed_is_zero(needed):
    assert loosest(needed, lambda v: v > 0) == 0.0  # returned as is, never stepped up


def test_loosest_of_an_infinite_need_is_infinite():
    assert loosest(math.inf, lambda v: True) == math.inf


def test_loosest_rounds_away_from_the_failing_side_even_when_nearer_would_pass():
    assert loosest(1.007e-4, lambda v: True) == 1.1e-4  # up: ceiling, not nearest
    assert loosest(1.03e-4, lambda v: True) == 1.1e-4
    assert loosest(0.998765, lambda v: True, up=False, digits=4) == 0.9987  # down: floor
    assert loosest(0.99871, lambda v: True, up=False, digits=4) == 0.9987


def test_loosest_steps_one_unit_at_a_time_until_it_passes():
    assert loosest(0.3, lambda v: v >= 0.3299) == pytest.approx(0.33, abs=1e-12)
    assert loosest(0.3, lambda v: v <= 0.2701, up=False) == pytest.approx(0.27, abs=1e-12)
    assert loosest(25.0, lambda v: v >= 27.5) == 28.0


def test_seeded_inputs_default_to_seed_0():
    shapes = [(1, 3, 4, 4)]
    assert torch.equal(seeded_inputs(shapes)[0], seeded_inputs(shapes, 0)[0])
    assert not torch.equal(seeded_inputs(shapes)[0], seeded_inputs(shapes, 1)[0])


class _Echo(Runner):
    """Returns its input as two-class logits: a runner with no float64 twin."""

    name = "echo"

    def _activate_impl(self):
        pass

    def _infer_impl(self, x):
        return torch.cat([x[:, :1], 1 - x[:, :1]], dim=1)

    def describe(self):
        return "identity"


def test_check_parity_against_a_reference_without_a_float64_twin():
    inputs = seeded_inputs([(1, 3, 8, 8)])
    with _Echo() as runner, _Echo() as reference:
        report = check_parity(runner, reference, inputs)
    assert report.passed and report.runner == "echo (identity)" and report.tolerance == "fp32"
    assert report.cases[0].reference == "eager fp32" and report.cases[0].shape == [1, 3, 8, 8]


def test_check_parity_leaves_an_active_float64_runner_active():
    model = random_milesial(width=8)
    inputs = seeded_inputs([(1, 3, 32, 32)])
    with EagerRunner(model) as reference, EagerRunner(model, "cpu", "fp64") as exact:
        report = check_parity(reference, reference, inputs, exact=exact)
        assert exact.is_active and report.cases[0].reference == "float64"
        assert report.tolerance == "fp32" and report.runner.startswith("eager (")


def test_a_float64_failure_message_is_cut_at_200_characters():
    class Loud(_Broken):
        def _infer_impl(self, x):
            raise RuntimeError("x" * 300)

    with Loud() as loud, pytest.raises(UserError) as err:
        _exact_logits(loud, torch.zeros(1, 3, 4, 4))
    assert "(RuntimeError: " + "x" * 200 + ")" in str(err.value)


def test_nan_output_is_named():
    ref = torch.zeros(1, 2, 2, 2)
    bad = ref.clone()
    bad[0, 0, 0, 0] = float("inf")
    assert compare(bad, ref, FP32).failures == ["output has NaN or Inf values"]


def test_a_tie_is_within_twice_the_allowed_error_not_more():
    # float32-exact logits (noise floor 0): the allowed error is 1e-7 x max(1, 1) = 1e-7
    exact = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    exact[0, 1] = 1.0  # three clear pixels of class 1
    exact[0, :, 0, 0] = torch.tensor([0.5, 0.5 + 2.0**-22], dtype=torch.float64)  # margin 2.4e-7: 2.4 x bound
    out = exact.float().clone()
    out[0, :, 0, 0] = torch.tensor([0.5 + 2.0**-22, 0.5])  # the artefact decides it the other way
    case = compare(out, exact.float(), FP32, exact=exact)
    assert case.noise_floor == 0.0 and case.atol == 1e-7
    assert case.differing_pixels == 1 and case.tie_pixels == 0 and case.argmax_disagreement == 0.25


def _dice_failure(dice: float) -> str:
    case = CaseResult(shape=[1, 2, 4, 4], dice_vs_eager=dice)
    from unet_export.parity.gate import _judge

    _judge(case, FP16, None)
    (failure,) = case.failures
    return failure


def test_the_suggested_min_dice_is_floored_at_four_digits():
    assert _dice_failure(0.99875).endswith("would pass with --min-dice 0.9987")
    assert _dice_failure(0.5).endswith("would pass with --min-dice 0.5")  # exactly representable: itself
    assert _dice_failure(0.5) == "Dice vs eager 0.50000 < 0.999: would pass with --min-dice 0.5"


def test_the_suggested_max_class_change_is_the_value_itself_when_it_is_short():
    case = CaseResult(shape=[1, 2, 4, 4], argmax_disagreement=0.25, dice_vs_eager=1.0)
    from unet_export.parity.gate import _judge

    _judge(case, FP16, None)
    assert case.failures == ["25.0000% of pixels change class, ties excluded (allowed 0.1000%): would pass with "
                             "--max-class-change 0.25"]  # fmt: skip


# The parity table and failure hints as printed: issue 14 pinned the proof value by value (these were tests/test_promises_core.py, section B).

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
    import unet_export.cli.render_export as render
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


# Issue 15: a rough edge a new user hit, reproduced before it was fixed (was tests/test_rough_edges.py).


def test_parity_table_keeps_the_input_column_whole_at_80_columns():
    from rich.console import Console

    from unet_export.cli.render import parity_table
    from unet_export.parity.gate import FP32, ParityReport, compare
    import torch

    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    cases = [compare(x.float(), x.float(), FP32, exact=x) for _ in range(2)]
    cases[0].shape, cases[1].shape = [1, 3, 256, 256], [2, 3, 250, 375]
    report = ParityReport("onnxruntime (cpu)", "fp32", cases, limits=FP32.to_dict())
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(parity_table(report))
    text = console.export_text()
    assert "1x3x256x256" in text and "2x3x250x375" in text
