"""The study: its plan (entries, shared runs), config checks, the findings' verdicts on hand-made numbers,
and the two-seed smoke study end to end (every section of report.md with intervals, every plot, seeds that
change the draws and nothing else)."""

import json
import pathlib

import numpy as np
import pytest

import config_files
from kldistill_jax import findings, objectives, report, report_plots, stats
from kldistill_jax.train import runner, setup, study
from kldistill_jax.train.metrics import read_metrics


def test_default_plan_shares_identical_runs():
  config = config_files.load("study")
  entries, runs = study.plan(config)
  assert tuple(config.study.seeds) == (0, 1, 2)
  assert len(entries) == 8 + 4 + 5 + 3 + 2
  by_name = {e.name: e.run for e in entries}
  # mixing's pure directions at student prefixes ARE the on-policy cells; the fixed-length arm IS opd L36
  assert by_name["mix lam=0 L36"] == "dagger_L36"
  assert by_name["mix lam=1 L36"] == "opd_L36"
  assert by_name["opd fixed L36"] == "opd_L36"
  # the preset estimators: sft / dagger are exact already (shared), offline_rl / opd sample the reverse KL
  assert by_name["sft L36 exact"] == "sft_L36" and by_name["opd L36 sampled"] == "opd_L36_sampled"
  assert dict(runs["opd_L36_sampled"].overrides)["objective.estimator"] == "sampled"
  assert dict(runs["opd_L36"].overrides)["objective.estimator"] == "exact"
  assert sorted(runs) == sorted(
      [f"{c}_L{n}" for c in ("sft", "dagger", "offline_rl", "opd") for n in (16, 36)]
      + ["offline_rl_L36_sampled", "opd_L36_sampled", "mix_lam0.25_L36", "mix_lam0.5_L36", "mix_lam0.75_L36",
         "opd_curriculum", "opd_curriculum_rel1", "grpo_from_dagger_L36", "grpo_from_opd_L36"])
  assert dict(runs["opd_curriculum_rel1"].overrides)["curriculum.h_min_relative"] == 1.0
  assert dict(runs["opd_curriculum"].overrides)["curriculum.h_min_relative"] == 0.0
  assert list(runs)[-2:] == ["grpo_from_dagger_L36", "grpo_from_opd_L36"]  # after the runs they start from
  assert runs["grpo_from_opd_L36"].init_from == "opd_L36"
  curriculum = dict(runs["opd_curriculum"].overrides)
  assert curriculum["curriculum.lengths"] == (16, 26, 36) and curriculum["curriculum.stage_steps"] == 400 // 3
  mix = dict(runs["mix_lam0.25_L36"].overrides)
  assert (mix["objective.kl"], mix["objective.lam"], mix["objective.prefix"]) == ("mixed", 0.25, "student")


def test_paper_preset_plans_at_real_lengths():
  config = config_files.load("study", "paper")
  entries, runs = study.plan(config)
  assert config.teacher.param_dtype == "bfloat16" and config.student.remat == "block"
  assert {dict(r.overrides)["sampling.max_new_tokens"] for r in runs.values()} == {1024, 4096}
  assert len(entries) == 22


@pytest.mark.parametrize("field,value,match", [
    ("study.cells", ("sft", "nope"), r"study: unknown cell\(s\) \['nope'\]"),
    ("study.lengths", (36, 16), r"study\.lengths must be \(short, long\)"),
    ("study.curriculum_lengths", (16, 24), r"study\.curriculum_lengths must increase strictly and end at the "
                                           r"long length 36"),
    ("study.mixing_lams", (0.0, 1.5), r"study\.mixing_lams must lie in \[0, 1\]"),
    ("study.grpo_from", ("sft", "opd"), None),
    ("study.estimator", "rough", r"study\.estimator must be"),
    ("study.estimator_arm", "sampled", r"study\.estimator_arm='sampled' does not fit cell 'dagger'"),
    ("study.seeds", (), r"study\.seeds must be a non-empty tuple of distinct ints >= 0, got \(\)"),
    ("study.seeds", (1, 1), r"study\.seeds must be .* got \(1, 1\)"),
    ("study.curriculum_h_min_relative", -0.5, r"study\.curriculum_h_min_relative must be a finite number >= 0"),
])
def test_bad_study_fields_are_named(field, value, match):
  config = config_files.load("study", **{field: value})
  if match is None:
    study.plan(config)  # sft is a cell: fine
    config = config_files.load("study", **{"study.cells": ("opd",), field: value})
    match = r"study\.grpo_from names 'sft', which is not in study\.cells"
  with pytest.raises(ValueError, match=match):
    study.plan(config)


def _result(correct, entropy, problems=40):
  """One seed's evaluation: problems correct[0]..correct[1]-1 right on all 4 samples, the rest wrong; every
  sample 10 tokens at `entropy` nats/token."""
  counts = np.zeros(problems, int)
  counts[correct[0]:correct[1]] = 4
  return dict(accuracy=counts.mean() / 4, samples_per_prompt=4, num_problems=problems,
              per_problem=dict(correct=counts.tolist(), tokens=[40] * problems, entropy_sum=[40 * entropy] * problems,
                               finished=[4] * problems, group=["2"] * problems))


