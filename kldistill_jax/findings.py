"""The paper's claims as paired effects on a seeded study (`report.Study`), each with a 95% interval and a
verdict from that interval (`stats.verdict`): "agrees", "disagrees" or "inconclusive", never one draw.

A claim compares matched runs (same seed, same held-out problems): e.g. KL direction pairs each reverse-KL
cell with the forward-KL cell of the same prefix source and length, and its effect is the mean over those
pairs of (reverse - forward). Each finding names the sign the paper predicts before looking at the numbers.
"""

import dataclasses
import itertools

import numpy as np

from kldistill_jax import report, stats

METHOD = ("Each claim is a paired effect (the named difference, averaged over the matched pairs of runs) with "
          "its 95% interval from the hierarchical bootstrap over seeds and problems; the verdict is "
          "**agrees** when the interval lies on the side of 0 the paper predicts, **disagrees** when it lies "
          "on the other side, **inconclusive** when it contains 0. With few seeds the interval roughly spans "
          "the per-seed effects: a verdict needs every seed to point the same way. Disagreements are reported, "
          "not tuned away.")

NOT_RUN = "not run"


@dataclasses.dataclass
class Finding:
  short: str  # a label for plots
  claim: str  # the paper's claim as this study tests it
  metric: str  # accuracy | entropy | accuracy gain
  contrast: str  # what the effect subtracts, e.g. "reverse - forward"
  expected: int  # the sign of the effect the claim predicts (+1 / -1)
  interval: stats.Interval | None  # the effect; None: the study lacks the runs to say
  measured: str  # the per-pair numbers

  @property
  def verdict(self) -> str:
    return NOT_RUN if self.interval is None else stats.verdict(self.interval, self.expected)

  @property
  def effect(self) -> str:
    if self.interval is None:
      return "-"
    return (f"{self.metric}, {self.contrast} = {self.interval.format()} (predicted "
            f"{'> 0' if self.expected > 0 else '< 0'})")


def _mean(row, metric, when="after"):
  """Mean over seeds of `metric` (each seed's ratio over its problems)."""
  return stats.contrast([report.arm(getattr(row, when), metric)], (1.0,))


def _matching(rows, **labels):
  return [r for r in rows if all(r.labels.get(k) == v for k, v in labels.items())]


def _pairs(rows, key, first, second, *, over):
  """[(values of the `over` labels, row with key=first, row with key=second)] for every combination of the
  `over` labels where both rows exist: the matched comparisons of one design axis."""
  out = []
  for combo in itertools.product(*[sorted({r.labels[k] for r in rows if k in r.labels}) for k in over]):
    fixed = dict(zip(over, combo))
    a, b = _matching(rows, **fixed, **{key: first}), _matching(rows, **fixed, **{key: second})
    if a and b:
      out.append((combo, a[0], b[0]))
  return out


def _paired(short, claim, metric, expected, pairs, label, names):
  """The finding names[1] - names[0] (second row - first row) averaged over `pairs`, each pair's own numbers
  and effect in `measured`."""
  contrast = f"{names[1]} - {names[0]}"
  if not pairs:
    return Finding(short, claim, metric, contrast, expected, None, "the study has none of these runs")
  interval = report.effect([s for _, _, s in pairs], [f for _, f, _ in pairs], metric)
  measured = "; ".join(
      f"{label(key)}: {names[0]} {_mean(first, metric):.3f} / {names[1]} {_mean(second, metric):.3f}, "
      f"{report.effect([second], [first], metric).format()}" for key, first, second in pairs)
  return Finding(short, claim, metric, contrast, expected, interval, f"{metric} {measured}")


def _direction(rows, estimators, tag):
  """KL direction claims on `rows` (cells): reverse - forward per (prefix, length)."""
  pairs = _pairs(rows, "kl", "forward", "reverse", over=("prefix", "length"))
  label = lambda k: f"{k[0]} prefixes L{k[1]}"  # noqa: E731
  names = ("forward", "reverse")
  return [
      _paired(f"KL direction{tag}: entropy", f"KL direction ({estimators}): reverse KL ends with lower entropy "
              "than forward KL (same prefixes, same length)", "entropy", -1, pairs, label, names),
      _paired(f"KL direction{tag}: accuracy", f"KL direction ({estimators}): reverse KL gives higher accuracy "
              "than forward KL (same prefixes, same length)", "accuracy", +1, pairs, label, names)]


def _gain(row) -> str:
  """'from <init>: before -> after, gain g [lo, hi]' of one GRPO row (accuracy)."""
  gain = stats.bootstrap([report.arm(row.after, "accuracy"), report.arm(row.before, "accuracy")], (1.0, -1.0),
                         **report.BOOTSTRAP)
  return (f"from {row.labels['init']}: {_mean(row, 'accuracy', 'before'):.3f} -> {_mean(row, 'accuracy'):.3f}, "
          f"gain {gain.format()}")


