"""Run-level statistics: t intervals, the hierarchical bootstrap, and verdicts against a margin."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from phds.experiment.stats import Ratio, compare_runs, hierarchical_bootstrap, t_interval, verdict


def shares(values) -> Ratio:
    values = np.asarray(values, dtype=float)
    return Ratio(values, np.ones_like(values))


def test_t_interval_matches_the_textbook_formula():
    values = [0.10, 0.25, 0.13, 0.31]
    mean, low, high = t_interval(values, 0.95)
    half = scipy_stats.t.ppf(0.975, 3) * np.std(values, ddof=1) / 2
    assert mean == pytest.approx(np.mean(values))
    assert (low, high) == pytest.approx((np.mean(values) - half, np.mean(values) + half))


def test_one_run_has_no_interval_and_so_no_verdict():
    mean, low, high = t_interval([0.4])
    assert (mean, low, high) == (0.4, None, None)
    assert verdict(low, high, margin=0.05) == "inconclusive"


@pytest.mark.parametrize(
    ("low", "high", "margin", "expected"),
    [
        (0.01, 0.05, 0.02, "better"),
        (-0.01, 0.03, 0.02, "non-inferior"),
        (-0.015, -0.005, 0.02, "non-inferior"),  # significantly behind, but by less than the margin
        (-0.09, -0.03, 0.02, "worse"),
        (-0.05, 0.04, 0.02, "inconclusive"),  # too wide: never read as "no difference"
        (-0.01, 0.01, 0.0, "inconclusive"),
    ],
)
def test_verdicts_follow_the_declared_margin(low, high, margin, expected):
    assert verdict(low, high, margin) == expected


def test_differences_are_oriented_so_that_positive_favours_the_reference():
    ref = {0: shares([1, 1, 0, 0]), 1: shares([1, 1, 1, 0])}
    other = {0: shares([1, 0, 0, 0]), 1: shares([1, 1, 0, 0])}
    higher = compare_runs(ref, other, higher_is_better=True, margin=0.1)
    assert higher.per_seed == pytest.approx([0.25, 0.25]) and higher.verdict == "better"
    lower = compare_runs(ref, other, higher_is_better=False, margin=0.1)  # as if these were losses
    assert lower.per_seed == pytest.approx([-0.25, -0.25]) and lower.verdict == "worse"


def test_perplexity_is_compared_as_mean_nll_per_token():
    ref = {0: Ratio(np.array([2.0, 4.0]), np.array([2.0, 2.0]))}  # 1.5 nats per token
    other = {0: Ratio(np.array([3.0, 5.0]), np.array([2.0, 2.0]))}  # 2.0 nats per token
    difference = compare_runs(ref, other, higher_is_better=False, margin=0.1)
    assert difference.per_seed == pytest.approx([0.5])


def test_an_untrained_arm_pairs_its_one_run_with_every_seed():
    base = shares([1, 0, 0, 0])
    ref = {0: shares([1, 1, 0, 0]), 1: shares([1, 1, 1, 0]), 2: shares([1, 0, 0, 0])}
    difference = compare_runs(ref, {s: base for s in ref}, higher_is_better=True, margin=0.0)
    assert difference.seeds == [0, 1, 2] and difference.per_seed == pytest.approx([0.25, 0.5, 0.0])


def test_hierarchical_bootstrap_includes_the_variance_between_runs():
    rng = np.random.default_rng(0)
    n = 400
    # Within each run the two arms differ by exactly +0.1 on every item's probability, but the runs disagree:
    # the item-level noise is small, the seed-level spread is large.
    offsets = [-0.2, 0.0, 0.25, -0.1, 0.3]
    ref, other = [], []
    for offset in offsets:
        base = rng.random(n) < 0.5
        ref.append(shares(base.astype(float) + offset + 0.1))
        other.append(shares(base.astype(float) + offset))
    low, high = hierarchical_bootstrap(ref, other, n_resamples=500)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)  # the paired difference is the same in every run
    # Unpaired in spirit: comparing each run with another seed's run of the other arm shows the seed spread.
    shuffled = other[1:] + other[:1]
    low, high = hierarchical_bootstrap(ref, shuffled, n_resamples=500)
    assert high - low > 0.2


def test_hierarchical_bootstrap_needs_the_same_items_in_every_run():
    with pytest.raises(ValueError, match="same items"):
        hierarchical_bootstrap([shares([1, 0])], [shares([1, 0, 1])])


def test_bootstrap_interval_surrounds_the_mean_difference_of_noisy_runs():
    rng = np.random.default_rng(1)
    ref = [shares(rng.random(300) < 0.7) for _ in range(4)]
    other = [shares(rng.random(300) < 0.6) for _ in range(4)]
    difference = compare_runs(
        dict(enumerate(ref)), dict(enumerate(other)), higher_is_better=True, margin=0.02, method="bootstrap"
    )
    assert difference.low < difference.mean < difference.high
    assert difference.mean == pytest.approx(np.mean([r.value() - o.value() for r, o in zip(ref, other, strict=True)]))
    assert difference.method == "bootstrap" and difference.verdict == "better"
