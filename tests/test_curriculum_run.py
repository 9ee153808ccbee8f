"""The entropy-gated length curriculum in the runner: the sampled training length follows the decisions,
each decision is logged with its measured entropy, and the state is checkpointed (a resumed run goes on)."""

import json

import pytest

from kldistill_jax.train import runner
from kldistill_jax.train.metrics import read_metrics
from test_bad_input import tiny_config


def _run(tmp_path, h_min, steps=4):
  config = tiny_config(**{"steps": steps, "objective.estimator": "exact", "curriculum.enabled": True,
                          "curriculum.lengths": (4, 8, 12), "curriculum.stage_steps": 1,
                          "curriculum.h_min": h_min, "curriculum.eval_problems": 8})
  summary = runner.run_distill(config, tmp_path)
  return summary, read_metrics(tmp_path)


def test_always_stable_walks_every_length(tmp_path):
  summary, metrics = _run(tmp_path, h_min=0.0)
  assert [m["training_length"] for m in metrics] == [4, 8, 12, 12]
  assert [m["max_length"] <= m["training_length"] for m in metrics] == [True] * 4
  history = summary["curriculum"]["history"]
  assert [d["decision"] for d in history] == ["advance", "advance", "complete"]
  assert [m["curriculum_entropy"] for m in metrics[:3]] == [d["entropy"] for d in history]
  assert all(d["entropy"] > 0 for d in history)
  assert "curriculum_entropy" not in metrics[3]  # no stage ends after the last one
  evals = [m["eval_flops"] for m in metrics]  # each measurement's sampling counts in the eval phase
  assert 0 < evals[0] < evals[1] < evals[2] == evals[3]


def test_collapsed_entropy_holds_the_first_length_and_survives_resume(tmp_path):
  summary, metrics = _run(tmp_path, h_min=1e6, steps=2)
  assert [m["training_length"] for m in metrics] == [4, 4]
  assert [d["decision"] for d in summary["curriculum"]["history"]] == ["fall_back", "held"]
  summary, metrics = _run(tmp_path, h_min=1e6, steps=4)  # resumes at step 2 with the held state
  assert [m["training_length"] for m in metrics] == [4, 4, 4, 4]
  assert [d["decision"] for d in summary["curriculum"]["history"]] == ["fall_back", "held", "held"]


def test_curriculum_needs_sampled_prefixes(tmp_path):
  config = tiny_config(**{"curriculum.enabled": True, "objective.prefix": "dataset",
                          "objective.kl": "forward", "objective.estimator": "exact"})
  with pytest.raises(ValueError, match=r"curriculum\.enabled .* needs sampled prefixes"):
    runner.run_distill(config, tmp_path)
