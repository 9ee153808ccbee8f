"""The study's figures, each drawn on given matplotlib Axes (the notebook's way) or saved as PNGs.

Points are means over seeds with 95% bootstrap intervals as error bars (`report.Study.interval`); training curves
are means over seeds with the per-seed range as a band (2-3 seeds: the range, not an interval).
"""

import pathlib

import numpy as np

from kldistill_jax import findings as findings_lib, stats

TITLES = {"effects": "Findings: paired effects with 95% intervals",
          "accuracy_vs_entropy": "Accuracy vs entropy",
          "training_curves": "Entropy and length over training (top: steps; bottom: FLOPs)",
          "mixing": "The KL-mixing sweep",
          "grpo": "Before and after GRPO",
          "accuracy_vs_flops": "Accuracy vs FLOPs"}
PLOTS = tuple(TITLES)

_GROUP_MARKERS = {"cells": "o", "estimator": "D", "mixing": "s", "curriculum": "^", "grpo": "*"}
_VERDICT_COLORS = {stats.AGREES: "tab:green", stats.DISAGREES: "tab:red", stats.INCONCLUSIVE: "tab:gray"}


def _by_run(study):
  """[(first row, label)]: one point per run; entries that share a run share its point and label."""
  names, first = {}, {}
  for r in study.rows:
    names.setdefault(r.run, []).append(r.name)
    first.setdefault(r.run, r)
  return [(first[run], " = ".join(labels)) for run, labels in names.items()]


def _errorbar(ax, x, y, label=None, **kwargs):
  """A point at the means with its intervals as error bars; x, y: stats.Spread or a plain number."""
  def parts(v):
    if isinstance(v, stats.Spread):
      i = v.interval
      return i.estimate, [[i.estimate - i.low], [i.high - i.estimate]]
    return v, None
  (xv, xerr), (yv, yerr) = parts(x), parts(y)
  ax.errorbar(xv, yv, xerr=xerr, yerr=yerr, fmt=kwargs.pop("fmt", "o"), capsize=2, label=label, **kwargs)
  return xv, yv


