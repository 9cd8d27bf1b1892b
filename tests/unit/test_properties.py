"""Property-based tests (hypothesis) of the pure functions: Dice, the parity comparison and its
tie rule, loosest(), latency statistics, the mask_values mapping and the input-size rules.

Where there is one, the reference is written out here (slow, pixel by pixel), not taken from the
code's own helpers. Examples are derandomised and no database is kept, so CI is reproducible."""

import contextlib
import functools
import math
import re
import statistics
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import Phase, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from unet_export.bench.run import latency_stats
from unet_export.checkpoint import class_mask_values
from unet_export.data.dataset import mask_to_classes
from unet_export.errors import UserError
from unet_export.metrics import dice_score
from unet_export.models import MODELS, create_model
from unet_export.models.sizes import SizeRule
from unet_export.predict import mask_to_image_array
from unet_export.parity.gate import FALLBACK_REL_ATOL, FP16, FP32, compare, loosest, tolerance_for

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None)
FEW = settings(FAST, max_examples=12, phases=[p for p in Phase if p is not Phase.explain])  # explain: slow on xfail


# --- 1. Dice -------------------------------------------------------------------------------------

MILESIAL_EPS = 1e-6  # utils/dice_score.py's epsilon, written out here so that a changed EPSILON shows


def reference_dice(pred: np.ndarray, target: np.ndarray, n_classes: int) -> float:
    """milesial's utils/dice_score.py, pixel by pixel in float64: per image and class
    (2|x∩y| + eps) / (|x| + |y| + eps), sets == 0 -> inter; background dropped when one-hot."""
    classes = [1] if n_classes == 1 else range(1, n_classes)
    scores = []
    for p_img, t_img in zip(pred, target):
        for k in classes:
            x, y = (p_img == k).ravel().tolist(), (t_img == k).ravel().tolist()
            inter = 2 * sum(a and b for a, b in zip(x, y))
            sets = sum(x) + sum(y)
            sets = inter if sets == 0 else sets
            scores.append((inter + MILESIAL_EPS) / (sets + MILESIAL_EPS))
    return sum(scores) / len(scores)


@st.composite
def mask_pairs(draw, n_classes=st.integers(1, 4)):
    """Two (N, H, W) index masks with the same shape, and the class count."""
    c = draw(n_classes)
    shape = draw(st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)))
    masks = hnp.arrays(np.int64, shape, elements=st.integers(0, max(c - 1, 1)))
    return draw(masks), draw(masks), c


@FAST
@given(mask_pairs())
def test_dice_matches_milesial_reference(pair):
    pred, target, c = pair
    # rel_tol: a miss scores eps / |y| (~1e-7), which an absolute tolerance could not tell from 0
    got = dice_score(torch.from_numpy(pred), torch.from_numpy(target), c)
    assert math.isclose(got, reference_dice(pred, target, c), rel_tol=1e-5, abs_tol=1e-12)


@FAST
@given(mask_pairs())
def test_dice_is_symmetric_and_bounded(pair):
    pred, target, c = pair
    forward = dice_score(torch.from_numpy(pred), torch.from_numpy(target), c)
    assert forward == dice_score(torch.from_numpy(target), torch.from_numpy(pred), c)
    assert 0.0 <= forward <= 1.0


@FAST
@given(mask_pairs())
def test_dice_of_a_mask_with_itself_is_one(pair):
    pred, _, c = pair
    assert dice_score(torch.from_numpy(pred), torch.from_numpy(pred), c) == 1.0


@FAST
@given(st.integers(1, 4), st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)))
def test_dice_of_empty_against_empty_is_one(c, shape):
    empty = torch.zeros(shape, dtype=torch.long)  # all background (multi-class) or all zero (one class)
    assert dice_score(empty, empty.clone(), c) == 1.0


# --- 2. compare(): class changes, ties and the verdict ------------------------------------------

TOLERANCES = [
    FP32,
    FP16,
    tolerance_for("fp32", rtol=0.0, atol=0.0),
    tolerance_for("fp32", rtol=50.0, atol=1e-3),
    tolerance_for("fp16", max_class_change=0.3, min_dice=0.5),
]


