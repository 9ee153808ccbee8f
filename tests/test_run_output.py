"""What a run says while it works and when it ends: progress bars that name each evaluation, an ETA without
the compilation, and the list of what it wrote."""

import time

import pytest

import config_files
from kldistill_jax import progress
from kldistill_jax.train import runner, study

tqdm = pytest.importorskip("tqdm")


def test_distill_names_its_evaluations_and_what_it_wrote(tmp_path, capsys):
  config = config_files.load("quickstart", **{
      "steps": 2, "batch_size": 8, "checkpoint_every": 1, "log_every": 1, "student.warmup_steps": 0,
      "data.difficulties": (2,), "eval.difficulties": (2,), "sampling.max_new_tokens": 12,
      "eval.max_new_tokens": 12, "eval.num_problems": 8, "eval.batch_size": 8})
  workdir = tmp_path / "run"
  runner.run_distill(config, workdir)
  out, err = capsys.readouterr()
  for name in ("eval: teacher", "eval: student before", "eval: student after", "compiling..."):
    assert name in err, name
  wrote = out[out.index("wrote (workdir"):]
  for line in (f"student export  {workdir / 'student'}  (Hugging Face checkpoint", f"{workdir / 'results.json'}",
               f"{workdir / 'metrics.jsonl'}", f"tensorboard --logdir {workdir / 'tensorboard'}"):
    assert line in wrote, line


def test_compiled_restarts_the_clock_and_keeps_the_count():
  bar = progress.bar(10, "steps", initial=3)
  assert bar.postfix == "compiling..."
  time.sleep(0.3)  # the "compilation"
  bar.update(1)
  progress.compiled(bar)
  assert bar.n == 4 and bar.initial == 4  # the rate counts only steps after this one
  assert bar.format_dict["elapsed"] < 0.2
  bar.close()


def test_written_lists_only_what_exists(tmp_path):
  (tmp_path / "results.json").write_text("{}")
  text = runner.written(tmp_path, "policy")
  assert text.splitlines() == [f"wrote (workdir {tmp_path}):", f"  results  {tmp_path / 'results.json'}"]


def test_study_names_its_report_plots_and_runs(tmp_path):
  (tmp_path / "plots").mkdir()
  (tmp_path / "plots" / "accuracy.png").write_bytes(b"")
  for seed in ("seed0", "seed1"):
    (tmp_path / "runs" / seed / "sft_short").mkdir(parents=True)
  text = study.written(tmp_path, tmp_path / "report.md")
  assert f"report  {tmp_path / 'report.md'}" in text
  assert f"plots   {tmp_path / 'plots'}: accuracy.png" in text
  assert f"runs    {tmp_path / 'runs'}: seed0, seed1; in each: sft_short" in text
