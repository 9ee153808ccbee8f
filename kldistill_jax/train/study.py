"""The study as one job: the 2x2 at two training lengths, KL mixing, the length curriculum, GRPO after.

    python run.py --config configs/study.py --workdir /tmp/study      # then read /tmp/study/report.md

`plan(config)` turns the `study` section into report entries and the runs behind them. Runs with the same
settings are one run (mixing at lam=0 with student prefixes IS the on-policy forward-KL cell), so an entry
names its run instead of owning it. Every run is an ordinary `distill` / `grpo` / `pretrain` job in
workdir/runs/<run>/ with its own checkpoints and metrics; a run whose results.json exists is done, so
rerunning the study resumes where it stopped. All students start from one shared base model
(runs/base/model: the inline student fitted briefly to the data), all GRPO runs from a distilled student.
"""

import dataclasses
import json
import pathlib

import ml_collections
from absl import logging

from kldistill_jax import objectives
from kldistill_jax.errors import UserError
from kldistill_jax.train import presets, runner, workdir as workdir_lib

GROUPS = ("cells", "mixing", "curriculum", "grpo")


def defaults() -> ml_collections.ConfigDict:
  """The `study` config section (configs/study.py adds it to a distill config)."""
  s = ml_collections.ConfigDict()
  s.cells = ("sft", "dagger", "offline_rl", "opd")  # objectives.PRESETS names: prefix source x KL direction
  s.estimator = "exact"  # every cell's estimator ("exact" full-vocabulary KL; "preset" = each preset's own)
  s.lengths = (16, 36)  # the short and the long training length (sampled tokens per prefix)
  s.mixing_lams = (0.0, 0.25, 0.5, 0.75, 1.0)  # reverse-KL weight of objective.kl="mixed", long length
  s.mixing_prefix = "student"
  s.curriculum_cell = "opd"  # the cell trained with the entropy-gated curriculum instead of the long length
  s.curriculum_lengths = (16, 26, 36)  # L_0 < L_1 < ... ending at the long length
  s.grpo_from = ("dagger", "opd")  # GRPO starts from these cells' students at the long length
  s.grpo_steps = 200
  s.grpo_batch_size = 16  # prompts per GRPO step (x grpo.group_size completions)
  s.grpo_learning_rate = 3e-4  # chosen once from dagger_L36 among 1e-4, 3e-4, 1e-3 (README, "The study")
  return s


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of the report: `run` is the directory under workdir/runs that holds its numbers."""
  name: str
  group: str  # one of GROUPS
  run: str
  labels: tuple  # (key, value) pairs: prefix, kl, lam, length, curriculum, init


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  job: str  # distill | grpo
  overrides: tuple  # ((dotted field, value), ...) on top of the study's config
  init_from: str = ""  # grpo: the distill run whose exported student it starts from


def _cell_overrides(s, cell):
  preset = objectives.PRESETS[cell]
  estimator = preset.estimator if s.estimator == "preset" else s.estimator
  return (("objective.prefix", preset.prefix), ("objective.kl", preset.kl), ("objective.lam", None),
          ("objective.estimator", estimator))


def _mix_overrides(s, lam):
  """lam 0 / 1 are the pure directions (so they coincide with the cells); in between, kl="mixed"."""
  kl = {0.0: "forward", 1.0: "reverse"}.get(float(lam), "mixed")
  overrides = [("objective.prefix", s.mixing_prefix), ("objective.kl", kl),
               ("objective.estimator", "exact" if s.estimator == "preset" else s.estimator)]
  overrides.append(("objective.lam", float(lam) if kl == "mixed" else None))
  return tuple(overrides)


def check(config):
  s = config.study
  unknown = [c for c in (*s.cells, s.curriculum_cell, *s.grpo_from) if c not in objectives.PRESETS]
  if unknown:
    raise UserError(f"study: unknown cell(s) {unknown}; known: {sorted(objectives.PRESETS)}")
  if s.estimator not in ("exact", "sampled", "preset"):
    raise UserError(f"study.estimator must be 'exact', 'sampled' or 'preset', got {s.estimator!r}")
  if len(s.lengths) != 2 or not 0 < s.lengths[0] < s.lengths[1]:
    raise UserError(f"study.lengths must be (short, long) with 0 < short < long, got {tuple(s.lengths)}")
  if any(not 0.0 <= lam <= 1.0 for lam in s.mixing_lams):
    raise UserError(f"study.mixing_lams must lie in [0, 1], got {tuple(s.mixing_lams)}")
  lengths = tuple(s.curriculum_lengths)
  if list(lengths) != sorted(set(lengths)) or lengths[-1] != s.lengths[1]:
    raise UserError(f"study.curriculum_lengths must increase strictly and end at the long length "
                    f"{s.lengths[1]}, got {lengths}")
  if config.steps < len(lengths):
    raise UserError(f"steps={config.steps} leaves no step for each of the {len(lengths)} curriculum stages")
  if s.lengths[1] > config.eval.max_new_tokens:
    raise UserError(f"study.lengths long {s.lengths[1]} > eval.max_new_tokens {config.eval.max_new_tokens}: "
                    "the evaluation would truncate what training produced")
  for cell in s.grpo_from:
    if cell not in s.cells:
      raise UserError(f"study.grpo_from names {cell!r}, which is not in study.cells {tuple(s.cells)}")


def plan(config):
  """(entries, runs): the report's rows in order, and the distinct runs (dict name -> Run) in run order."""
  check(config)
  s = config.study
  short, long = s.lengths
  runs, by_overrides, entries = {}, {}, []

  def add(entry_name, group, run_name, job, overrides, labels, init_from=""):
    key = (job, tuple(sorted(overrides, key=lambda kv: kv[0])), init_from)  # same settings, any order
    if key not in by_overrides:
      by_overrides[key] = run_name
      runs[run_name] = Run(run_name, job, overrides, init_from)
    entries.append(Entry(entry_name, group, by_overrides[key], tuple(labels.items())))

  for length in (short, long):
    for cell in s.cells:
      preset = objectives.PRESETS[cell]
      add(f"{cell} L{length}", "cells", f"{cell}_L{length}", "distill",
          _cell_overrides(s, cell) + (("sampling.max_new_tokens", length),),
          dict(cell=cell, prefix=preset.prefix, kl=preset.kl, length=length))
  for lam in s.mixing_lams:
    add(f"mix lam={lam:g} L{long}", "mixing", f"mix_lam{lam:g}_L{long}", "distill",
        _mix_overrides(s, lam) + (("sampling.max_new_tokens", long),),
        dict(prefix=s.mixing_prefix, kl="mixed", lam=float(lam), length=long))
  cell = s.curriculum_cell
  preset = objectives.PRESETS[cell]
  add(f"{cell} fixed L{long}", "curriculum", f"{cell}_L{long}", "distill",
      _cell_overrides(s, cell) + (("sampling.max_new_tokens", long),),
      dict(cell=cell, prefix=preset.prefix, kl=preset.kl, length=long, curriculum=False))
  add(f"{cell} curriculum", "curriculum", f"{cell}_curriculum", "distill",
      _cell_overrides(s, cell) + (("sampling.max_new_tokens", long), ("curriculum.enabled", True),
                                  ("curriculum.lengths", tuple(s.curriculum_lengths)),
                                  ("curriculum.stage_steps", config.steps // len(s.curriculum_lengths))),
      dict(cell=cell, prefix=preset.prefix, kl=preset.kl, length=long, curriculum=True))
  for cell in s.grpo_from:
    source = f"{cell}_L{long}"
    add(f"GRPO from {cell} L{long}", "grpo", f"grpo_from_{source}", "grpo",
        (("steps", s.grpo_steps), ("batch_size", s.grpo_batch_size),
         ("optimizer.learning_rate", s.grpo_learning_rate), ("optimizer.schedule", "constant"),
         ("sampling.max_new_tokens", long)),
        dict(cell=cell, init=source, kl=objectives.PRESETS[cell].kl, length=long), init_from=source)
  return entries, runs


def _strip_examples(result):
  return {k: v for k, v in result.items() if k != "examples"}


@workdir_lib.owned
def run_study(config, workdir):
  """Runs (or resumes) every run of the plan, then writes report.md and the plots in `workdir`."""
  from kldistill_jax import report  # pylint: disable=g-import-not-at-top  (matplotlib: only when reporting)
  entries, runs = plan(config)
  runs_dir = workdir / "runs"
  base_dir = runs_dir / "base"
  if not (base_dir / "results.json").is_file():  # the shared base: student (path or inline) fitted to data
    base = presets.with_overrides(config, (("job", "pretrain"), ("steps", config.student.warmup_steps),
                                           ("optimizer.learning_rate", config.student.warmup_learning_rate)))
    result = runner.run_pretrain(base, base_dir)
    (base_dir / "results.json").write_text(json.dumps({"base": _strip_examples(result)}, indent=2) + "\n")
  # distilled students are exported as their float32 masters: the GRPO runs start from them (bfloat16
  # exports would round the starting weights and change the GRPO results)
  common = (("student.path", str(base_dir / "model")), ("student.warmup_steps", 0), ("export.dtype", "float32"))
  for name, run in runs.items():
    directory = runs_dir / name
    if (directory / "results.json").is_file():
      logging.warning("study: %s is done (%s)", name, directory / "results.json")
      continue
    logging.warning("study: running %s (%s)", name, dict(run.overrides))
    if run.job == "grpo":
      overrides = (("job", "grpo"), ("student.path", str(runs_dir / run.init_from / "student")),
                   ("student.warmup_steps", 0)) + run.overrides
      runner.run_grpo(presets.with_overrides(config, overrides), directory)
    else:
      runner.run_distill(presets.with_overrides(config, common + run.overrides), directory)
  study_file = workdir / "study.json"
  study_file.write_text(json.dumps({"entries": [dataclasses.asdict(e) for e in entries],
                                    "runs": {n: dataclasses.asdict(r) for n, r in runs.items()},
                                    "config": json.loads(config.to_json_best_effort())}, indent=2) + "\n")
  path = report.write_report(workdir)
  print("\n" + written(workdir, path))
  return True


def written(workdir, report_path) -> str:
  """What the study left in `workdir` for its user: the report, its plots, the record of the plan and the
  runs (each a workdir of its own: results.json, metrics.jsonl, tensorboard/, the exported student)."""
  workdir = pathlib.Path(workdir)
  plots = sorted((workdir / "plots").glob("*.png"))
  runs = sorted(p.name for p in (workdir / "runs").iterdir() if p.is_dir()) if (workdir / "runs").is_dir() else []
  lines = [f"wrote (workdir {workdir}):", f"  report  {report_path}"]
  if plots:
    lines.append(f"  plots   {workdir / 'plots'}: {', '.join(p.name for p in plots)}")
  lines.append(f"  plan    {workdir / 'study.json'}")
  if runs:
    lines.append(f"  runs    {workdir / 'runs'}: {', '.join(runs)}")
  return "\n".join(lines)


def read_plan(workdir):
  """(entries, runs) as written to workdir/study.json."""
  saved = json.loads((pathlib.Path(workdir) / "study.json").read_text())
  entries = [Entry(e["name"], e["group"], e["run"], tuple(tuple(x) for x in e["labels"])) for e in saved["entries"]]
  runs = {n: Run(r["name"], r["job"], tuple(tuple(x) for x in r["overrides"]), r["init_from"])
          for n, r in saved["runs"].items()}
  return entries, runs
