"""Reads a seeded study workdir (`train.study`) and writes report.md: the tables, the findings, the plots.

    study = report.load(workdir)       # entries with their per-seed results, curves, teacher, base
    report.write_report(workdir)       # report.md + plots/*.png
    report.interval(study.row("opd L36").after, "accuracy")   # a stats.Spread over seeds x problems

Numbers come only from files the runs wrote: results.json (held-out evaluation after training with every
problem's counts, FLOPs) and metrics.jsonl (training curves), one of each per seed. Every number of an entry
is its mean over seeds, with a 95% interval from a hierarchical bootstrap over seeds and problems (`stats`);
findings (`findings.py`) are paired effects with such intervals. Nothing is tuned or filtered to agree.
"""

import dataclasses
import json
import pathlib

import numpy as np

from kldistill_jax import evaluation, stats
from kldistill_jax.errors import MissingFileError
from kldistill_jax.train.metrics import read_metrics

METRICS = ("accuracy", "entropy", "length", "truncation")  # + "pass_at_<k>"
BOOTSTRAP = dict(level=0.95, draws=2000, seed=0)  # fixed: the report is a function of the runs' files


@dataclasses.dataclass
class Row:
  """One report entry with its numbers, one element per seed. after/before: evaluation dicts (accuracy =
  Avg@n, pass_at_k, per_problem, ...); curves: metrics.jsonl records; curriculum: results.json's record."""
  name: str
  group: str
  run: str
  labels: dict
  after: list
  before: list
  flops: list  # student + teacher FLOPs of this run (GRPO: RL only; see total_flops)
  total_flops: list  # FLOPs to produce this model from the base (GRPO: its distillation run's + its own)
  curves: list
  curriculum: list


@dataclasses.dataclass
class Study:
  rows: list
  teacher: list  # per seed
  base: list  # per seed
  seeds: list
  workdir: pathlib.Path
  samples_per_prompt: int  # n of Avg@n
  timings: dict  # "seed<s>/<run>" -> wall seconds (runs this study ran; see train.study.TIMINGS)
  _intervals: dict = dataclasses.field(default_factory=dict, repr=False)

  def interval(self, per_seed_results, metric, group=None):
    """`interval` (below), computed once per (results, metric, group): the tables and plots share them. The
    study holds the results, so their ids are stable keys."""
    key = (tuple(id(r) for r in per_seed_results), metric, group)
    if key not in self._intervals:
      self._intervals[key] = interval(per_seed_results, metric, group)
    return self._intervals[key]

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


def _read(path, what):
  if not path.is_file():
    raise MissingFileError(f"{path}: {what} of the study has no results yet; rerun the study to finish it")
  return json.loads(path.read_text())


def _checked(result, path):
  if "per_problem" not in result:
    raise MissingFileError(f"{path}: no per-problem results (written by an older version); rerun that run "
                           "(delete its directory) so the report can resample problems")
  return result


def load(workdir) -> Study:
  """The study in `workdir` (its study.json, runs/seed<s>/*/results.json and metrics.jsonl)."""
  workdir = pathlib.Path(workdir)
  if not (workdir / "study.json").is_file():
    raise MissingFileError(f"{workdir / 'study.json'}: no study plan here; is {workdir} a study workdir?")
  saved = json.loads((workdir / "study.json").read_text())
  if "seeds" not in saved:
    raise MissingFileError(f"{workdir / 'study.json'}: a study written before seeds (one seed, no per-problem "
                           "results); rerun the study into a new workdir")
  seeds = [int(s) for s in saved["seeds"]]
  runs = saved["runs"]
  results, teacher, base = {}, [], []
  for seed in seeds:
    runs_dir = workdir / "runs" / f"seed{seed}"
    for name in runs:
      path = runs_dir / name / "results.json"
      results[seed, name] = _read(path, f"run {name!r} of seed {seed}")
      for key in ("student after", "policy after", "student before", "policy before", "teacher"):
        if key in results[seed, name]:
          _checked(results[seed, name][key], path)
    path = runs_dir / "base" / "results.json"
    base.append(_checked(_read(path, f"the base model of seed {seed}")["base"], path))
    teacher.append(next(results[seed, n]["teacher"] for n in runs if "teacher" in results[seed, n]))
  rows = []
  for e in saved["entries"]:
    per_seed = [results[seed, e["run"]] for seed in seeds]
    init_from = runs[e["run"]]["init_from"]
    total = [_flops(r) + (_flops(results[seed, init_from]) if init_from else 0.0)
             for seed, r in zip(seeds, per_seed)]
    rows.append(Row(e["name"], e["group"], e["run"], dict(tuple(x) for x in e["labels"]),
                    [r.get("student after") or r["policy after"] for r in per_seed],
                    [r.get("student before") or r["policy before"] for r in per_seed],
                    [_flops(r) for r in per_seed], total,
                    [read_metrics(workdir / "runs" / f"seed{seed}" / e["run"]) for seed in seeds],
                    [r.get("curriculum", {}) for r in per_seed]))
  timings = json.loads((workdir / "timings.json").read_text()) if (workdir / "timings.json").is_file() else {}
  return Study(rows, teacher, base, seeds, workdir, int(saved["config"]["eval"]["samples_per_prompt"]), timings)