def _row(name, group, after, before=None, **labels):
  """A report row over two seeds; `after`/`before`: one (correct, entropy) for both seeds, or a list of two."""
  def per_seed(spec):
    return [_result(*s) for s in (spec if isinstance(spec, list) else [spec, spec])]
  return report.Row(name, group, labels.pop("run", name), labels, per_seed(after), per_seed(before or after),
                    [1.0, 1.0], [1.0, 1.0], [[], []], [{}, {}])


def test_findings_take_their_verdicts_from_the_intervals():
  # (accuracy window, entropy) per cell; L36 windows start at 10: the same accuracy on other problems
  cells = {16: dict(sft=((0, 20), 0.3), dagger=((0, 24), 0.3), offline_rl=((0, 12), 0.15), opd=((0, 16), 0.1)),
           36: dict(sft=((10, 30), 0.3), dagger=((10, 34), 0.3), offline_rl=((10, 22), 0.15),
                    opd=((10, 26), 0.15))}
  kinds = dict(sft=("teacher", "forward"), dagger=("student", "forward"), offline_rl=("teacher", "reverse"),
               opd=("student", "reverse"))
  rows = [_row(f"{c} L{n}", "cells", spec, cell=c, prefix=kinds[c][0], kl=kinds[c][1], length=n, estimator="exact",
               run=f"{c}_L{n}") for n, by_cell in cells.items() for c, spec in by_cell.items()]
  # the estimator arm: the exact forward cells (shared runs) and the sampled reverse ones
  rows += [_row(f"{c} L36 exact", "estimator", cells[36][c], cell=c, prefix=kinds[c][0], kl="forward", length=36,
                estimator="exact", run=f"{c}_L36") for c in ("sft", "dagger")]
  rows += [_row(f"{c} L36 sampled", "estimator", (window, 0.2), cell=c, prefix=kinds[c][0], kl="reverse", length=36,
                estimator="sampled") for c, window in (("offline_rl", (10, 30)), ("opd", (10, 34)))]
  rows += [_row("mix 0", "mixing", cells[36]["dagger"], lam=0.0), _row("mix 0.25", "mixing", ((10, 35), 0.2), lam=0.25),
           _row("mix 1", "mixing", cells[36]["opd"], lam=1.0)]
  rows += [_row("fixed", "curriculum", cells[36]["opd"], curriculum=False),
           _row("gated", "curriculum", ((12, 28), 0.2), curriculum=True, h_min=0.1),
           _row("relative", "curriculum", [((10, 34), 0.2), ((10, 18), 0.2)], curriculum=True, h_min_relative=1.0)]
  rows += [_row("from dagger", "grpo", ((0, 40), 0.1), before=cells[36]["dagger"], kl="forward", init="dagger_L36"),
           _row("from opd", "grpo", cells[36]["opd"], kl="reverse", init="opd_L36")]
  found = findings.findings(report.Study(rows, [], [], [0, 1], pathlib.Path("."), 4, {}))
  A, D, I = stats.AGREES, stats.DISAGREES, stats.INCONCLUSIVE  # noqa: N806
  # 1 reverse entropy lower everywhere; 2 reverse accuracy lower everywhere (the paper says higher);
  # 3-4 the sampled estimator: entropy lower, accuracy the forward cells' own; 5 student prefixes +4 problems
  # in every pair; 6 the long length: the same accuracy on other problems; 7 opd entropy rises 0.1 -> 0.15;
  # 8 lam 0.25 beats reverse by 9 problems, 9 forward by 1 problem (a resample often misses it);
  # 10 curriculum: same accuracy on other problems; 11 the two seeds disagree; 12 GRPO gains 0.4 vs 0
  assert [f.verdict for f in found] == [A, D, A, I, A, I, D, A, I, I, I, A], [f.claim for f in found]
  assert found[0].interval.estimate == pytest.approx(-((0.2 + 0.15) + (0.15 + 0.15)) / 4)
  assert found[11].interval.estimate == pytest.approx(0.4)
  assert "lam=0.25: pure reverse 0.400 / mixed 0.625, +0.225 [" in found[7].measured
  assert all("[" in f.effect for f in found)


