"""The study as one job: the 2x2 at two training lengths, the paper's estimators, KL mixing, the length
curriculum (fixed and teacher-relative floor), GRPO after; every entry once per seed.

    python run.py --config configs/study.py --workdir /tmp/study      # then read /tmp/study/report.md

`plan(config)` turns the `study` section into report entries and the runs behind them. Runs with the same
settings are one run (mixing at lam=0 with student prefixes IS the on-policy forward-KL cell), so an entry
names its run instead of owning it. Every run is an ordinary `distill` / `grpo` / `pretrain` job in
workdir/runs/seed<s>/<run>/ with its own checkpoints and metrics; a run whose results.json exists is done, so
rerunning the study resumes where it stopped. Each seed (`study.seeds`) sets the model init and sampling
keys (`seed`), the data order and the built-in task's problems (`data.seed`) and the evaluation's samples
(`eval.seed`): seeds share nothing but the config. Within a seed all students start from one base model
(runs/seed<s>/base: the inline student fitted briefly to the data), all GRPO runs from a distilled student.
"""

import contextlib
import dataclasses
import functools
import json
import pathlib
import time

import jax
import ml_collections
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

from kldistill_jax import objectives, report
from kldistill_jax.errors import UserError
from kldistill_jax.train import presets, runner, tracking, workdir as workdir_lib

GROUPS = ("cells", "estimator", "mixing", "curriculum", "grpo")
TIMINGS = "timings.json"  # workdir file: wall seconds of each run this study ran, by "seed<s>/<run>"
COMPILATION_CACHE = "jax_cache"  # workdir directory: the runs' compiled programs (study.compilation_cache)


