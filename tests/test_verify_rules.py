"""verify.py's records and messages, pinned value by value (the gate's arithmetic is in
test_verify.py and test_promises_core.py; `make mutation` runs these against mutants)."""

import pytest
import torch

from unet_export.demo import random_milesial
from unet_export.errors import UserError
from unet_export.metrics import center_crop
from unet_export.runners import EagerRunner
from unet_export.runners.base import Runner
from unet_export.verify import (
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
    assert TOLERANCES == {"fp32": FP32, "fp16": FP16, "bf16": FP16, "int8": FP16}


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
    assert half == Tolerance("fp16", rel_atol=None, max_disagreement=0.01, min_dice=0.99, rtol=None)
    assert tolerance_from_record({"rtol": 1.0}, "fp32").max_disagreement == FP32.max_disagreement
    assert tolerance_from_record(None, "fp32") is FP32 and tolerance_from_record({}, "bf16") is FP16
    assert tolerance_from_record(None, "unknown") is FP16
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
    assert tolerance_for("bf16", max_class_change=0.5) == Tolerance("fp16", None, 0.5, 0.999)
    assert tolerance_for("int8", min_dice=0.9, rtol=3.0) == Tolerance("fp16", None, 1e-3, 0.9)
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