# --- numbers with intervals ----------------------------------------------------------------------------

def _ratio_parts(result, metric):
  """(num, den) per problem such that the metric over problems is sum(num) / sum(den)."""
  p = result["per_problem"]
  n = np.full(len(p["correct"]), float(result["samples_per_prompt"]))
  correct = np.asarray(p["correct"], np.float64)
  if metric == "accuracy":
    return correct, n
  if metric == "entropy":
    return np.asarray(p["entropy_sum"], np.float64), np.asarray(p["tokens"], np.float64)
  if metric == "length":
    return np.asarray(p["tokens"], np.float64), n
  if metric == "truncation":
    return n - np.asarray(p["finished"], np.float64), n
  if metric.startswith("pass_at_"):
    k = int(metric.rsplit("_", 1)[1])
    return np.asarray(evaluation.pass_at_k(n.astype(int), correct.astype(int), k), np.float64).reshape(-1), \
        np.ones_like(n)
  raise ValueError(f"unknown metric {metric!r}; known: {METRICS} and pass_at_<k>")


def arm(per_seed_results, metric, group=None):
  """One run's metric as a `stats` arm: [(num, den)] per seed, optionally only the problems of `group`."""
  out = []
  for result in per_seed_results:
    num, den = _ratio_parts(result, metric)
    if group is not None:
      keep = np.asarray([g == group for g in result["per_problem"]["group"]])
      num, den = num[keep], den[keep]
    out.append((num, den))
  return out


def interval(per_seed_results, metric, group=None) -> stats.Spread:
  """Mean over seeds, its 95% interval over seeds x problems, and the seed / problem spreads."""
  return stats.spread(arm(per_seed_results, metric, group), **BOOTSTRAP)


def effect(plus, minus, metric, when="after") -> stats.Interval:
  """Paired effect mean(plus rows) - mean(minus rows) of `metric` (rows matched pairwise by position), with
  its interval; `when`: "after" or "before" (GRPO rows: before RL)."""
  arms = [arm(getattr(r, when), metric) for r in (*plus, *minus)]
  weights = [1.0 / len(plus)] * len(plus) + [-1.0 / len(minus)] * len(minus)
  return stats.bootstrap(arms, weights, **BOOTSTRAP)


def _cell(spread, digits=3):
  i = spread.interval
  return f"{i.estimate:.{digits}f} [{i.low:.{digits}f}, {i.high:.{digits}f}]"


def _pass_keys(study):
  keys = {k for r in study.rows for k in r.after[0] if k.startswith("pass_at_") and k != "pass_at_1"}
  return sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]))


def _all_results(study):
  """(name, group, per-seed results, run FLOPs, FLOPs from base) for the teacher, the base and each entry."""
  yield "teacher", "-", study.teacher, None, None
  yield "base student", "-", study.base, None, None
  for r in study.rows:
    yield r.name, r.group, r.after, r.flops, r.total_flops