def defaults() -> ml_collections.ConfigDict:
  """The `study` config section (configs/study.py adds it to a distill config)."""
  s = ml_collections.ConfigDict()
  s.seeds = (0, 1, 2)  # every entry runs once per seed (seed, data.seed and eval.seed set to it)
  s.compilation_cache = True  # runs and seeds load the programs earlier runs compiled (workdir/jax_cache)
  s.cells = ("sft", "dagger", "offline_rl", "opd")  # objectives.PRESETS names: prefix source x KL direction
  s.estimator = "exact"  # every cell's estimator ("exact" full-vocabulary KL; "preset" = each preset's own)
  s.estimator_arm = "preset"  # the cells at the long length again with this estimator ("" = no such arm)
  s.lengths = (16, 36)  # the short and the long training length (sampled tokens per prefix)
  s.mixing_lams = (0.0, 0.25, 0.5, 0.75, 1.0)  # reverse-KL weight of objective.kl="mixed", long length
  s.mixing_prefix = "student"
  s.curriculum_cell = "opd"  # the cell trained with the entropy-gated curriculum instead of the long length
  s.curriculum_lengths = (16, 26, 36)  # L_0 < L_1 < ... ending at the long length
  # a second curriculum arm with h_min = this x the teacher's entropy on the same probe (0 = none); 1.0 was
  # fixed before any seeded run (a student less uncertain than its teacher has collapsed), never tuned after
  s.curriculum_h_min_relative = 1.0
  s.grpo_from = ("dagger", "opd")  # GRPO starts from these cells' students at the long length
  s.grpo_steps = 200
  s.grpo_batch_size = 16  # prompts per GRPO step (x grpo.group_size completions)
  s.grpo_learning_rate = 3e-4  # chosen once from dagger_L36 among 1e-4, 3e-4, 1e-3 (README, "The study")
  return s


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of the report: `run` is the directory under workdir/runs/seed<s> that holds its numbers."""
  name: str
  group: str  # one of GROUPS
  run: str
  labels: tuple  # (key, value) pairs: cell, prefix, kl, estimator, lam, length, curriculum, h_min, init


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  job: str  # distill | grpo
  overrides: tuple  # ((dotted field, value), ...) on top of the study's config
  init_from: str = ""  # grpo: the distill run whose exported student it starts from


def _estimator(choice, cell):
  """The estimator a cell runs with under `choice` ("preset" = the preset's own, else `choice` itself)."""
  return objectives.PRESETS[cell].estimator if choice == "preset" else choice


def _cell_overrides(cell, estimator):
  preset = objectives.PRESETS[cell]
  return (("objective.prefix", preset.prefix), ("objective.kl", preset.kl), ("objective.lam", None),
          ("objective.estimator", estimator))


def _mix_overrides(s, lam):
  """lam 0 / 1 are the pure directions (so they coincide with the cells); in between, kl="mixed"."""
  kl = {0.0: "forward", 1.0: "reverse"}.get(float(lam), "mixed")
  overrides = [("objective.prefix", s.mixing_prefix), ("objective.kl", kl),
               ("objective.estimator", "exact" if s.estimator == "preset" else s.estimator)]
  overrides.append(("objective.lam", float(lam) if kl == "mixed" else None))
  return tuple(overrides)


def seed_overrides(seed):
  """What one seed of the study sets: model init and sampling keys, data order (and the built-in task's
  problems), the evaluation's samples."""
  return (("seed", int(seed)), ("data.seed", int(seed)), ("eval.seed", int(seed)))


def check(config):
  s = config.study
  seeds = tuple(s.seeds)
  if not seeds or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in seeds) or \
      len(set(seeds)) != len(seeds):
    raise UserError(f"study.seeds must be a non-empty tuple of distinct ints >= 0, got {seeds}")
  unknown = [c for c in (*s.cells, s.curriculum_cell, *s.grpo_from) if c not in objectives.PRESETS]
  if unknown:
    raise UserError(f"study: unknown cell(s) {unknown}; known: {sorted(objectives.PRESETS)}")
  if s.estimator not in ("exact", "sampled", "preset"):
    raise UserError(f"study.estimator must be 'exact', 'sampled' or 'preset', got {s.estimator!r}")
  if s.estimator_arm not in ("", "exact", "sampled", "preset"):
    raise UserError(f"study.estimator_arm must be '', 'exact', 'sampled' or 'preset', got {s.estimator_arm!r}")
  for field, choice in (("study.estimator", s.estimator), ("study.estimator_arm", s.estimator_arm)):
    for cell in s.cells if choice else ():
      preset = objectives.PRESETS[cell]
      try:  # e.g. sampled forward KL at student prefixes does not exist
        objectives.Objective(prefix=preset.prefix, kl=preset.kl, estimator=_estimator(choice, cell))
      except UserError as e:
        raise UserError(f"{field}={choice!r} does not fit cell {cell!r}: {e}") from None
  if len(s.lengths) != 2 or not 0 < s.lengths[0] < s.lengths[1]:
    raise UserError(f"study.lengths must be (short, long) with 0 < short < long, got {tuple(s.lengths)}")
  if any(not 0.0 <= lam <= 1.0 for lam in s.mixing_lams):
    raise UserError(f"study.mixing_lams must lie in [0, 1], got {tuple(s.mixing_lams)}")
  lengths = tuple(s.curriculum_lengths)
  if list(lengths) != sorted(set(lengths)) or lengths[-1] != s.lengths[1]:
    raise UserError(f"study.curriculum_lengths must increase strictly and end at the long length "
                    f"{s.lengths[1]}, got {lengths}")
  if not 0 <= s.curriculum_h_min_relative < float("inf"):
    raise UserError(f"study.curriculum_h_min_relative must be a finite number >= 0 (0 = no such arm), got "
                    f"{s.curriculum_h_min_relative}")
  if config.steps < len(lengths):
    raise UserError(f"steps={config.steps} leaves no step for each of the {len(lengths)} curriculum stages")
  if s.lengths[1] > config.eval.max_new_tokens:
    raise UserError(f"study.lengths long {s.lengths[1]} > eval.max_new_tokens {config.eval.max_new_tokens}: "
                    "the evaluation would truncate what training produced")
  for cell in s.grpo_from:
    if cell not in s.cells:
      raise UserError(f"study.grpo_from names {cell!r}, which is not in study.cells {tuple(s.cells)}")


