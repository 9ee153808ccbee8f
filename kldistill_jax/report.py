"""Reads a study workdir (`train.study`) and writes report.md: one table, the plots (PNG), the findings.

    study = report.load(workdir)       # entries with their results, training curves, teacher, base
    report.write_report(workdir)       # report.md + plots/*.png
    report.plot_accuracy_vs_entropy(study, ax)   # each figure on a matplotlib Axes (the notebook's way)

Numbers come only from files the runs wrote: results.json (held-out evaluation after training, FLOPs)
and metrics.jsonl (training curves). Findings state each claim of the paper as a measurable comparison,
the measured numbers, and whether this study agrees; nothing is tuned or filtered to agree.
"""

import dataclasses
import itertools
import json
import math
import pathlib

from kldistill_jax.errors import MissingFileError
from kldistill_jax.train import study as study_lib
from kldistill_jax.train.metrics import read_metrics

PLOTS = ("accuracy_vs_entropy", "training_curves", "grpo", "accuracy_vs_flops")


@dataclasses.dataclass
class Row:
  """One report entry with its numbers. after/before: evaluation dicts (accuracy = Avg@n, pass_at_k, ...)."""
  name: str
  group: str
  run: str
  labels: dict
  after: dict
  before: dict
  flops: float  # student + teacher FLOPs of this run (GRPO: RL only; see total_flops)
  total_flops: float  # FLOPs to produce this model from the base (GRPO: its distillation run's + its own)
  curve: list  # metrics.jsonl records


@dataclasses.dataclass
class Study:
  rows: list
  teacher: dict
  base: dict
  workdir: pathlib.Path
  samples_per_prompt: int  # n of Avg@n

  def row(self, name):
    for r in self.rows:
      if r.name == name:
        return r
    return None

  def group(self, group):
    return [r for r in self.rows if r.group == group]


def _flops(results):
  """Training compute of a run: its `eval_flops` (evaluations, probes, the curriculum's entropy checks) is
  left out, as the report's text says."""
  return float(results["flops"]["student_flops"] + results["flops"]["teacher_flops"])


def load(workdir) -> Study:
  """The study in `workdir` (its study.json, runs/*/results.json and metrics.jsonl)."""
  workdir = pathlib.Path(workdir)
  entries, runs = study_lib.read_plan(workdir)
  results, rows, teacher = {}, [], None
  for name in runs:
    path = workdir / "runs" / name / "results.json"
    if not path.is_file():
      raise MissingFileError(f"{path}: run {name!r} of the study has no results yet; rerun the study to "
                             "finish it")
    results[name] = json.loads(path.read_text())
    teacher = teacher or results[name].get("teacher")
  for e in entries:
    r = results[e.run]
    after = r.get("student after") or r["policy after"]
    before = r.get("student before") or r["policy before"]
    total = _flops(r) + (_flops(results[runs[e.run].init_from]) if runs[e.run].init_from else 0.0)
    rows.append(Row(e.name, e.group, e.run, dict(e.labels), after, before, _flops(r), total,
                    read_metrics(workdir / "runs" / e.run)))
  base = json.loads((workdir / "runs" / "base" / "results.json").read_text())["base"]
  config = json.loads((workdir / "study.json").read_text())["config"]
  return Study(rows, teacher, base, workdir, int(config["eval"]["samples_per_prompt"]))


def _pass_keys(study):
  keys = {k for r in study.rows for k in r.after if k.startswith("pass_at_") and k != "pass_at_1"}
  return sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]))