def table(study) -> str:
  """Markdown table: one line per entry (mean over seeds [95% interval]), plus the teacher and the base."""
  pass_keys = _pass_keys(study)
  n = study.samples_per_prompt
  header = (["entry", "group", f"Avg@{n} [95% CI]", "sd seeds", "sd problems"]
            + [f"Pass@{k.rsplit('_', 1)[1]} [95% CI]" for k in pass_keys]
            + ["mean length", "entropy [95% CI]", "truncated", "FLOPs (run)", "FLOPs (from base)"])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, group, results, run_flops, total_flops in _all_results(study):
    accuracy = study.interval(results, "accuracy")
    cells = [name, group, _cell(accuracy), f"{accuracy.seed_sd:.3f}", f"{accuracy.problem_sd:.3f}"]
    cells += [_cell(study.interval(results, k)) for k in pass_keys]
    cells += [f"{study.interval(results, 'length').interval.estimate:.1f}",
              _cell(study.interval(results, "entropy")),
              f"{study.interval(results, 'truncation').interval.estimate:.3f}",
              f"{np.mean(run_flops):.2e}" if run_flops else "-", f"{np.mean(total_flops):.2e}" if total_flops else "-"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def group_table(study) -> str:
  """Markdown table of Avg@n per held-out group (the built-in task's difficulty = number of terms, or each
  benchmark file), mean over seeds [95% interval], one line per entry."""
  per_seed = [result["per_problem"]["group"] for result in study.teacher]  # every run of a seed: the same
  groups = sorted({g for seed in per_seed for g in seed if g is not None}, key=lambda g: (len(g), g))

  def count(g):  # problems per seed (the built-in task draws each seed's own problems)
    counts = [seed.count(g) for seed in per_seed]
    return str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))

  def cell(results, g):
    return _cell(study.interval(results, "accuracy", g)) if all(g in seed for seed in per_seed) else "-"

  header = ["entry"] + [f"{g} (n={count(g)})" for g in groups]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, _, results, _, _ in _all_results(study):
    lines.append("| " + " | ".join([name] + [cell(results, g) for g in groups]) + " |")
  return "\n".join(lines)


def wall_time(study) -> str:
  """Markdown: the study's wall time from timings.json, in all, per seed and per run (mean over seeds)."""
  if not study.timings:
    return "No timings recorded (timings.json is written as the study runs its runs)."
  per_seed = {seed: sum(v for k, v in study.timings.items() if k.startswith(f"seed{seed}/")) for seed in study.seeds}
  runs = {}
  for key, seconds in study.timings.items():
    runs.setdefault(key.split("/", 1)[1], []).append(seconds)
  lines = [f"Total {sum(study.timings.values()) / 60:.1f} min of wall time over {len(study.timings)} runs "
           f"({', '.join(f'seed {s}: {t / 60:.1f} min' for s, t in per_seed.items())}); runs resumed after "
           "an interruption count only their last session. Per run (mean over the seeds that ran it, seconds):",
           "", "| run | seconds |", "|---|---|"]
  lines += [f"| {name} | {np.mean(v):.0f} |" for name, v in runs.items()]
  return "\n".join(lines)


def write_report(workdir) -> pathlib.Path:
  """workdir/report.md and workdir/plots/*.png from the study in `workdir`."""
  from kldistill_jax import findings as findings_lib, report_plots  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  study = load(workdir)
  found = findings_lib.findings(study)
  paths = report_plots.save_plots(study, workdir / "plots", found)
  problems = study.teacher[0]["num_problems"]
  lines = ["# Distillation study", "",
           f"Study workdir: `{workdir}`; seeds {', '.join(map(str, study.seeds))} (each sets model init, data "
           f"order and problems, and sampling); {problems} held-out problems per seed. Accuracy is Avg@n over n "
           "samples per held-out problem; Pass@k uses the unbiased estimator; entropy is the mean per-token "
           "entropy of the model along its own held-out samples; FLOPs count the matmuls the run's compiled "
           "programs compute (`train/flops.py`): training compute, student + teacher (sampling, training, "
           "scoring); held-out evaluation, probes and curriculum entropy checks (`eval_flops` in results.json) "
           "are left out, so comparisons at matched FLOPs do not depend on how often a run was measured.", "",
           "Every number is the mean over seeds. [95% CI]: a hierarchical percentile bootstrap (2,000 draws, "
           "bootstrap seed 0) that resamples seeds, then problems within each seed; sd seeds: standard "
           "deviation of the per-seed values; sd problems: standard deviation over problems of each problem's "
           "own score (how much problems differ).", "",
           "## Results", "", table(study), "",
           "## Accuracy by held-out group", "",
           "Avg@n per difficulty (the built-in task: number of terms) or per benchmark file, mean over seeds "
           "[95% CI].", "", group_table(study), "",
           "## Findings against the paper", "", findings_lib.METHOD, ""]
  for f in found:
    lines += [f"- **{f.verdict}**: {f.claim}.  ", f"  Effect: {f.effect}.  ", f"  Measured: {f.measured}."]
  lines += ["", "## Wall time", "", wall_time(study), "", "## Plots", ""]
  for name, title in report_plots.TITLES.items():
    lines += [f"### {title}", "", f"![{name}](plots/{paths[name].name})", ""]
  path = workdir / "report.md"
  path.write_text("\n".join(lines))
  return path
