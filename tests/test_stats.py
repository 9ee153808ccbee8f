"""stats: the hierarchical paired bootstrap and the verdict rule against hand-computed cases."""

import numpy as np
import pytest

from kldistill_jax import stats


def _arm(*seeds, den=1.0):
  """An arm from per-seed lists of per-problem values (den 1 each: the ratio is the plain mean)."""
  return [(np.asarray(v, float), np.full(len(v), den)) for v in seeds]


def test_one_seed_two_problems_bootstrap_is_the_exact_distribution():
  # resampling {0, 1} twice: mean 0 w.p. 1/4, 1/2 w.p. 1/2, 1 w.p. 1/4; the 95% interval is [0, 1]
  values = stats.replicates([_arm([0, 1])], (1.0,), draws=20000, seed=3)
  fractions = [np.mean(values == v) for v in (0.0, 0.5, 1.0)]
  np.testing.assert_allclose(fractions, [0.25, 0.5, 0.25], atol=0.015)
  interval = stats.bootstrap([_arm([0, 1])], draws=20000)
  assert (interval.estimate, interval.low, interval.high) == (0.5, 0.0, 1.0)


def test_two_level_variance_matches_the_formula():
  # T = mean of k slots; each slot draws a seed uniformly, then P problems of it with replacement:
  # Var T = (1/k) [ (1/k) sum_s (m_s - m)^2 + (1/k) sum_s v_s / P ]  (v_s: population variance of seed s)
  seeds = [[0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]]
  k, p = len(seeds), len(seeds[0])
  means, variances = np.mean(seeds, axis=1), np.var(seeds, axis=1)
  expected = (np.mean((means - means.mean()) ** 2) + np.mean(variances) / p) / k
  values = stats.replicates([_arm(*seeds)], (1.0,), draws=40000, seed=1)
  assert abs(values.mean() - means.mean()) < 0.005
  assert values.var() == pytest.approx(expected, rel=0.04)


def test_ratio_metrics_and_the_estimate():
  # entropy-like ratio: sum(num)/sum(den) per seed, then the mean over seeds
  arm = [(np.array([1.0, 3.0]), np.array([2.0, 2.0])), (np.array([2.0]), np.array([8.0]))]
  assert stats.contrast([arm], (1.0,)) == pytest.approx((4 / 4 + 2 / 8) / 2)


def test_paired_effect_cancels_what_the_runs_share():
  # a = b + 0.1 on every problem, problems spread over [0, 0.9]: the paired interval is exactly the shift
  rng = np.random.default_rng(0)
  base = [rng.uniform(0, 0.9, size=50) for _ in range(3)]
  a, b = _arm(*[x + 0.1 for x in base]), _arm(*base)
  interval = stats.bootstrap([a, b], (1.0, -1.0))
  assert interval.estimate == pytest.approx(0.1)
  assert interval.low == pytest.approx(0.1) and interval.high == pytest.approx(0.1)
  assert stats.verdict(interval, +1) == stats.AGREES
  assert stats.verdict(interval, -1) == stats.DISAGREES


def test_a_null_effect_is_inconclusive():
  # per-seed effects a - b: +0.25, -0.25, 0
  a = _arm([1, 1, 0, 0] * 5, [1, 0] * 10, [1, 0, 1, 0] * 5)
  b = _arm([1, 0, 0, 0] * 5, [1, 1, 1, 0] * 5, [0, 1, 0, 1] * 5)
  interval = stats.bootstrap([a, b], (1.0, -1.0))
  assert interval.low < 0 < interval.high
  assert stats.verdict(interval, +1) == stats.verdict(interval, -1) == stats.INCONCLUSIVE
  # identical arms: the interval is [0, 0], which is no effect either way
  same = stats.bootstrap([a, a], (1.0, -1.0))
  assert (same.low, same.high) == (0.0, 0.0) and stats.verdict(same, +1) == stats.INCONCLUSIVE


def test_one_seed_against_the_others_makes_it_inconclusive():
  # two seeds show a clear +0.5, the third a clear -0.5: seeds disagree, so no verdict
  a = _arm([1] * 20, [1] * 20, [0] * 20)
  b = _arm([0.5] * 20, [0.5] * 20, [0.5] * 20)
  interval = stats.bootstrap([a, b], (1.0, -1.0))
  assert interval.estimate == pytest.approx(1 / 6)
  assert stats.verdict(interval, +1) == stats.INCONCLUSIVE


def test_the_bootstrap_seed_fixes_the_draws():
  a, b = _arm([1, 0, 1, 1], [0, 1, 1, 0]), _arm([0, 0, 1, 0], [1, 1, 0, 0])
  first = stats.replicates([a, b], (1.0, -1.0), draws=200, seed=7)
  np.testing.assert_array_equal(first, stats.replicates([a, b], (1.0, -1.0), draws=200, seed=7))
  assert not np.array_equal(first, stats.replicates([a, b], (1.0, -1.0), draws=200, seed=8))


def test_combine_and_spread():
  assert stats.combine([stats.AGREES, stats.AGREES]) == stats.AGREES
  assert stats.combine([stats.AGREES, stats.INCONCLUSIVE]) == stats.INCONCLUSIVE
  assert stats.combine([stats.AGREES, stats.DISAGREES]) == stats.DISAGREES
  spread = stats.spread(_arm([0, 1, 0, 1], [1, 1, 1, 1]))
  assert spread.interval.estimate == pytest.approx(0.75)
  assert spread.seed_sd == pytest.approx(np.std([0.5, 1.0], ddof=1))
  assert spread.problem_sd == pytest.approx((0.5 + 0.0) / 2)


@pytest.mark.parametrize("arms,match", [
    ([_arm([1, 0]), _arm([1, 0], [1, 0])], "arm 1 has 2 seeds, arm 0 has 1"),
    ([_arm([1, 0]), _arm([1, 0, 1])], "arm 1 seed 0 has 3 problems, arm 0 has 2"),
    ([[(np.array([1.0]), np.array([0.0]))]], "den must be >= 0 with a positive sum"),
])
def test_unpaired_inputs_are_refused(arms, match):
  with pytest.raises(ValueError, match=match):
    stats.bootstrap(arms, [1.0] * len(arms))


def test_verdict_needs_a_sign():
  with pytest.raises(ValueError, match="expected must be"):
    stats.verdict(stats.Interval(0.1, 0.05, 0.2), 0)
