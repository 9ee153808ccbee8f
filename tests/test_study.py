"""The study: its plan (entries, shared runs), config checks, the report's findings rule, and a tiny study end
to end producing every section of report.md and every plot."""

import json
import pathlib

import pytest

import config_files
from kldistill_jax import report
from kldistill_jax.train import study
from kldistill_jax.train.metrics import read_metrics


def test_default_plan_shares_identical_runs():
  entries, runs = study.plan(config_files.load("study"))
  assert len(entries) == 8 + 5 + 2 + 2
  by_name = {e.name: e.run for e in entries}
  # mixing's pure directions at student prefixes ARE the on-policy cells; the fixed-length arm IS opd L36
  assert by_name["mix lam=0 L36"] == "dagger_L36"
  assert by_name["mix lam=1 L36"] == "opd_L36"
  assert by_name["opd fixed L36"] == "opd_L36"
  assert sorted(runs) == sorted(
      [f"{c}_L{n}" for c in ("sft", "dagger", "offline_rl", "opd") for n in (16, 36)]
      + ["mix_lam0.25_L36", "mix_lam0.5_L36", "mix_lam0.75_L36", "opd_curriculum",
         "grpo_from_dagger_L36", "grpo_from_opd_L36"])
  assert list(runs)[-2:] == ["grpo_from_dagger_L36", "grpo_from_opd_L36"]  # after the runs they start from
  assert runs["grpo_from_opd_L36"].init_from == "opd_L36"
  curriculum = dict(runs["opd_curriculum"].overrides)
  assert curriculum["curriculum.lengths"] == (16, 26, 36) and curriculum["curriculum.stage_steps"] == 400 // 3
  mix = dict(runs["mix_lam0.25_L36"].overrides)
  assert (mix["objective.kl"], mix["objective.lam"], mix["objective.prefix"]) == ("mixed", 0.25, "student")


def test_paper_preset_plans_at_real_lengths():
  config = config_files.load("study", "paper")
  entries, runs = study.plan(config)
  assert config.teacher.param_dtype == "bfloat16" and config.student.remat
  assert {dict(r.overrides)["sampling.max_new_tokens"] for r in runs.values()} == {1024, 4096}
  assert len(entries) == 17


@pytest.mark.parametrize("field,value,match", [
    ("study.cells", ("sft", "nope"), r"study: unknown cell\(s\) \['nope'\]"),
    ("study.lengths", (36, 16), r"study\.lengths must be \(short, long\)"),
    ("study.curriculum_lengths", (16, 24), r"study\.curriculum_lengths must increase strictly and end at the "
                                           r"long length 36"),
    ("study.mixing_lams", (0.0, 1.5), r"study\.mixing_lams must lie in \[0, 1\]"),
    ("study.grpo_from", ("sft", "opd"), None),
    ("study.estimator", "rough", r"study\.estimator must be"),
])
def test_bad_study_fields_are_named(field, value, match):
  config = config_files.load("study", **{field: value})
  if match is None:
    study.plan(config)  # sft is a cell: fine
    config = config_files.load("study", **{"study.cells": ("opd",), field: value})
    match = r"study\.grpo_from names 'sft', which is not in study\.cells"
  with pytest.raises(ValueError, match=match):
    study.plan(config)


def _row(name, group, accuracy, entropy, before=0.5, **labels):
  result = dict(accuracy=accuracy, entropy=entropy, num_problems=100, mean_length=10.0, truncation_rate=0.0)
  return report.Row(name, group, name, labels, result, dict(result, accuracy=before), 1.0, 1.0, [])


def _study(rows):
  teacher = dict(accuracy=1.0, entropy=0.1, mean_length=10.0, truncation_rate=0.0, num_problems=100)
  return report.Study(rows, teacher, teacher, pathlib.Path("."), samples_per_prompt=4)


