"""The parity gate (unet_export/parity/gate.py) decides "verified": its arithmetic, the FP32 bound,
ties, every rule alone on both sides of its threshold, and the tolerances and their records."""

import math
from dataclasses import replace

import pytest
import torch

from unet_export.flows.demo import random_milesial
from unet_export.errors import UserError
from unet_export.runtimes import EagerRunner
from unet_export.parity.gate import (
    FALLBACK_REL_ATOL,
    FP16,
    FP32,
    Tolerance,
    check_parity,
    compare,
    loosest,
    seeded_inputs,
    tolerance_for,
    tolerance_from_record,
)


def logits(seed=0, shape=(2, 3, 32, 48), scale=5.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def noisy(exact, size, seed=1):
    """``exact`` plus uniform noise of at most ``size``, in float32 (as a runtime would return it)."""
    gen = torch.Generator().manual_seed(seed)
    return (exact + (torch.rand(exact.shape, generator=gen, dtype=torch.float64) * 2 - 1) * size).float()


def test_identical_outputs_pass():
    exact = logits()
    ref = exact.float()
    case = compare(ref.clone(), ref, FP32, exact=exact)
    assert case.passed and case.max_abs_err == 0 and case.dice_vs_eager == 1.0
    assert case.reference == "float64" and case.max_err_fp64 == case.noise_floor
    assert case.floor_ratio == pytest.approx(1.0)


def test_error_is_judged_against_float64_in_units_of_the_noise_floor():
    exact = logits()
    eager = noisy(exact, 1e-5)
    floor = (eager.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    within = compare(noisy(exact, 3e-5, seed=2), eager, FP32, exact=exact)
    assert within.passed and within.noise_floor == floor
    assert within.atol == pytest.approx(FP32.rtol * floor + FP32.rel_atol * scale)
    beyond = compare(noisy(exact, 2e-4, seed=2), eager, FP32, exact=exact)
    assert not beyond.passed and beyond.floor_ratio > FP32.rtol


def test_failure_names_the_loosest_tolerance_that_passes_never_the_one_in_force():
    exact = logits()
    eager = noisy(exact, 1e-5)
    out = noisy(exact, 2e-4, seed=2)
    case = compare(out, eager, FP32, exact=exact)
    message = case.failures[0]
    assert "would pass with --rtol" in message and "--atol" in message
    rtol = float(message.split("--rtol ")[1].split()[0])
    atol = float(message.split("--atol ")[1].split()[0])
    assert rtol > FP32.rtol and atol > FP32.rel_atol
    assert compare(out, eager, tolerance_for("fp32", rtol=rtol), exact=exact).passed
    assert compare(out, eager, tolerance_for("fp32", atol=atol), exact=exact).passed
    # rounded up at two significant digits: one step lower fails
    assert not compare(out, eager, tolerance_for("fp32", rtol=rtol - 10 ** (len(str(int(rtol))) - 2)), exact=exact).passed


@pytest.mark.parametrize(
    "needed, expected",
    [(1.007e-4, 1.1e-4), (1.1e-4, 1.1e-4), (10.07, 11.0), (99.2, 100.0), (3.0e-7, 3.0e-7), (0.0123456, 0.013)],
)
def test_loosest_rounds_up_at_two_significant_digits(needed, expected):
    assert loosest(needed, lambda v: v >= needed) == pytest.approx(expected, rel=1e-12)


def test_loosest_rounds_a_minimum_down():
    assert loosest(0.998765, lambda v: v <= 0.998765, up=False, digits=4) == pytest.approx(0.9987)


def test_changed_classes_fail_fp32_and_are_counted():
    exact = logits()
    ref = exact.float()
    out = ref.clone()
    out[:, 0, :4, :4] += 100.0  # force class 0 on a 4x4 corner of each image
    case = compare(out, ref, FP32, exact=exact)
    changed = (out.argmax(1) != exact.argmax(1)).sum().item()
    assert changed > 0 and case.differing_pixels == changed and case.tie_pixels == 0
    assert not case.passed and any("change class" in f for f in case.failures)
    assert case.dice_vs_eager < 1.0


def test_near_ties_in_float64_are_not_held_against_the_artefact():
    exact = logits()
    exact[0, 0, 0, 0], exact[0, 1, 0, 0], exact[0, 2, 0, 0] = 1.0, 1.0 + 1e-7, -3.0  # the exact answer is undecided
    ref = exact.float()
    out = ref.clone()
    out[0, 0, 0, 0] += 2e-7
    case = compare(out, ref, FP32, exact=exact)
    assert case.differing_pixels == 1 and case.tie_pixels == 1
    assert case.passed, case.failures


def _two_class(foreground_rows: int, size: int = 100) -> torch.Tensor:
    """float64 logits of a 1 x size x size image: class 1 (margin 2) on the top rows, class 0 below."""
    exact = torch.full((1, 2, size, size), -1.0, dtype=torch.float64)
    exact[0, 1, :foreground_rows] = exact[0, 0, foreground_rows:] = 1.0
    return exact


def _flip_to_class_0(exact: torch.Tensor, n: int) -> torch.Tensor:
    out = exact.float().clone()
    out[0, 0].view(-1)[:n] = 5.0  # the first n pixels of row 0 (class 1 in float64) become class 0
    return out


def test_fp16_gate_passes_a_few_class_changes_on_a_large_class():
    exact = _two_class(90)
    case = compare(_flip_to_class_0(exact, 5), exact.float(), FP16, exact=exact)
    assert case.passed, case.failures
    assert case.argmax_disagreement == 5 / 10_000 and case.dice_vs_eager >= FP16.min_dice


def test_fp16_gate_fails_on_class_changes_alone():
    """0.15% of pixels change class (allowed 0.1%) while Dice stays above 0.999: only that rule fails."""
    exact = _two_class(90)
    many = _flip_to_class_0(exact, 15)
    case = compare(many, exact.float(), FP16, exact=exact)
    assert case.atol is None and case.max_err_fp64 > 1
    changed = (many.argmax(1) != exact.argmax(1)).double().mean().item()
    assert case.argmax_disagreement == changed == 15 / 10_000
    assert case.dice_vs_eager >= FP16.min_dice
    assert len(case.failures) == 1 and "change class" in case.failures[0]
    needed = float(case.failures[0].split("--max-class-change ")[1])
    assert changed <= needed < changed * 1.1 and needed > FP16.max_disagreement
    assert compare(many, exact.float(), tolerance_for("fp16", max_class_change=needed), exact=exact).passed


def test_fp16_gate_fails_on_dice_alone():
    """5 of 10,000 pixels change class (0.05%, allowed 0.1%), all of a 100-pixel class: Dice
    190/195 < 0.999 fails on its own."""
    exact = _two_class(1)
    few = _flip_to_class_0(exact, 5)
    case = compare(few, exact.float(), FP16, exact=exact)
    assert case.argmax_disagreement == 5 / 10_000 <= FP16.max_disagreement
    assert case.dice_vs_eager == pytest.approx(190 / 195, abs=1e-6)
    assert len(case.failures) == 1 and "Dice vs eager" in case.failures[0]
    needed = float(case.failures[0].split("--min-dice ")[1])
    assert case.dice_vs_eager - 1e-4 <= needed <= case.dice_vs_eager
    assert compare(few, exact.float(), tolerance_for("fp16", min_dice=needed), exact=exact).passed


def test_fp16_gate_excludes_float64_ties():
    exact = logits(shape=(1, 2, 100, 100))
    tie = exact.clone()
    tie[0, 0, 5:20, :] = tie[0, 1, 5:20, :] + 1e-9  # 1,500 pixels the float64 model cannot decide
    flipped = tie.float().clone()
    flipped[0, 1, 5:20, :] = tie[0, 0, 5:20, :].float() + 1e-6
    tied = compare(flipped, tie.float(), FP16, exact=tie)
    assert tied.tie_pixels == tied.differing_pixels == 1500 and tied.argmax_disagreement == 0
    assert tied.passed and tied.dice_vs_eager == 1.0  # ties count against neither check


def test_without_float64_the_fixed_bound_against_eager_is_the_fallback():
    ref = logits().float()
    case = compare(ref + 1e-2, ref, FP32)
    assert not case.passed and case.reference == "eager fp32" and case.max_err_fp64 is None
    assert case.atol == FALLBACK_REL_ATOL * ref.abs().max().item()
    assert "no float64 reference" in case.failures[0] and "would pass with" in case.failures[0]


def test_shape_mismatch_and_nan_fail():
    ref = logits().float()
    assert "shape" in compare(ref[:, :, :16], ref, FP32).failures[0]
    bad = ref.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert "NaN" in compare(bad, ref, FP32, exact=ref.double()).failures[0]


def test_check_parity_runs_the_eager_model_in_float64_itself():
    model = random_milesial(width=8)
    inputs = seeded_inputs([(1, 3, 32, 32), (2, 3, 40, 24)])
    with EagerRunner(model) as reference, EagerRunner(model, channels_last=True) as other:
        report = check_parity(other, reference, inputs)
    assert report.passed and report.limits == FP32.to_dict()
    for case, x in zip(report.cases, inputs):
        assert case.shape == list(x.shape) and case.reference == "float64"
        assert 0 < case.noise_floor < 1e-6 and case.floor_ratio < 3
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left alone
    with EagerRunner(model, "cpu", "fp64") as exact:
        assert exact.infer(inputs[0]).dtype == torch.float64


def test_user_tolerances_set_their_own_gate_and_are_checked():
    assert tolerance_for("fp32", rtol=20, max_class_change=0.5) == Tolerance("fp32", FP32.rel_atol, 0.0, None, 20)
    half = tolerance_for("fp16", rtol=20, min_dice=0.99)
    assert (half.rtol, half.min_dice, half.max_disagreement) == (None, 0.99, FP16.max_disagreement)
    for bad in (dict(rtol=-1), dict(atol=float("nan")), dict(min_dice=1.5)):
        with pytest.raises(UserError, match="must be a finite number"):
            tolerance_for("fp32", **bad)
    recorded = tolerance_for("fp32", rtol=12, atol=1e-5).to_dict()
    assert tolerance_from_record(recorded, "fp32") == Tolerance("fp32", 1e-5, 0.0, None, 12)
    assert tolerance_from_record(None, "bf16") == replace(FP16, name="bf16")  # the rule says its own precision


def test_seeded_inputs_are_reproducible_images():
    shapes = [(1, 3, 32, 32), (2, 3, 25, 37)]
    a, b, other = seeded_inputs(shapes, seed=3), seeded_inputs(shapes, seed=3), seeded_inputs(shapes, seed=4)
    assert [tuple(x.shape) for x in a] == shapes and all(x.dtype == torch.float32 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # the same seed, the same images
    assert not any(torch.equal(x, y) for x, y in zip(a, other))  # another seed, other images
    for x in a:  # images in [0, 1], spread over it (uniform: mean 0.5, std 0.29), not a constant
        assert 0 <= x.min() and x.max() <= 1
        assert x.min() < 0.05 and x.max() > 0.95 and 0.4 < x.mean() < 0.6 and x.std() > 0.2
        assert x.unique().numel() > x.numel() // 2
    assert not torch.equal(a[0][0, :, :25, :32], a[1][0, :, :25, :32])  # each shape its own image


class Float32Only(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        if x.dtype != torch.float32:
            raise TypeError("float32 kernels only")
        return self.conv(x)


def test_a_model_that_cannot_run_in_float64_is_an_input_error_not_a_failed_artefact():
    model = Float32Only()
    with EagerRunner(model) as reference, EagerRunner(model, channels_last=True) as other:
        with pytest.raises(UserError, match="does not run in float64 .*float32 kernels only"):
            check_parity(other, reference, seeded_inputs([(1, 3, 8, 8)]))


# The FP32 bound, ties and each gate rule alone: issue 14 pinned the proof value by value (these were tests/test_promises_core.py, section A1-A4).

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


def test_each_input_records_the_checks_it_was_put_to_and_which_failed():
    """CaseResult.checks (what JUnit reports one test case per check from): every check that ran,
    in order, and each failed one's message is its failure line."""
    exact = _two_class(90)
    case = compare(_flip_to_class_0(exact, 15), exact.float(), FP16, exact=exact)
    assert case.checks == {"output": True, "class change": False, "Dice": True}
    assert case.failed_checks() == {"class change": case.failures[0]}
    fp32 = compare(noisy(logits(), 1e-3), logits().float(), FP32, exact=logits())
    assert list(fp32.checks) == ["output", "error vs float64", "class change"] and not fp32.checks["error vs float64"]
    assert fp32.failed_checks()["error vs float64"].startswith("max error vs float64")
    assert compare(logits().float(), logits().float(), FP32, exact=logits()).checks == dict.fromkeys(
        ["output", "error vs float64", "class change"], True)  # fmt: skip
    nan = compare(torch.full((1, 3, 4, 4), float("nan")), logits(shape=(1, 3, 4, 4)).float(), FP32)
    assert nan.checks == {"output": False} and nan.failed_checks() == {"output": "output has NaN or Inf values"}
    # A record from before checks were kept: its failures under one "parity" check.
    old = replace(case, checks={})
    assert old.failed_checks() == {"parity": case.failures[0]}