@st.composite
def logit_triples(draw):
    """(exact float64, ref float32, out float32) logits: exact on a coarse grid so that exact ties
    (margin 0) and near-ties occur; ref and out are exact plus noise of a drawn size."""
    n, c, h, w = draw(st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 3), st.integers(1, 4)))
    grid = hnp.arrays(np.int64, (n, c, h, w), elements=st.integers(-3, 3))
    noise = hnp.arrays(np.int64, (n, c, h, w), elements=st.integers(-2, 2))
    exact = draw(grid) * 0.25
    # weighted towards a floor of 0.05-0.1 and flips of 0.5-2: margins then fall on both sides of
    # the tie bound (5 x floor) and of twice it
    ref = exact + draw(noise) * draw(st.sampled_from([0.0, 1e-7, 1e-3, 0.05, 0.05, 0.05]))
    out = exact + draw(noise) * draw(st.sampled_from([0.0, 1e-6, 1e-3, 0.1, 1.0, 1.0, 1.0]))
    return torch.from_numpy(exact), torch.from_numpy(ref).float(), torch.from_numpy(out).float()


def decisions(x: np.ndarray) -> np.ndarray:
    return (x[:, 0] > 0).astype(np.int64) if x.shape[1] == 1 else x.argmax(axis=1)


def margins(x: np.ndarray) -> np.ndarray:
    if x.shape[1] == 1:
        return np.abs(x[:, 0])
    top = np.sort(x, axis=1)
    return top[:, -1] - top[:, -2]


@settings(FAST, max_examples=120)
@given(logit_triples(), st.sampled_from(TOLERANCES), st.booleans())
def test_compare_counts_class_changes_and_ties_as_documented(logits, tol, with_exact):
    exact, ref, out = logits
    o, r = out.numpy(), ref.numpy()
    if with_exact:
        target = exact.numpy()
        floor = float(np.abs(r.astype(np.float64) - target).max())
        scale = max(1.0, float(np.abs(target).max()))
        bound = (tol.rtol or 0.0) * floor + (tol.rel_atol or 0.0) * scale if tol.bounds_error else None
        # reduced precision: ties are what a correct FP32 artefact may flip
        tie_bound = bound if bound is not None else FP32.rtol * floor + FP32.rel_atol * scale
        err = float(np.abs(o.astype(np.float64) - target).max())
    else:  # no float64 reference: eager fp32 is taken as exact, with the fixed fallback bound
        target = r
        bound = FALLBACK_REL_ATOL * max(1.0, float(np.abs(r).max())) if tol.bounds_error else None
        tie_bound, err = bound, float(np.abs(o - r).max())
    differ = decisions(o) != decisions(target)
    ties = differ & (margins(target) <= 2 * tie_bound) if tie_bound is not None else np.zeros_like(differ)
    case = compare(out, ref, tol, exact=exact if with_exact else None)

    assert case.atol == bound
    assert case.differing_pixels == differ.sum()
    assert case.tie_pixels == ties.sum() <= case.differing_pixels
    assert case.argmax_disagreement * differ.size == pytest.approx(differ.sum() - ties.sum())
    kept = np.where(ties, decisions(target), decisions(o))  # ties are held against neither count nor Dice
    assert case.dice_vs_eager == pytest.approx(reference_dice(kept, decisions(target), out.shape[1]), abs=1e-6)
    broken = [
        bound is not None and err > bound,
        case.argmax_disagreement > tol.max_disagreement,
        tol.min_dice is not None and case.dice_vs_eager < tol.min_dice,
    ]
    assert len(case.failures) == sum(broken)
    assert case.passed == (not any(broken))


def significant_digits(value: float) -> int:
    return len(Decimal(repr(value)).normalize().as_tuple().digits)


@FAST
@given(st.floats(min_value=1e-300, max_value=1e300), st.booleans(), st.integers(1, 6))
def test_loosest_passes_is_on_the_safe_side_and_is_short(needed, up, digits):
    passes = (lambda v: needed <= v) if up else (lambda v: needed >= v)
    value = loosest(needed, passes, up=up, digits=digits)
    assert passes(value)
    assert value >= needed if up else value <= needed
    assert significant_digits(value) <= digits
    step = 10.0 ** (math.floor(math.log10(needed)) - digits + 1)  # one unit in the last kept digit
    assert abs(value - needed) <= step * (1 + 1e-9)


@FAST
@given(st.integers(1, 99), st.integers(-8, 1), st.sampled_from([0.0, 1e-6, 3e-4]), st.sampled_from([0.0, 5.0, 7.0]),
       st.integers(1, 20).map(float) | st.floats(1.0, 1e4))  # fmt: skip
def test_loosest_atol_suggestion_passes_the_error_rule(mantissa, exponent, floor, rtol, scale):
    # the --atol suggestion in verify._error_failure, at its hardest: the error is one ulp over what
    # a short bound allows, so (err - a) / scale rounds back to that bound, which fails
    short = mantissa * 10.0**exponent
    err = math.nextafter(rtol * floor + short * scale, math.inf)
    value = loosest((err - rtol * floor) / scale, lambda v: err <= rtol * floor + v * scale)
    assert err <= rtol * floor + value * scale
    assert value >= (err - rtol * floor) / scale
    assert significant_digits(value) <= 2