def plot_effects(study, ax, found=None):
  """Every finding's effect with its interval, coloured by verdict, against 0 (a forest plot)."""
  found = [f for f in (found or findings_lib.findings(study)) if f.interval is not None]
  for i, f in enumerate(found):
    interval = f.interval
    ax.errorbar(interval.estimate, i, xerr=[[interval.estimate - interval.low], [interval.high - interval.estimate]],
                fmt="o", capsize=3, color=_VERDICT_COLORS[f.verdict])
    ax.annotate(f"{f.verdict} (predicted {'+' if f.expected > 0 else '-'})", (interval.high, i), fontsize=6,
                xytext=(4, -2), textcoords="offset points")
  ax.axvline(0.0, color="black", lw=0.8)
  ax.set_yticks(range(len(found)), [f.short for f in found], fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("paired effect (mean over seeds) with 95% interval")
  ax.set_title("findings against the paper")


def plot_accuracy_vs_entropy(study, ax):
  for r, label in _by_run(study):
    x, y = _errorbar(ax, study.interval(r.after, "entropy"), study.interval(r.after, "accuracy"),
                     fmt=_GROUP_MARKERS[r.group], ms=6, elinewidth=0.8)
    ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
  for name, results in (("teacher", study.teacher), ("base", study.base)):
    x, y = _errorbar(ax, study.interval(results, "entropy"), study.interval(results, "accuracy"), fmt="x",
                     color="black", ms=7)
    ax.annotate(name, (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
  ax.set_xscale("log")  # the base model sits an order of magnitude above the distilled students
  ax.set_xlabel("mean per-token entropy (nats, log scale), held-out samples")
  ax.set_ylabel("accuracy (Avg@n)")
  ax.set_title("accuracy vs entropy (mean over seeds, 95% intervals)")


def _curve(records, key):
  """{step: (value, FLOPs so far)} of one run's metrics.jsonl records that carry `key`."""
  return {m["step"]: (m[key], m.get("student_flops", 0.0) + m.get("teacher_flops", 0.0)) for m in records
          if key in m}


def _band(ax, curves, key, x, label):
  """Mean over seeds at the steps every seed logged, with the per-seed min-max as a band."""
  per_seed = [_curve(c, key) for c in curves]
  steps = sorted(set.intersection(*[set(c) for c in per_seed])) if per_seed else []
  if not steps:
    return
  values = np.array([[c[s][0] for s in steps] for c in per_seed])
  xs = steps if x == "step" else np.mean([[c[s][1] for s in steps] for c in per_seed], axis=0)
  line, = ax.plot(xs, values.mean(0), marker=".", label=label)
  ax.fill_between(xs, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)


def _curve_key(row, kind):
  probe = {"entropy": "probe_entropy", "length": "probe_length"}[kind]
  if all(any(probe in m for m in curve) for curve in row.curves):
    return probe
  return {"entropy": "rollout_entropy", "length": "response_length"}[kind]


def plot_training_curves(study, axes, x="step"):
  """Entropy and length of the student's own samples over training (probe metrics when logged, else the
  rollout's), distillation runs at the long length; x = "step" or "flops"."""
  long = max(r.labels.get("length", 0) for r in study.rows)
  seen = set()
  for r in study.rows:
    if r.group not in ("cells", "estimator", "curriculum") or r.labels.get("length") != long or r.run in seen:
      continue
    seen.add(r.run)
    for ax, kind in zip(axes, ("entropy", "length")):
      _band(ax, r.curves, _curve_key(r, kind), x, r.name)
  for ax, kind in zip(axes, ("entropy (nats/token)", "response length (tokens)")):
    ax.set_xlabel("step" if x == "step" else "FLOPs (student + teacher)")
    ax.set_ylabel(kind)
    if x == "flops":
      ax.set_xscale("log")
  axes[0].legend(fontsize=6)
  axes[0].set_title("student entropy over training (mean, seed range)")
  axes[1].set_title("student length over training (mean, seed range)")


def plot_mixing(study, ax):
  """Accuracy and entropy against the reverse-KL weight lam at the long length, with 95% intervals."""
  mixing = sorted(study.group("mixing"), key=lambda r: r.labels["lam"])
  twin = ax.twinx()
  for r in mixing:
    _errorbar(ax, r.labels["lam"], study.interval(r.after, "accuracy"), color="tab:blue")
    _errorbar(twin, r.labels["lam"], study.interval(r.after, "entropy"), fmt="s", color="tab:orange")
  lams = [r.labels["lam"] for r in mixing]
  ax.plot(lams, [study.interval(r.after, "accuracy").interval.estimate for r in mixing], color="tab:blue",
          label="accuracy")
  twin.plot(lams, [study.interval(r.after, "entropy").interval.estimate for r in mixing], color="tab:orange",
            label="entropy")
  ax.set_xlabel("lam (reverse-KL weight; 0 = forward, 1 = reverse)")
  ax.set_ylabel("accuracy (Avg@n)", color="tab:blue")
  twin.set_ylabel("entropy (nats/token)", color="tab:orange")
  ax.set_title("KL mixing at the long length (mean over seeds, 95% intervals)")


def plot_grpo(study, axes):
  """Pre/post-GRPO accuracy per starting student (95% intervals), and the reward over GRPO steps."""
  rows = study.group("grpo")
  for shift, when, label in ((-0.2, "before", "before GRPO"), (0.2, "after", "after GRPO")):
    spreads = [study.interval(getattr(r, when), "accuracy").interval for r in rows]
    axes[0].bar([x + shift for x in range(len(rows))], [i.estimate for i in spreads], width=0.4, label=label,
                yerr=[[i.estimate - i.low for i in spreads], [i.high - i.estimate for i in spreads]], capsize=3)
  axes[0].set_xticks(list(range(len(rows))), [r.labels.get("init", r.name) for r in rows], fontsize=7)
  axes[0].set_ylabel("accuracy (Avg@n)")
  axes[0].set_title("GRPO from distilled students (mean over seeds, 95% intervals)")
  axes[0].legend(fontsize=7)
  for r in rows:
    _band(axes[1], r.curves, "reward", "step", r.labels.get("init", r.name))
  axes[1].set_xlabel("GRPO step")
  axes[1].set_ylabel("mean reward of the rollouts")
  axes[1].legend(fontsize=7)


def plot_accuracy_vs_flops(study, ax):
  for r, label in _by_run(study):
    x, y = _errorbar(ax, float(np.mean(r.total_flops)), study.interval(r.after, "accuracy"),
                     fmt=_GROUP_MARKERS[r.group], ms=6)
    ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("FLOPs from the base model (student + teacher; GRPO includes its distillation; mean over seeds)")
  ax.set_ylabel("accuracy (Avg@n)")
  ax.set_title("accuracy vs compute (95% intervals)")


def save_plots(study, directory, found=None):
  """Every figure as a PNG in `directory`; returns {name: path}."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  paths = {}

  def save(name, fig):
    fig.tight_layout()
    paths[name] = directory / f"{name}.png"
    fig.savefig(paths[name], dpi=110)
    plt.close(fig)

  fig, ax = plt.subplots(figsize=(10, 6))
  plot_effects(study, ax, found)
  save("effects", fig)
  fig, ax = plt.subplots(figsize=(7, 5))
  plot_accuracy_vs_entropy(study, ax)
  save("accuracy_vs_entropy", fig)
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  plot_training_curves(study, axes[0], x="step")
  plot_training_curves(study, axes[1], x="flops")
  save("training_curves", fig)
  fig, ax = plt.subplots(figsize=(7, 4))
  plot_mixing(study, ax)
  save("mixing", fig)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  plot_grpo(study, axes)
  save("grpo", fig)
  fig, ax = plt.subplots(figsize=(7, 5))
  plot_accuracy_vs_flops(study, ax)
  save("accuracy_vs_flops", fig)
  return paths