def table(study) -> str:
  """Markdown table: one line per entry, plus the teacher and the shared base model."""
  pass_keys = _pass_keys(study)
  header = (["entry", "group", f"Avg@{study.samples_per_prompt}"] + [f"Pass@{k.rsplit('_', 1)[1]}" for k in pass_keys]
            + ["mean length", "entropy", "truncated", "FLOPs (run)", "FLOPs (from base)"])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

  def line(name, group, result, run_flops, total_flops):
    cells = [name, group, f"{result['accuracy']:.3f}"] + [f"{result.get(k, float('nan')):.3f}" for k in pass_keys]
    cells += [f"{result['mean_length']:.1f}", f"{result['entropy']:.3f}", f"{result['truncation_rate']:.3f}",
              run_flops, total_flops]
    lines.append("| " + " | ".join(cells) + " |")

  line("teacher", "-", study.teacher, "-", "-")
  line("base student", "-", study.base, "-", "-")
  for r in study.rows:
    line(r.name, r.group, r.after, f"{r.flops:.2e}", f"{r.total_flops:.2e}")
  return "\n".join(lines)


def group_table(study) -> str:
  """Markdown table of Avg@n per held-out group (the built-in task's difficulty = number of terms, or each
  benchmark file), one line per entry."""
  groups = sorted({g for r in study.rows for g in r.after.get("by_group", {})}, key=lambda g: (len(g), g))
  header = ["entry"] + [f"{g} (n={study.rows[0].after['by_group'][g]['num_problems']})" for g in groups]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, result in [("teacher", study.teacher), ("base student", study.base)] + [(r.name, r.after)
                                                                                    for r in study.rows]:
    by_group = result.get("by_group", {})
    lines.append("| " + " | ".join([name] + [f"{by_group[g]['accuracy']:.3f}" if g in by_group else "-"
                                             for g in groups]) + " |")
  return "\n".join(lines)


# --- plots: each draws on the given Axes --------------------------------------------------------------

_GROUP_MARKERS = {"cells": "o", "mixing": "s", "curriculum": "^", "grpo": "*"}


def _by_run(study):
  """[(first row, label)]: one point per run; entries that share a run share its point and label."""
  names, first = {}, {}
  for r in study.rows:
    names.setdefault(r.run, []).append(r.name)
    first.setdefault(r.run, r)
  return [(first[run], " = ".join(labels)) for run, labels in names.items()]


def plot_accuracy_vs_entropy(study, ax):
  for r, label in _by_run(study):
    ax.scatter(r.after["entropy"], r.after["accuracy"], marker=_GROUP_MARKERS[r.group], s=60)
    ax.annotate(label, (r.after["entropy"], r.after["accuracy"]), fontsize=6, xytext=(3, 3),
                textcoords="offset points")
  for name, result in (("teacher", study.teacher), ("base", study.base)):
    ax.scatter(result["entropy"], result["accuracy"], marker="x", color="black", s=60)
    ax.annotate(name, (result["entropy"], result["accuracy"]), fontsize=7, xytext=(3, -9),
                textcoords="offset points")
  ax.set_xscale("log")  # the base model sits an order of magnitude above the distilled students
  ax.set_xlabel("mean per-token entropy (nats, log scale), held-out samples")
  ax.set_ylabel("accuracy (Avg@n)")
  ax.set_title("accuracy vs entropy")


def _curve(rows, key):
  points = [(m["step"], m[key], m.get("student_flops", 0.0) + m.get("teacher_flops", 0.0))
            for m in rows if key in m]
  return points


def _curve_key(row):
  return "probe_entropy" if any("probe_entropy" in m for m in row.curve) else "rollout_entropy"


def plot_training_curves(study, axes, x="step"):
  """Entropy and length of the student's own samples over training (probe metrics when logged, else the
  rollout's), distillation runs at the long length; x = "step" or "flops"."""
  rows = [r for r in study.rows if r.group in ("cells", "curriculum") and r.labels.get("length") == max(
      row.labels.get("length", 0) for row in study.rows)]
  seen = set()
  for r in rows:
    if r.run in seen:
      continue
    seen.add(r.run)
    for ax, kind in zip(axes, ("entropy", "length")):
      key = _curve_key(r) if kind == "entropy" else ("probe_length" if any("probe_length" in m for m in r.curve)
                                                    else "response_length")
      points = _curve(r.curve, key)
      if points:
        xs = [p[0] if x == "step" else p[2] for p in points]
        ax.plot(xs, [p[1] for p in points], label=r.name, marker=".")
  for ax, kind in zip(axes, ("entropy (nats/token)", "response length (tokens)")):
    ax.set_xlabel("step" if x == "step" else "FLOPs (student + teacher)")
    ax.set_ylabel(kind)
    if x == "flops":
      ax.set_xscale("log")
  axes[0].legend(fontsize=6)
  axes[0].set_title("student entropy over training")
  axes[1].set_title("student length over training")