def _grpo(study):
  grpo = study.group("grpo")
  forward = [r for r in grpo if r.labels.get("kl") == "forward"]
  reverse = [r for r in grpo if r.labels.get("kl") == "reverse"]
  claim = ("GRPO gains more from the forward-KL student than from the reverse-KL student (the best RL start is "
           "not the sharpest distilled student)")
  contrast = "gain from forward - gain from reverse"
  if not (forward and reverse):
    return Finding("GRPO: gain fwd - rev", claim, "accuracy", contrast, +1, None,
                   "the study has no GRPO run from a forward-KL and a reverse-KL student")
  # the difference of gains is linear in the four per-seed numbers: each row after and before is an arm
  arms = [report.arm(getattr(r, when), "accuracy") for rows in (forward, reverse) for when in ("after", "before")
          for r in rows]
  nf, nr = len(forward), len(reverse)
  weights = [1 / nf] * nf + [-1 / nf] * nf + [-1 / nr] * nr + [1 / nr] * nr
  interval = stats.bootstrap(arms, weights, **report.BOOTSTRAP)
  before = report.effect(forward, reverse, "accuracy", "before")
  after = report.effect(forward, reverse, "accuracy", "after")
  measured = ("; ".join(_gain(r) for r in forward + reverse) +
              f"; forward - reverse student before GRPO {before.format()}, after {after.format()}")
  return Finding("GRPO: gain fwd - rev", claim, "accuracy", contrast, +1, interval, measured)


def findings(study) -> list:
  """The paper's claims, each as a paired effect on this study's numbers."""
  cells = study.group("cells")
  out = _direction(cells, "/".join(sorted({r.labels.get("estimator", "?") for r in cells})) + " estimator", "")
  # the paper's own estimator choice: the long-length cells with each preset's estimator (sampled reverse KL)
  arm = study.group("estimator")
  if arm and {r.run for r in arm} != {r.run for r in cells if r.labels["length"] == arm[0].labels["length"]}:
    estimators = "/".join(sorted({r.labels["estimator"] for r in arm}))
    out += _direction(arm, f"each cell's {estimators} estimator, long length", " (preset estimators)")

  pairs = _pairs(cells, "prefix", "teacher", "student", over=("kl", "length"))
  found = _paired("Prefix source: accuracy", "Prefix source: student (on-policy) prefixes give higher accuracy "
                  "than teacher prefixes at matched steps", "accuracy", +1, pairs, lambda k: f"{k[0]} KL L{k[1]}",
                  ("teacher", "student"))
  flops = "; ".join(f"{kl} L{n} FLOPs teacher / student prefixes {np.mean(t.flops):.2e} / {np.mean(s.flops):.2e}"
                    for (kl, n), t, s in pairs)
  found.measured += f"; {flops}" if flops else ""
  out.append(found)

  lengths = sorted({r.labels["length"] for r in cells})
  if len(lengths) == 2:
    short, long = lengths
    pairs = _pairs(cells, "length", short, long, over=("cell",))
    names = (f"L{short}", f"L{long}")
    out.append(_paired("Training length: accuracy", f"Training length: the long length L{long} gives higher "
                       f"accuracy than L{short} (same cell)", "accuracy", +1, pairs, lambda k: k[0], names))
    on_policy_reverse = [p for p in pairs if p[1].labels["kl"] == "reverse" and p[1].labels["prefix"] == "student"]
    out.append(_paired("Training length: opd entropy", f"Training length: on-policy reverse KL at the long length "
                       f"L{long} ends with lower entropy than at L{short} (collapse)", "entropy", -1,
                       on_policy_reverse, lambda k: k[0], names))

  mixing = study.group("mixing")
  heavy = [r for r in mixing if 0.0 < r.labels["lam"] < 0.5]
  for pure_lam, direction in ((1.0, "reverse"), (0.0, "forward")):
    pure = [r for r in mixing if r.labels["lam"] == pure_lam]
    pairs = [((r.labels["lam"],), pure[0], r) for r in heavy] if pure else []
    out.append(_paired(f"Mixing vs {direction}: accuracy", "Forward-heavy KL mixing (reverse weight 0 < lam < 0.5) "
                       f"gives higher accuracy than pure {direction} KL at the long length", "accuracy", +1, pairs,
                       lambda k: f"lam={k[0]:g}", (f"pure {direction}", "mixed")))

  curriculum = study.group("curriculum")
  fixed = [r for r in curriculum if not r.labels.get("curriculum")]
  for gated in [r for r in curriculum if r.labels.get("curriculum")]:
    relative = "h_min_relative" in gated.labels
    h_min = (f"h_min = {gated.labels['h_min_relative']:g} x the teacher's held-out entropy" if relative
             else f"h_min = {gated.labels.get('h_min', '?')}")
    found = _paired(f"Curriculum ({'relative' if relative else 'fixed'} h_min): accuracy", "The entropy-gated "
                    f"length curriculum ({h_min}) gives higher accuracy than the fixed long length", "accuracy", +1,
                    [((gated.name,), fixed[0], gated)] if fixed else [], lambda k: k[0],
                    ("fixed length", "curriculum"))
    paths = [" -> ".join(str(d["length"]) for d in c.get("history", [])) + f" (h_min {c.get('h_min', np.nan):.3f})"
             for c in gated.curriculum]
    found.measured += "; stage lengths per seed: " + ", ".join(paths)
    out.append(found)

  out.append(_grpo(study))
  return out
