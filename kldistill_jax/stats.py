"""Intervals and verdicts for a seeded study: pure numpy functions of per-seed, per-problem numbers.

A study measures every run on held-out problems in each of several seeds. One number of one run is a ratio
over problems, sum(num) / sum(den): Avg@n is correct samples / samples, entropy is summed entropy / tokens,
mean length is tokens / samples. Its value in a study is the mean over seeds of that ratio.

    arm = [(num_seed0, den_seed0), (num_seed1, den_seed1), ...]     # one run, [P] arrays per seed
    interval = bootstrap([arm_a, arm_b], weights=(1, -1))             # paired effect a - b, 95% interval
    verdict(interval, expected=+1)                                    # "agrees" | "disagrees" | "inconclusive"

The interval is a hierarchical (two-level) percentile bootstrap: each draw resamples the seeds with
replacement, then within each drawn seed the problems with replacement, and evaluates the contrast
sum_i w_i * mean_seeds(ratio_i). Contrasts are paired: every arm uses the same drawn seeds and problems, so
what the runs share (a hard problem, a lucky seed's data order) cancels in a difference. Both levels matter:
seeds carry the training noise (init, data order, sampling), problems the finite held-out set. With 3 seeds
the seed level has few distinct draws, so the interval roughly spans the per-seed effects widened by the
problem noise: a verdict needs every seed to point the same way.
"""

import dataclasses

import numpy as np

AGREES, DISAGREES, INCONCLUSIVE = "agrees", "disagrees", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Interval:
  """`estimate` is the statistic on the data as measured; [low, high] its bootstrap interval at `level`."""
  estimate: float
  low: float
  high: float
  level: float = 0.95

  def format(self, digits=3) -> str:
    return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def _check_arms(arms):
  """The arms as float arrays [(num [P_s], den [P_s]) per seed] per arm, with matching seeds and problems."""
  if not arms:
    raise ValueError("need at least one arm")
  seeds = len(arms[0])
  if seeds == 0:
    raise ValueError("an arm needs at least one seed")
  out = []
  for i, arm in enumerate(arms):
    if len(arm) != seeds:
      raise ValueError(f"arm {i} has {len(arm)} seeds, arm 0 has {seeds}: contrasts pair seeds")
    pairs = []
    for s, (num, den) in enumerate(arm):
      num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
      if num.ndim != 1 or num.shape != den.shape or num.size == 0:
        raise ValueError(f"arm {i} seed {s}: num and den must be non-empty [problems] arrays of one shape, "
                         f"got {num.shape} and {den.shape}")
      if num.size != np.asarray(arms[0][s][0]).size:
        raise ValueError(f"arm {i} seed {s} has {num.size} problems, arm 0 has {np.asarray(arms[0][s][0]).size}:"
                         " contrasts pair problems")
      if np.any(den < 0) or den.sum() <= 0:
        raise ValueError(f"arm {i} seed {s}: den must be >= 0 with a positive sum")
      pairs.append((num, den))
    out.append(pairs)
  return out


def ratio(num, den) -> float:
  """sum(num) / sum(den): the metric over one seed's problems."""
  return float(np.sum(num) / np.sum(den))


def contrast(arms, weights) -> float:
  """sum_i weights[i] * (mean over seeds of arm i's ratio), on the data as given."""
  arms = _check_arms(arms)
  return float(sum(w * np.mean([ratio(n, d) for n, d in arm]) for w, arm in zip(weights, arms)))


def replicates(arms, weights, *, draws=2000, seed=0) -> np.ndarray:
  """[draws] bootstrap values of `contrast`: seeds resampled, then problems within each drawn seed, the same
  indices for every arm (paired). Deterministic for a given `seed` (numpy's PCG64)."""
  arms = _check_arms(arms)
  weights = np.asarray(weights, np.float64)
  if weights.shape != (len(arms),):
    raise ValueError(f"need one weight per arm ({len(arms)}), got {weights.shape}")
  rng = np.random.default_rng(seed)
  num_seeds = len(arms[0])
  drawn = rng.integers(0, num_seeds, size=(draws, num_seeds))  # [B, k]: which seed fills each slot
  per_slot = np.zeros((draws, num_seeds, len(arms)))  # each slot's ratio per arm
  for s in range(num_seeds):
    chosen = drawn == s
    problems = arms[0][s][0].size
    index = rng.integers(0, problems, size=(int(chosen.sum()), problems))  # P problems per such slot
    nums = np.stack([arm[s][0] for arm in arms], axis=1)  # [P, A]
    dens = np.stack([arm[s][1] for arm in arms], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample with sum(den) = 0 has no ratio: NaN
      per_slot[chosen] = nums[index].sum(1) / dens[index].sum(1)
  return per_slot.mean(axis=1) @ weights


def bootstrap(arms, weights=(1.0,), *, level=0.95, draws=2000, seed=0) -> Interval:
  """The contrast and its percentile interval at `level` from `replicates` (NaN draws are dropped)."""
  if not 0 < level < 1:
    raise ValueError(f"level must lie in (0, 1), got {level}")
  values = replicates(arms, weights, draws=draws, seed=seed)
  values = values[np.isfinite(values)]
  low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
  return Interval(contrast(arms, weights), float(low), float(high), level)


def verdict(interval: Interval, expected: int) -> str:
  """`expected` is the sign the claim predicts (+1 or -1). The interval decides, never the estimate alone:
  entirely on the predicted side of 0 -> agrees, entirely on the other side -> disagrees, else inconclusive."""
  if expected not in (1, -1):
    raise ValueError(f"expected must be +1 or -1, got {expected}")
  if interval.low > 0:
    side = 1
  elif interval.high < 0:
    side = -1
  else:
    return INCONCLUSIVE
  return AGREES if side == expected else DISAGREES


def combine(verdicts) -> str:
  """A claim made of several parts: disagrees if any part does, agrees only if every part does."""
  verdicts = list(verdicts)
  if not verdicts:
    raise ValueError("no verdicts to combine")
  if DISAGREES in verdicts:
    return DISAGREES
  return AGREES if all(v == AGREES for v in verdicts) else INCONCLUSIVE


@dataclasses.dataclass(frozen=True)
class Spread:
  """One run's metric in a study: its interval over seeds x problems, the standard deviation of the
  per-seed values (ddof 1; NaN with one seed) and the per-problem standard deviation (of num/den per
  problem within a seed, averaged over seeds): how much the problems themselves differ."""
  interval: Interval
  seed_sd: float
  problem_sd: float


def spread(arm, *, level=0.95, draws=2000, seed=0) -> Spread:
  checked = _check_arms([arm])[0]
  per_seed = [ratio(n, d) for n, d in checked]
  with np.errstate(invalid="ignore", divide="ignore"):
    problem_sd = float(np.mean([np.nanstd(n / d) for n, d in checked]))
  seed_sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan")
  return Spread(bootstrap([arm], (1.0,), level=level, draws=draws, seed=seed), seed_sd, problem_sd)