def plot_grpo(study, axes):
  """Pre/post-GRPO accuracy per starting student, and the reward over GRPO steps."""
  rows = study.group("grpo")
  names = [r.labels.get("init", r.name) for r in rows]
  xs = range(len(rows))
  axes[0].bar([x - 0.2 for x in xs], [r.before["accuracy"] for r in rows], width=0.4, label="before GRPO")
  axes[0].bar([x + 0.2 for x in xs], [r.after["accuracy"] for r in rows], width=0.4, label="after GRPO")
  axes[0].set_xticks(list(xs), names, fontsize=7)
  axes[0].set_ylabel("accuracy (Avg@n)")
  axes[0].set_title("GRPO from distilled students")
  axes[0].legend(fontsize=7)
  for r in rows:
    points = _curve(r.curve, "reward")
    axes[1].plot([p[0] for p in points], [p[1] for p in points], label=r.labels.get("init", r.name), marker=".")
  axes[1].set_xlabel("GRPO step")
  axes[1].set_ylabel("mean reward of the rollouts")
  axes[1].legend(fontsize=7)


def plot_accuracy_vs_flops(study, ax):
  for r, label in _by_run(study):
    ax.scatter(r.total_flops, r.after["accuracy"], marker=_GROUP_MARKERS[r.group], s=60)
    ax.annotate(label, (r.total_flops, r.after["accuracy"]), fontsize=6, xytext=(3, 3),
                textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("FLOPs from the base model (student + teacher; GRPO includes its distillation)")
  ax.set_ylabel("accuracy (Avg@n)")
  ax.set_title("accuracy vs compute")


def save_plots(study, directory):
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

  fig, ax = plt.subplots(figsize=(7, 5))
  plot_accuracy_vs_entropy(study, ax)
  save("accuracy_vs_entropy", fig)
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  plot_training_curves(study, axes[0], x="step")
  plot_training_curves(study, axes[1], x="flops")
  save("training_curves", fig)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  plot_grpo(study, axes)
  save("grpo", fig)
  fig, ax = plt.subplots(figsize=(7, 5))
  plot_accuracy_vs_flops(study, ax)
  save("accuracy_vs_flops", fig)
  return paths


# --- findings ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Finding:
  claim: str  # the paper's claim as this study tests it
  measured: str  # the numbers
  agrees: bool | None  # None: the study lacks the runs to say


def _acc(r):
  return r.after["accuracy"]


def _better(a, b):
  """True/False when accuracy a is above/below b by more than two standard errors of the difference, None
  when the gap is within that noise. Accuracy is a mean over problems of each problem's Avg@n, whose variance
  is at most p(1-p) per problem (a problem's n samples are correlated, so they are not counted as n draws):
  se = sqrt(pa(1-pa)/problems_a + pb(1-pb)/problems_b), a conservative bound."""
  pa, pb = a["accuracy"], b["accuracy"]
  problems_a, problems_b = max(a.get("num_problems", 1), 1), max(b.get("num_problems", 1), 1)
  se = math.sqrt(pa * (1 - pa) / problems_a + pb * (1 - pb) / problems_b)
  if abs(pa - pb) <= 2 * se:
    return None
  return pa > pb


def _all(verdicts):
  """Agreement over several comparisons: False if any disagrees, None if all are within noise."""
  verdicts = list(verdicts)
  if any(v is False for v in verdicts):
    return False
  return True if any(v for v in verdicts) else None


def _ent(r):
  return r.after["entropy"]


def _cells(study, **labels):
  return [r for r in study.group("cells") if all(r.labels.get(k) == v for k, v in labels.items())]


def _pairs(study, key, first, second, *, over):
  """[(values of the `over` labels, cell with key=first, cell with key=second)] for every combination of the
  `over` labels where both cells exist: the matched comparisons of one design axis."""
  cells = study.group("cells")
  out = []
  for combo in itertools.product(*[sorted({r.labels[k] for r in cells}) for k in over]):
    fixed = dict(zip(over, combo))
    a, b = _cells(study, **fixed, **{key: first}), _cells(study, **fixed, **{key: second})
    if a and b:
      out.append((combo, a[0], b[0]))
  return out


def findings(study) -> list:
  """The paper's claims, each as a comparison on this study's numbers."""
  out = []

  # 1. KL direction: reverse (mode-seeking) gives lower entropy than forward, trading off accuracy.
  pairs = _pairs(study, "kl", "forward", "reverse", over=("prefix", "length"))
  if pairs:
    measured = "; ".join(f"{p} prefixes L{n}: entropy fwd {_ent(f):.3f} / rev {_ent(r):.3f}, accuracy fwd "
                         f"{_acc(f):.3f} / rev {_acc(r):.3f}" for (p, n), f, r in pairs)
    out.append(Finding("KL direction trades accuracy against entropy: reverse KL ends with lower entropy than "
                       "forward KL (same prefixes, same length)", measured,
                       all(_ent(r) < _ent(f) for _, f, r in pairs)))

  # 2. Prefix source: on-policy (student) prefixes give better students at matched steps, at another compute.
  pairs = _pairs(study, "prefix", "teacher", "student", over=("kl", "length"))
  if pairs:
    measured = "; ".join(f"{kl} KL L{n}: accuracy teacher-prefix {_acc(t):.3f} ({t.flops:.2e} FLOPs) / "
                         f"student-prefix {_acc(s):.3f} ({s.flops:.2e} FLOPs)" for (kl, n), t, s in pairs)
    out.append(Finding("Prefix source trades quality against compute: student (on-policy) prefixes give higher "
                       "accuracy than teacher prefixes at matched steps", measured,
                       _all(_better(s.after, t.after) for _, t, s in pairs)))

  # 3. Training length: the long length is less stable for reverse KL on-policy (the long-horizon failure).
  lengths = sorted({r.labels["length"] for r in study.group("cells")})
  if len(lengths) == 2:
    short, long = lengths
    pairs = _pairs(study, "length", short, long, over=("cell",))
    measured = "; ".join(f"{c}: accuracy L{short} {_acc(s):.3f} -> L{long} {_acc(l):.3f}, entropy "
                         f"{_ent(s):.3f} -> {_ent(l):.3f}" for (c,), s, l in pairs)
    rev = [(s, l) for _, s, l in pairs if s.labels["kl"] == "reverse" and s.labels["prefix"] == "student"]
    out.append(Finding(f"Training length trades accuracy against stability: on-policy reverse KL at the long "
                       f"length L{long} ends with lower entropy than at L{short} (collapse)", measured,
                       all(_ent(l) < _ent(s) for s, l in rev) if rev else None))

  # 4. Forward-heavy mixing fixes the long-horizon failure.
  mixing = sorted(study.group("mixing"), key=lambda r: r.labels["lam"])
  if len(mixing) >= 2:
    best = max(mixing, key=_acc)
    pure_reverse = [r for r in mixing if r.labels["lam"] == 1.0]
    measured = ", ".join(f"lam={r.labels['lam']:g}: {_acc(r):.3f} (entropy {_ent(r):.3f})" for r in mixing)
    agrees = None
    if pure_reverse:
      beats = _better(best.after, pure_reverse[0].after)
      agrees = None if beats is None else (best.labels["lam"] < 0.5 and beats)
    out.append(Finding("Forward-heavy KL mixing (reverse weight lam < 0.5) is best at the long length and beats "
                       "pure reverse KL", f"{measured}; best lam={best.labels['lam']:g}", agrees))

  # 5. The entropy-gated curriculum fixes the long-horizon failure.
  fixed = [r for r in study.group("curriculum") if not r.labels.get("curriculum")]
  gated = [r for r in study.group("curriculum") if r.labels.get("curriculum")]
  if fixed and gated:
    f, g = fixed[0], gated[0]
    decisions = [m for m in g.curve if "curriculum_entropy" in m]
    path = " -> ".join(f"{m['training_length']:g}" for m in decisions)
    out.append(Finding("The entropy-gated length curriculum beats training at the fixed long length",
                       f"fixed: accuracy {_acc(f):.3f}, entropy {_ent(f):.3f}; curriculum: accuracy {_acc(g):.3f}, "
                       f"entropy {_ent(g):.3f} (stage lengths {path})", _better(g.after, f.after)))

  # 6. The best standalone objective is not the best initialisation for RL.
  grpo = study.group("grpo")
  if len(grpo) >= 2:
    best_before = max(grpo, key=lambda r: r.before["accuracy"])
    best_after = max(grpo, key=_acc)
    measured = "; ".join(f"from {r.labels['init']}: {r.before['accuracy']:.3f} -> {_acc(r):.3f}" for r in grpo)
    flips = best_before.name != best_after.name
    # a flip or a kept order only counts when both rankings are outside the noise
    clear = (_better(best_before.before, [r for r in grpo if r is not best_before][0].before) is not None
             and (best_before is best_after or _better(best_after.after, best_before.after) is not None))
    out.append(Finding("The best distilled student is not the best initialisation for GRPO (the ranking flips)",
                       measured, flips if clear else None))
  return out


def verdict(finding):
  return {True: "agrees", False: "DISAGREES", None: "within noise"}[finding.agrees]


def write_report(workdir) -> pathlib.Path:
  """workdir/report.md and workdir/plots/*.png from the study in `workdir`."""
  workdir = pathlib.Path(workdir)
  study = load(workdir)
  paths = save_plots(study, workdir / "plots")
  lines = ["# Distillation study", "",
           f"Study workdir: `{workdir}`. Accuracy is Avg@n over n samples per held-out problem; Pass@k uses the "
           "unbiased estimator; entropy is the mean per-token entropy of the model along its own held-out "
           "samples; FLOPs count the matmuls the run's compiled programs compute (`train/flops.py`): training "
           "compute, student + teacher (sampling, training, scoring); held-out evaluation, probes and "
           "curriculum entropy checks (`eval_flops` in results.json) are left out, so comparisons at matched "
           "FLOPs do not depend on how often a run was measured.", "",
           "## Results", "", table(study), "",
           "## Accuracy by held-out group", "",
           "Avg@n per difficulty (the built-in task: number of terms) or per benchmark file.", "",
           group_table(study), "",
           "## Findings against the paper", "",
           "Each claim is tested as the stated comparison on the numbers above; a disagreement is reported, "
           "not tuned away. Accuracy gaps within two standard errors count as within noise (the bound "
           "sqrt(p(1-p)/problems) per run: a problem's samples are correlated); entropy comparisons are taken "
           "as measured.", ""]
  for f in findings(study):
    lines += [f"- **{verdict(f)}**: {f.claim}.  ", f"  Measured: {f.measured}."]
  lines += ["", "## Plots", ""]
  titles = {"accuracy_vs_entropy": "Accuracy vs entropy", "training_curves":
            "Entropy and length over training (top: steps; bottom: FLOPs)", "grpo": "Before and after GRPO",
            "accuracy_vs_flops": "Accuracy vs FLOPs"}
  for name in PLOTS:
    lines += [f"### {titles[name]}", "", f"![{name}](plots/{paths[name].name})", ""]
  path = workdir / "report.md"
  path.write_text("\n".join(lines))
  return path
