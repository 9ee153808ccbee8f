"""Pass@k / Avg@k estimators against brute force, and `evaluate` with n samples per prompt on the
shipped arithmetic teacher."""

import fractions
import itertools
import math
import pathlib

import jax
import numpy as np
import pytest

from kldistill_jax import data, evaluation
from kldistill_jax.models import hf, sharding

TEACHER = pathlib.Path(__file__).resolve().parents[1] / "assets" / "arithmetic_teacher"


def brute_force_pass_at_k(n, c, k):
  """Fraction of the k-subsets of n samples (c correct) that hold at least one correct sample."""
  samples = [1] * c + [0] * (n - c)
  subsets = list(itertools.combinations(samples, k))
  return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration_of_subsets():
  for n in range(1, 8):
    for c in range(n + 1):
      for k in range(1, n + 1):
        assert evaluation.pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 10, 100, 500, 1000])
def test_pass_at_k_large_n_matches_exact_fractions(k):
  n = 1000
  c = np.array([0, 1, 3, 10, 100, 500, 999, 1000])
  got = evaluation.pass_at_k(n, c, k)
  exact = [float(1 - fractions.Fraction(math.comb(n - ci, k), math.comb(n, k))) for ci in c]
  assert got.shape == c.shape and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, exact, rtol=1e-12, atol=1e-15)


def test_pass_at_k_is_vectorised_and_checks_its_inputs():
  got = evaluation.pass_at_k(np.array([[4, 4], [10, 10]]), np.array([[0, 2], [3, 10]]), 2)
  assert got.shape == (2, 2)
  np.testing.assert_allclose(got, [[0, 1 - 1 / 6], [1 - 21 / 45, 1]])
  assert isinstance(evaluation.pass_at_k(5, 2, 3), float)
  for n, c, k in [(3, 1, 4), (3, 4, 1), (-1, 0, 1), (3, -1, 1), (3, 1, 0), (3.0, 1, 1)]:
    with pytest.raises(ValueError):
      evaluation.pass_at_k(n, c, k)


def test_avg_at_k():
  assert evaluation.avg_at_k([[1, 0, 0, 1], [1, 1, 1, 1]]) == 0.75
  with pytest.raises(ValueError):
    evaluation.avg_at_k([1, 0])


@pytest.fixture(scope="module")
def setup():
  mesh = sharding.make_mesh(8, 1, 1)
  teacher = hf.load(TEACHER, mesh=mesh)
  records = [data.ArithmeticTask(12, difficulties=(2, 3, 4), split="test")[i] for i in range(12)]
  return teacher, records, mesh


class Recorder:
  """A `check` that remembers every (text, ok) it was asked about, in call order."""

  def __init__(self):
    self.calls = []

  def __call__(self, text, answer):
    ok = data.is_correct(text, answer)
    self.calls.append((text, ok))
    return ok


def run(setup, check, max_new_tokens=36, **kwargs):
  teacher, records, mesh = setup
  return evaluation.evaluate(teacher, records, data.CharTokenizer(), check=check, template="raw",
                             prompt_len=12, max_new_tokens=max_new_tokens, batch_size=16,
                             rng=jax.random.key(0), mesh=mesh, **kwargs)


def test_n_samples_per_prompt(setup):
  check, n = Recorder(), 4
  r = run(setup, check, temperature=1.0, samples_per_prompt=n, pass_k=(1, 2, 4))
  assert r["num_problems"] == 12 and r["samples_per_prompt"] == n and len(check.calls) == 12 * n
  correct = np.array([ok for _, ok in check.calls]).reshape(12, n)  # rows are called in prompt order
  assert r["pass_at_1"] == r["avg_at_n"] == r["accuracy"] == correct.mean()
  assert r["pass_at_1"] <= r["pass_at_2"] <= r["pass_at_4"]
  for k in (2, 4):
    expected = np.mean([brute_force_pass_at_k(n, int(c), k) for c in correct.sum(1)])
    assert r[f"pass_at_{k}"] == pytest.approx(expected, abs=1e-12)
  texts = [text for text, _ in check.calls]
  assert any(len(set(texts[i * n:(i + 1) * n])) > 1 for i in range(12))  # each row has its own key
  groups = r["by_group"]
  assert set(groups) <= {"2", "3", "4"} and sum(g["num_problems"] for g in groups.values()) == 12
  assert sum(g["accuracy"] * g["num_problems"] for g in groups.values()) / 12 == pytest.approx(r["accuracy"])
  assert 0 <= r["truncation_rate"] <= 1 and r["mean_length"] > 0 and r["entropy"] > 0


def test_greedy_samples_are_identical(setup):
  check, n = Recorder(), 3
  r = run(setup, check, temperature=0.0, samples_per_prompt=n, pass_k=(1, 2, 3))
  texts = [text for text, _ in check.calls]
  assert all(len(set(texts[i * n:(i + 1) * n])) == 1 for i in range(12))
  assert r["pass_at_1"] == r["pass_at_2"] == r["pass_at_3"] == r["accuracy"]


def test_one_sample_per_prompt_keeps_the_old_results(setup):
  r = run(setup, data.is_correct, temperature=0.0)
  assert {"accuracy", "mean_length", "entropy", "truncation_rate", "num_problems", "examples",
          "pass_at_1", "by_group"} <= set(r)
  assert r["pass_at_1"] == r["accuracy"] > 0.8  # the shipped teacher solves the task
  teacher, records, mesh = setup
  tagged = [dict(record, benchmark="a" if i < 5 else "b") for i, record in enumerate(records)]
  by_benchmark = run((teacher, tagged, mesh), data.is_correct, temperature=0.0)["by_group"]
  assert {name: g["num_problems"] for name, g in by_benchmark.items()} == {"a": 5, "b": 7}  # over difficulty
  with pytest.raises(ValueError, match="pass_k"):
    run(setup, data.is_correct, temperature=0.0, samples_per_prompt=2, pass_k=(4,))


def test_truncated_completions_count_as_wrong_and_are_still_reported(setup):
  """A budget too short for some answers: with a check that accepts any text, exactly the rows that finished
  are correct (issue 11); truncated_is_wrong=False gives the check the last word."""
  asked = []

  def accepts_anything(text, answer):
    asked.append(text)
    return True

  r = run(setup, accepts_anything, temperature=0.0, max_new_tokens=16)
  assert 0 < r["truncation_rate"] < 1  # some rows cut off, some finished
  assert r["accuracy"] == pytest.approx(1 - r["truncation_rate"])
  assert len(asked) == round(12 * (1 - r["truncation_rate"]))  # a truncated row is not even checked
  lenient = run(setup, accepts_anything, temperature=0.0, max_new_tokens=16, truncated_is_wrong=False)
  assert lenient["accuracy"] == 1.0 and lenient["truncation_rate"] == r["truncation_rate"]