def test_loosest_of_a_finite_need_is_finite():  # rounding up 1.75e308 used to overflow to inf
    assert math.isfinite(loosest(1.75e308, lambda v: 1.75e308 <= v))


# --- 3. latency_stats ---------------------------------------------------------------------------


def linear_percentile(sorted_xs: list[float], p: float) -> float:
    """numpy's default ('linear', Hyndman & Fan type 7) percentile, by hand."""
    rank = (len(sorted_xs) - 1) * p / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (rank - lo) * (sorted_xs[hi] - sorted_xs[lo])


@FAST
@given(st.lists(st.floats(1e-3, 1e4), min_size=1, max_size=40), st.integers(1, 64))
def test_latency_stats_match_a_hand_computation(samples, batch):
    stats = latency_stats(samples, batch)
    lat, xs = stats["latency_ms"], sorted(samples)
    mean = math.fsum(samples) / len(samples)
    assert (lat["min"], lat["max"]) == (xs[0], xs[-1])
    assert lat["mean"] == pytest.approx(mean, rel=1e-12)
    for p in (50, 90, 99):
        assert lat[f"p{p}"] == pytest.approx(linear_percentile(xs, p), rel=1e-12)
    assert lat["p50"] == pytest.approx(statistics.median(samples), rel=1e-12)
    ordered = [lat[k] for k in ("min", "p50", "p90", "p99", "max")]
    assert all(a <= b * (1 + 1e-12) for a, b in zip(ordered, ordered[1:]))
    assert stats["img_per_s"] == pytest.approx(batch * 1000.0 / mean, rel=1e-12)
    assert stats["cv"] == pytest.approx(statistics.pstdev(samples) / mean, rel=1e-9, abs=1e-12)


# --- 4. mask_values: mask -> class index -> mask ------------------------------------------------

GREY_VALUES = st.lists(st.integers(0, 65535), min_size=1, max_size=6, unique=True)
RGB_VALUES = st.lists(st.tuples(*[st.integers(0, 255)] * 3), min_size=1, max_size=6, unique=True).map(
    lambda vs: [list(v) for v in vs]
)
WHERE = Path("mask.png")


def stored_dtype(values: list) -> np.dtype:
    return np.dtype(np.uint8 if np.max(values) <= 255 else np.uint16)  # as a PNG loads


@FAST
@given(st.data(), st.sampled_from([GREY_VALUES, RGB_VALUES]))
def test_mask_to_classes_and_back_is_the_identity(data, values_strategy):
    values = data.draw(values_strategy)
    h, w = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    picks = data.draw(hnp.arrays(np.int64, (h, w), elements=st.integers(0, len(values) - 1)))
    mask = np.array([[values[i] for i in row] for row in picks.tolist()], dtype=stored_dtype(values))
    classes = mask_to_classes(mask, values, WHERE)
    assert np.array_equal(classes, picks)  # class i <-> mask_values[i], whatever their order
    back = mask_to_image_array(classes, values)
    assert back.dtype == mask.dtype and np.array_equal(back, mask)


@FAST
@given(st.data(), st.sampled_from([GREY_VALUES, RGB_VALUES]))
def test_a_mask_value_outside_mask_values_is_named(data, values_strategy):
    values = data.draw(values_strategy)
    known = {tuple(v) if isinstance(v, list) else v for v in values}
    stray = data.draw(st.integers(0, 255) if isinstance(values[0], int) else st.tuples(*[st.integers(0, 255)] * 3))
    assume(stray not in known)
    mask = np.array([[values[0], list(stray) if isinstance(stray, tuple) else stray]], dtype=np.uint16)
    with pytest.raises(UserError, match=re.escape(f"mask value {list(stray) if isinstance(stray, tuple) else stray} ")):
        mask_to_classes(mask, values, WHERE)


@FAST
@given(st.integers(1, 8), st.data())
def test_default_mask_values_round_trip_every_class(n_classes, data):
    values = class_mask_values(None, n_classes)
    assert len(values) == len(set(values)) == max(n_classes, 2)  # what evaluate.py checks
    classes = data.draw(hnp.arrays(np.int64, (3, 4), elements=st.integers(0, max(n_classes, 2) - 1)))
    assert np.array_equal(mask_to_classes(mask_to_image_array(classes, values), values, WHERE), classes)


# --- 5. Input-size rules ------------------------------------------------------------------------