def test_smoke_study_with_two_seeds_end_to_end(tmp_path):
  workdir = config_files.smoke_study()  # shared with notebooks/tradeoffs.ipynb within a test session
  config = config_files.load("study", "smoke")
  assert tuple(config.study.seeds) == (0, 1)
  entries, runs = study.plan(config)
  text = (workdir / "report.md").read_text()
  sections = ("## Results", "## Accuracy by held-out group", "## Findings against the paper", "## Wall time",
              "## Plots")
  for section in sections + tuple(f"### {t}" for t in report_plots.TITLES.values()):
    assert section in text, section
  for name in report_plots.PLOTS:
    png = workdir / "plots" / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert f"](plots/{name}.png)" in text
  table = text.split("## Results")[1].split("## Accuracy by held-out group")[0]
  groups = text.split("## Accuracy by held-out group")[1].split("## Findings")[0]
  found = text.split("## Findings against the paper")[1].split("## Wall time")[0]
  assert "| 2 (n=8) |" in groups  # the smoke study's one difficulty, 8 problems
  table_rows = [line for line in table.splitlines() if line.startswith("| ") and "[95% CI]" not in line]
  assert len(table_rows) == 2 + len(entries)  # teacher, base, every entry
  group_rows = [line for line in groups.splitlines() if line.startswith("| ") and "(n=" not in line]
  for line in table_rows + group_rows:  # every number of every entry with its interval
    assert line.count(" [") >= 2 if line in table_rows else line.count(" [") == 1, line
  assert found.count("- **") == 12 and "not run" not in found  # every finding has the runs it needs
  assert found.count("Effect: ") == 12 and found.count("(predicted") == 12
  wall = text.split("## Wall time")[1].split("## Plots")[0]
  timings = json.loads((workdir / study.TIMINGS).read_text())
  assert sorted(timings) == sorted(f"seed{s}/{n}" for s in (0, 1) for n in ["base", *runs])
  assert f"over {len(timings)} runs" in wall

  # the table's numbers are the runs' own results.json, averaged over the seeds
  loaded = report.load(workdir)
  opd = [json.loads((study.run_dir(workdir, s, "opd_L12") / "results.json").read_text()) for s in (0, 1)]
  row = loaded.row("opd L12")
  assert [r["accuracy"] for r in row.after] == [r["student after"]["accuracy"] for r in opd]
  mean = np.mean([r["student after"]["accuracy"] for r in opd])
  assert report.interval(row.after, "accuracy").interval.estimate == pytest.approx(mean)
  assert f"| opd L12 | cells | {mean:.3f} [" in table
  grpo = json.loads((study.run_dir(workdir, 0, "grpo_from_opd_L12") / "results.json").read_text())

  def total(results):
    return results["flops"]["student_flops"] + results["flops"]["teacher_flops"]

  assert loaded.row("GRPO from opd L12").total_flops[0] == total(opd[0]) + total(grpo)  # distillation + RL
  # probes give every distillation run a curve of the student's own entropy; curriculum decisions are logged;
  # the relative arm's floor is 1.0 x the teacher's entropy measured by the same probe
  assert all("probe_entropy" in m for m in read_metrics(study.run_dir(workdir, 1, "sft_L12")))
  assert any("curriculum_entropy" in m for m in read_metrics(study.run_dir(workdir, 0, "opd_curriculum")))
  relative = json.loads((study.run_dir(workdir, 0, "opd_curriculum_rel1") / "results.json").read_text())
  assert relative["curriculum"]["h_min"] == pytest.approx(1.0 * relative["curriculum"]["teacher_entropy"])
  fixed = json.loads((study.run_dir(workdir, 0, "opd_curriculum") / "results.json").read_text())
  assert fixed["curriculum"]["h_min"] == config.curriculum.h_min and "teacher_entropy" not in fixed["curriculum"]

  # seeds change the draws and nothing else: a run's configs differ in the seed fields (and the base they
  # start from, the seed's own) only, and the seeds' bases and students differ
  recorded = [json.loads((study.run_dir(workdir, s, "opd_L12") / "config.json").read_text())["config"]
              for s in (0, 1)]
  assert {k for k in recorded[0] if recorded[0][k] != recorded[1][k]} == {"seed", "data.seed", "eval.seed",
                                                                          "student.path"}
  bases = [report.load(workdir).base[s]["per_problem"] for s in (0, 1)]
  assert bases[0] != bases[1]
  assert opd[0]["student after"]["per_problem"] != opd[1]["student after"]["per_problem"]
  # ... and the same seed twice gives the same results, bit for bit
  with study.compilation_cache_in(workdir / study.COMPILATION_CACHE):  # the study's compiled programs
    runner.run_distill(study.run_config(config, workdir, 0, runs["opd_L6"]), tmp_path / "again")
  first = json.loads((study.run_dir(workdir, 0, "opd_L6") / "results.json").read_text())
  assert json.loads((tmp_path / "again" / "results.json").read_text()) == first

  # rerunning resumes: every run is done, nothing is retrained
  stamps = {p: p.stat().st_mtime_ns for p in (workdir / "runs").glob("*/*/results.json")}
  assert len(stamps) == 2 * (len(runs) + 1)  # + base, per seed
  study.run_study(config, workdir)
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps



def test_relative_h_min_must_be_a_finite_number_at_least_zero():
  config = config_files.load("study", **{"curriculum.enabled": True, "curriculum.h_min_relative": -1.0})
  with pytest.raises(ValueError, match=r"curriculum\.h_min_relative must be a finite number >= 0 \(0 = off\)"):
    setup.make_curriculum(config, objectives.PRESETS["opd"])
  config = config_files.load("study", **{"curriculum.enabled": True, "curriculum.h_min_relative": 0.5})
  assert setup.make_curriculum(config, objectives.PRESETS["opd"]).h_min == config.curriculum.h_min  # set at run