def test_findings_follow_the_numbers_and_the_noise_rule():
  cells = []
  specs = [("sft", "teacher", "forward"), ("dagger", "student", "forward"), ("offline_rl", "teacher", "reverse"),
           ("opd", "student", "reverse")]
  numbers = {16: [(0.5, 0.9), (0.8, 0.8), (0.4, 0.3), (0.7, 0.2)],
             36: [(0.5, 0.9), (0.51, 0.8), (0.4, 0.3), (0.6, 0.25)]}  # (accuracy, entropy) per cell
  for length, values in numbers.items():
    for (cell, prefix, kl), (accuracy, entropy) in zip(specs, values):
      cells.append(_row(f"{cell} L{length}", "cells", accuracy, entropy, cell=cell, prefix=prefix, kl=kl,
                        length=length))
  mixing = [_row(f"mix {lam}", "mixing", acc, 0.5, lam=lam) for lam, acc in ((0.0, 0.51), (0.25, 0.9), (1.0, 0.6))]
  curriculum = [_row("fixed", "curriculum", 0.6, 0.25, curriculum=False),
                _row("gated", "curriculum", 0.61, 0.4, curriculum=True)]
  grpo = [_row("from dagger", "grpo", 0.9, 0.5, before=0.51, init="dagger_L36"),
          _row("from opd", "grpo", 0.7, 0.5, before=0.9, init="opd_L36")]
  found = report.findings(_study(cells + mixing + curriculum + grpo))
  verdicts = [f.agrees for f in found]
  # 1 reverse has lower entropy everywhere; 2 student > teacher prefixes at L16 clearly, at L36 forward is a
  # 0.50 vs 0.51 tie and reverse is clear; 3 opd entropy 0.2 -> 0.25 rises: disagrees; 4 lam 0.25 beats
  # lam 1 clearly; 5 curriculum 0.61 vs 0.60: within noise; 6 ranking flips (opd best before, dagger after)
  assert verdicts == [True, True, False, True, None, True]
  assert "lam=0.25: 0.900" in found[3].measured


def test_tiny_study_end_to_end(tmp_path):
  config = config_files.load("study", "smoke")
  assert study.run_study(config, tmp_path)
  text = (tmp_path / "report.md").read_text()
  for section in ("## Results", "## Accuracy by held-out group", "## Findings against the paper", "## Plots", "### Accuracy vs entropy",
                  "### Entropy and length over training", "### Before and after GRPO", "### Accuracy vs FLOPs"):
    assert section in text, section
  for name in report.PLOTS:
    png = tmp_path / "plots" / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert f"](plots/{name}.png)" in text
  entries, runs = study.plan(config)
  table = text.split("## Results")[1].split("## Accuracy by held-out group")[0]
  groups = text.split("## Accuracy by held-out group")[1].split("## Findings")[0]
  assert "| 2 (n=8) |" in groups  # the smoke study's one difficulty, 8 problems
  assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 2 + len(entries)  # header, teacher, base
  assert text.count("- **") == 6  # every finding has the runs it needs
  # the table's numbers are the runs' own results.json
  loaded = report.load(tmp_path)
  opd = json.loads((tmp_path / "runs" / "opd_L12" / "results.json").read_text())
  assert loaded.row("opd L12").after["accuracy"] == opd["student after"]["accuracy"]
  grpo = json.loads((tmp_path / "runs" / "grpo_from_opd_L12" / "results.json").read_text())

  def total(results):
    return results["flops"]["student_flops"] + results["flops"]["teacher_flops"]

  assert loaded.row("GRPO from opd L12").total_flops == total(opd) + total(grpo)  # its distillation + its RL
  assert loaded.row("GRPO from opd L12").flops == total(grpo)
  # probes give every distillation run a curve of the student's own entropy; curriculum decisions are logged
  assert all("probe_entropy" in m for m in read_metrics(tmp_path / "runs" / "sft_L12"))
  assert any("curriculum_entropy" in m for m in read_metrics(tmp_path / "runs" / "opd_curriculum"))
  # rerunning resumes: every run is done, nothing is retrained
  stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/results.json")}
  assert len(stamps) == len(runs) + 1  # + base
  study.run_study(config, tmp_path)
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