def plan(config):
  """(entries, runs): the report's rows in order, and the distinct runs (dict name -> Run) in run order.
  The same plan runs in every seed."""
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

  def cell_labels(cell, estimator, length, **more):
    preset = objectives.PRESETS[cell]
    return dict(cell=cell, prefix=preset.prefix, kl=preset.kl, estimator=estimator, length=length, **more)

  for length in (short, long):
    for cell in s.cells:
      estimator = _estimator(s.estimator, cell)
      add(f"{cell} L{length}", "cells", f"{cell}_L{length}", "distill",
          _cell_overrides(cell, estimator) + (("sampling.max_new_tokens", length),),
          cell_labels(cell, estimator, length))
  for cell in s.cells if s.estimator_arm else ():  # the paper's estimator choice beside the main one
    estimator = _estimator(s.estimator_arm, cell)
    add(f"{cell} L{long} {estimator}", "estimator", f"{cell}_L{long}_{estimator}", "distill",
        _cell_overrides(cell, estimator) + (("sampling.max_new_tokens", long),),
        cell_labels(cell, estimator, long))
  for lam in s.mixing_lams:
    add(f"mix lam={lam:g} L{long}", "mixing", f"mix_lam{lam:g}_L{long}", "distill",
        _mix_overrides(s, lam) + (("sampling.max_new_tokens", long),),
        dict(prefix=s.mixing_prefix, kl="mixed", lam=float(lam), length=long))
  cell = s.curriculum_cell
  estimator = _estimator(s.estimator, cell)
  fixed = _cell_overrides(cell, estimator) + (("sampling.max_new_tokens", long),)
  add(f"{cell} fixed L{long}", "curriculum", f"{cell}_L{long}", "distill", fixed,
      cell_labels(cell, estimator, long, curriculum=False))
  gated = fixed + (("curriculum.enabled", True), ("curriculum.lengths", tuple(s.curriculum_lengths)),
                   ("curriculum.stage_steps", config.steps // len(s.curriculum_lengths)))
  add(f"{cell} curriculum h_min={config.curriculum.h_min:g}", "curriculum", f"{cell}_curriculum", "distill",
      gated + (("curriculum.h_min_relative", 0.0),),
      cell_labels(cell, estimator, long, curriculum=True, h_min=float(config.curriculum.h_min)))
  if s.curriculum_h_min_relative:
    fraction = float(s.curriculum_h_min_relative)
    add(f"{cell} curriculum h_min={fraction:g}xteacher", "curriculum", f"{cell}_curriculum_rel{fraction:g}",
        "distill", gated + (("curriculum.h_min_relative", fraction),),
        cell_labels(cell, estimator, long, curriculum=True, h_min_relative=fraction))
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


def run_dir(workdir, seed, run) -> pathlib.Path:
  """Where run `run` ("base" for the shared base model) of seed `seed` lives."""
  return pathlib.Path(workdir) / "runs" / f"seed{int(seed)}" / run


def _timed(timings_file, key, job):
  """Runs job() and records its wall seconds under `key` in the study's timings file."""
  start = time.time()
  job()
  timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
  timings[key] = time.time() - start
  timings_file.write_text(json.dumps(timings, indent=1) + "\n")


def base_config(config, seed):
  """The config of seed `seed`'s base model: the study's student (path or inline) fitted to the data."""
  return presets.with_overrides(config, seed_overrides(seed) + (
      ("job", "pretrain"), ("steps", config.student.warmup_steps),
      ("optimizer.learning_rate", config.student.warmup_learning_rate)))


def run_config(config, workdir, seed, run):
  """The config of `run` (a Run of the plan) in seed `seed`: the study's, the seed's and the run's settings.
  Distillation starts from the seed's base, GRPO from its distilled student; distilled students are
  exported as their float32 masters (bfloat16 exports would round GRPO's starting weights)."""
  if run.job == "grpo":
    start = (("job", "grpo"), ("student.path", str(run_dir(workdir, seed, run.init_from) / "student")),
             ("student.warmup_steps", 0))
  else:
    start = (("student.path", str(run_dir(workdir, seed, "base") / "model")), ("student.warmup_steps", 0),
             ("export.dtype", "float32"))
  return presets.with_overrides(config, seed_overrides(seed) + start + run.overrides)


def _run_seed(config, workdir, seed, runs):
  """Every run of the plan for one seed (done runs are skipped): base first, then the plan's order."""
  timings = workdir / TIMINGS
  base_dir = run_dir(workdir, seed, "base")
  if not (base_dir / "results.json").is_file():

    def pretrain():
      result = runner.run_pretrain(base_config(config, seed), base_dir)
      (base_dir / "results.json").write_text(json.dumps({"base": _strip_examples(result)}, indent=2) + "\n")
    _timed(timings, f"seed{seed}/base", pretrain)
  for name, run in runs.items():
    directory = run_dir(workdir, seed, name)
    if (directory / "results.json").is_file():
      logging.warning("study: seed %d: %s is done (%s)", seed, name, directory / "results.json")
      continue
    logging.warning("study: seed %d: running %s (%s)", seed, name, dict(run.overrides))
    job = runner.run_grpo if run.job == "grpo" else runner.run_distill
    _timed(timings, f"seed{seed}/{name}", functools.partial(job, run_config(config, workdir, seed, run), directory))


@contextlib.contextmanager
def compilation_cache_in(directory):
  """JAX's persistent compilation cache in `directory` while the block runs, then off again. Every run
  builds its own jitted step, so without it each run recompiles programs an earlier run or seed already
  compiled (the smoke study's runs: ~40 s each, ~7 s with it). A cache the user configured is kept."""
  if jax.config.jax_compilation_cache_dir:
    yield
    return
  compilation_cache.set_cache_dir(str(directory))
  compilation_cache.reset_cache()  # jax decides once per process whether a cache is used: decide again
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


@workdir_lib.owned
def run_study(config, workdir):
  """Runs (or resumes) every run of the plan in every seed, then writes report.md and the plots."""
  entries, runs = plan(config)
  workdir = pathlib.Path(workdir)
  study_file = workdir / "study.json"
  study_file.write_text(json.dumps({"entries": [dataclasses.asdict(e) for e in entries],
                                    "runs": {n: dataclasses.asdict(r) for n, r in runs.items()},
                                    "seeds": [int(x) for x in config.study.seeds],
                                    "config": json.loads(config.to_json_best_effort())}, indent=2) + "\n")
  cache = compilation_cache_in(workdir / COMPILATION_CACHE) if config.study.compilation_cache else \
      contextlib.nullcontext()
  with cache:
    for seed in config.study.seeds:  # seed by seed: an interrupted study has whole seeds to report
      _run_seed(config, workdir, seed, runs)
  path = report.write_report(workdir)
  tracking.log_report(config, workdir, path)  # the plots and report.md in W&B (log.wandb_project)
  print("\n" + written(workdir, path))
  return True


def written(workdir, report_path) -> str:
  """What the study left in `workdir` for its user: the report, its plots, the record of the plan and the
  runs (each a workdir of its own: results.json, metrics.jsonl, tensorboard/, the exported student)."""
  workdir = pathlib.Path(workdir)
  plots = sorted((workdir / "plots").glob("*.png"))
  seeds = sorted(p.name for p in (workdir / "runs").iterdir() if p.is_dir()) if (workdir / "runs").is_dir() else []
  lines = [f"wrote (workdir {workdir}):", f"  report  {report_path}"]
  if plots:
    lines.append(f"  plots   {workdir / 'plots'}: {', '.join(p.name for p in plots)}")
  lines.append(f"  plan    {workdir / 'study.json'}")
  if seeds:
    runs = sorted(p.name for p in (workdir / "runs" / seeds[0]).iterdir() if p.is_dir())
    lines.append(f"  runs    {workdir / 'runs'}: {', '.join(seeds)}; in each: {', '.join(runs)}")
  return "\n".join(lines)
