import torch

from unet_export.verify import FP16, FP32, compare, seeded_inputs


def logits(seed=0, shape=(2, 3, 32, 48), scale=5.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_identical_outputs_pass():
    ref = logits()
    case = compare(ref.clone(), ref, FP32)
    assert case.passed and case.max_abs_err == 0 and case.dice_vs_eager == 1.0


def test_error_above_tolerance_fails_and_names_the_tolerance_that_would_pass():
    ref = logits()
    out = ref + 1e-2
    case = compare(out, ref, FP32)
    assert not case.passed
    assert case.atol == 1e-4 * ref.abs().max().item()
    assert "would pass with rel_atol" in case.failures[0]


def test_changed_classes_fail_fp32_and_are_counted():
    ref = logits()
    out = ref.clone()
    out[:, 0, :4, :4] += 100.0  # force class 0 on a 4x4 corner of each image
    case = compare(out, ref, FP32)
    changed = (out.argmax(1) != ref.argmax(1)).sum().item()
    assert changed > 0 and case.differing_pixels == changed and case.tie_pixels == 0
    assert not case.passed and any("change class" in f for f in case.failures)
    assert case.dice_vs_eager < 1.0


def test_near_ties_within_tolerance_are_not_held_against_the_artefact():
    ref = logits()
    ref[0, 0, 0, 0], ref[0, 1, 0, 0], ref[0, 2, 0, 0] = 1.0, 1.0 + 1e-6, -3.0  # eager itself is undecided
    out = ref.clone()
    out[0, 0, 0, 0] += 2e-6
    case = compare(out, ref, FP32)
    assert case.differing_pixels == 1 and case.tie_pixels == 1
    assert case.passed


def test_fp16_tolerance_allows_a_few_changed_pixels_but_not_many():
    ref = logits(shape=(1, 2, 100, 100))
    few, many = ref.clone(), ref.clone()
    few[0, 0, 0, :5] = ref[0, 1, 0, :5] + 50  # 5 of 10,000 pixels
    many[0, 0, :10, :] = ref[0, 1, :10, :] + 50  # 1,000 of 10,000
    assert compare(few, ref, FP16).passed
    assert not compare(many, ref, FP16).passed


def test_shape_mismatch_and_nan_fail():
    ref = logits()
    assert "shape" in compare(ref[:, :, :16], ref, FP32).failures[0]
    bad = ref.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert "NaN" in compare(bad, ref, FP32).failures[0]


def test_seeded_inputs_are_reproducible_images():
    a, b = seeded_inputs([(1, 3, 8, 8), (2, 3, 5, 7)], seed=3), seeded_inputs([(1, 3, 8, 8), (2, 3, 5, 7)], seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[1].shape == (2, 3, 5, 7) and 0 <= a[0].min() and a[0].max() <= 1