@st.composite
def size_rules(draw):
    """Rules of the registered kind: offset <= min (SizeRule's first() assumes k >= 0)."""
    multiple = draw(st.integers(1, 40))
    offset = draw(st.integers(0, 150))
    return SizeRule(min=offset + draw(st.integers(0, 100)), multiple=multiple, offset=offset)


def brute_accepted(rule: SizeRule, upto: int) -> list[int]:
    """The docstring's set: offset + multiple * k for k >= 0, at least min."""
    return [v for v in range(rule.offset, upto, rule.multiple) if v >= rule.min]


@FAST
@given(size_rules(), st.integers(1, 400))
def test_size_rule_helpers_agree_with_the_accepted_set(rule, size):
    accepted = brute_accepted(rule, size + rule.min + 2 * rule.multiple + 1)
    assert rule.accepts(size) == (size in accepted)
    assert rule.first() == accepted[0]
    assert rule.at_least(size) == min(v for v in accepted if v >= size)
    assert rule.fit(size) == max([v for v in accepted if v <= size], default=accepted[0])
    below, above = [v for v in accepted if v < size][-1:], [v for v in accepted if v > size][:1]
    assert sorted(set(rule.nearest(size))) == ([size] if size in accepted else below + above)


@FAST
@given(size_rules(), st.integers(1, 400), st.integers(1, 400))
def test_size_rule_check_refuses_with_the_nearest_sizes(rule, height, width):
    if rule.accepts(height) and rule.accepts(width):
        rule.check(height, width)
        return
    name, value = ("height", height) if not rule.accepts(height) else ("width", width)
    accepted = brute_accepted(rule, value + rule.min + 2 * rule.multiple + 1)
    near = [v for v in accepted if v < value][-1:] + [v for v in accepted if v > value][:1]
    with pytest.raises(UserError) as info:
        rule.check(height, width)
    assert str(info.value).startswith(f"{name} {value} does not fit")
    assert str(info.value).endswith("use " + " or ".join(map(str, near)))


# resnet50 and deeplabv3 are left out: fixed ResNet-50 widths (148M / 40M parameters) take seconds
# per forward. reflect-sigmoid is reflect's network with a sigmoid on top.
# reflect's rule once accepted 16, where the bottleneck is 1x1 and reflect padding needs at least 2
# pixels; this property found it.
SIZED_MODELS = ["milesial", "plain", "reflect", "valid", "valid-pad", "valid-same"]


@contextlib.contextmanager
def one_thread():
    # tiny convolutions: with the machine's cores busy, torch's thread pool is 25 x slower than one
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def tiny(name: str) -> tuple[torch.nn.Module, SizeRule]:
    torch.manual_seed(0)
    model = create_model(name, width=2)
    spec = MODELS[name]
    return model, spec.sizes(spec.defaults | {"width": 2})


@pytest.mark.parametrize("name", SIZED_MODELS)
@FEW
@given(st.tuples(st.integers(0, 3), st.just(0) | st.integers(-12, 12)),
       st.tuples(st.integers(0, 3), st.just(0) | st.integers(-12, 12)))
def test_model_runs_exactly_on_the_sizes_its_rule_accepts(name, hk, wk):
    # sizes k steps above the rule's first, half of them on the rule's grid and half off it
    model, rule = tiny(name)
    h, w = (max(1, rule.first() + rule.multiple * k + d) for k, d in (hk, wk))
    x = torch.rand(1, model.n_channels, h, w)
    if rule.accepts(h) and rule.accepts(w):
        with torch.no_grad(), one_thread():
            y = model(x)
        assert y.shape == (1, model.n_classes, h - rule.shrink, w - rule.shrink)
    else:
        # the model's own input check, not a shape error deep inside
        with pytest.raises(ValueError), one_thread():
            model(x)
        with pytest.raises(UserError, match=r"does not fit this model .*: use \d+"):
            rule.check(h, w)


def test_reflect_runs_at_the_smallest_size_its_rule_accepts():
    model, rule = tiny("reflect")
    assert rule.first() == 32 and not rule.accepts(16)
    with torch.no_grad(), one_thread():
        assert model(torch.rand(1, 3, 32, 64)).shape[-2:] == (32, 64)


def test_a_recorded_size_rule_keeps_only_its_own_fields():
    """A manifest's size_rule also records the artefact's ``static`` (and a newer or edited one
    may hold more): the rule takes its four fields, as ints, and ignores the rest."""
    record = {"min": 124, "multiple": "16", "offset": 124, "shrink": 184, "static": True, "future": 1}
    assert SizeRule.from_record(record) == SizeRule(124, 16, 124, 184)
    assert SizeRule.from_record(SizeRule(32, 32).to_dict() | {"static": False}) == SizeRule(32, 32)
