"""The teacher trajectory cache: rows are the teacher's own samples (checked by re-scoring them), a run on
the cache equals the online teacher-prefix run, and the teacher costs nothing per step afterwards."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from kldistill_jax import sampling
from kldistill_jax.models import hf
from kldistill_jax.train import runner, trajectories
from test_bad_input import TEACHER, tiny_config


def _offline_rl(**overrides):
  return tiny_config(**{"objective.prefix": "teacher", "objective.estimator": "sampled", "steps": 3,
                        "checkpoint_every": 3, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  online, cached = tmp_path_factory.mktemp("online"), tmp_path_factory.mktemp("cached")
  runner.run_distill(_offline_rl(), online)
  runner.run_distill(_offline_rl(**{"teacher_cache.enabled": True}), cached)
  return online, cached


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_cache_rows_are_teacher_samples(runs):
  _, cached = runs
  rows = trajectories.TrajectorySource(cached / "trajectories")
  assert len(rows) == 3 * 8  # steps x batch_size
  batch = {k: np.stack([rows[i][k] for i in range(len(rows))]) for k in trajectories.KEYS}
  teacher = hf.load(TEACHER)
  logprobs, _ = sampling.score(teacher, jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"]))
  trained = batch["loss_mask"].astype(bool)
  assert trained.sum() > 0
  np.testing.assert_allclose(batch["teacher_logprobs"][trained], np.asarray(logprobs)[trained], atol=2e-5)
  # Sampling temperature 1, no truncation: the behaviour policy IS the teacher.
  np.testing.assert_allclose(batch["behavior_logprobs"][trained], batch["teacher_logprobs"][trained],
                             atol=2e-5)


def test_cached_run_equals_online_run(runs):
  online, cached = runs
  for a, b in zip(_metrics(online), _metrics(cached)):
    assert a["step"] == b["step"]
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4, atol=1e-6)
    assert a["response_length"] == b["response_length"]
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  a, b = load_file(online / "student" / "model.safetensors"), load_file(cached / "student" / "model.safetensors")
  for name in a:
    np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_teacher_flops_stop_growing_with_the_cache(runs):
  online, cached = runs
  online_flops = [m["teacher_flops"] for m in _metrics(online)]
  cached_flops = [m["teacher_flops"] for m in _metrics(cached)]
  assert online_flops[0] < online_flops[1] < online_flops[2]  # generation + scoring every step
  assert cached_flops[0] == cached_flops[-1] > 0  # only the one-off build
  info = json.loads((cached / "trajectories" / trajectories.INFO).read_text())
  assert cached_flops[0] == info["teacher_flops"]
