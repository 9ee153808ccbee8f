"""Length buckets (`train.buckets`): the arithmetic by hand, the cut columns by hand, and exactness: the
real train step on a trimmed batch gives the loss, metrics and update of the full batch."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kldistill_jax import models, objectives
from kldistill_jax.errors import UserError
from kldistill_jax.models import sharding
from kldistill_jax.train import buckets
from kldistill_jax.train import state as state_lib
from kldistill_jax.train.step import build_train_step

V, P, N = 24, 8, 16
PROMPTS = [3, 2, 5, 1]  # real prompt tokens per row (left-padded to P)
COMPLETIONS = [6, 1, 3, 2]  # real completion tokens per row, EOS included (right-padded to N)


def _batch(prompts=PROMPTS, completions=COMPLETIONS, p=P, n=N, seed=0):
  b = len(prompts)
  rng = np.random.default_rng(seed)
  tokens = np.zeros((b, p + n), np.int32)  # padding id 0 everywhere a row has no token
  attention = np.zeros((b, p + n), np.int32)
  loss_mask = np.zeros((b, p + n), np.int32)
  behavior = np.zeros((b, p + n), np.float32)
  for i, (lp, lc) in enumerate(zip(prompts, completions)):
    tokens[i, p - lp:p + lc] = rng.integers(2, V, lp + lc)
    attention[i, p - lp:p + lc] = 1
    loss_mask[i, p:p + lc] = 1
    behavior[i, p:p + lc] = -rng.uniform(0.5, 3.0, lc)
  return dict(tokens=tokens, attention_mask=attention, loss_mask=loss_mask, behavior_logprobs=behavior)


def test_round_up_by_hand():
  assert buckets.round_up(1, 256, 4096) == 256
  assert buckets.round_up(256, 256, 4096) == 256
  assert buckets.round_up(257, 256, 4096) == 512
  assert buckets.round_up(4000, 256, 4096) == 4096  # never beyond the budget
  assert buckets.round_up(9, 8, 12) == 12
  assert buckets.round_up(5, 0, 48) == 48  # 0 = off
  with pytest.raises(UserError, match="sampling.length_bucket"):
    buckets.check_bucket(-1)


def test_trim_batch_cuts_the_all_padding_columns():
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  assert buckets.extents(batch["attention_mask"], P) == (5, 6)
  # bucket 4: prompt 5 -> 8 (= P, nothing dropped), completion 6 -> 8 of 16
  out = buckets.trim_batch(batch, P, 4)
  np.testing.assert_array_equal(out["tokens"], _batch()["tokens"][:, :P + 8])
  # bucket 3: prompt 5 -> 6 (the 2 leftmost columns go), completion 6 -> 6
  out = buckets.trim_batch(batch, P, 3)
  for key, full in _batch().items():
    np.testing.assert_array_equal(out[key], full[:, 2:P + 6], err_msg=key)
    assert not full[:, :2].any() and not full[:, P + 6:].any()  # only padding was cut
  assert buckets.trim_batch(batch, P, 0) is batch
  assert buckets.trim_batch(batch, P, 16) is batch  # a bucket over both parts cuts nothing


def test_trim_prompts_and_extra_keys():
  data = _batch()
  data_batch = {"prompt_tokens": jnp.asarray(data["tokens"][:, :P]),
                "prompt_mask": jnp.asarray(data["attention_mask"][:, :P]), "index": jnp.arange(4)}
  out = buckets.trim_prompts(data_batch, 2)  # longest prompt 5 -> 6
  np.testing.assert_array_equal(out["prompt_tokens"], data["tokens"][:, 2:P])
  np.testing.assert_array_equal(out["prompt_mask"], data["attention_mask"][:, 2:P])
  assert out["index"] is data_batch["index"]
  # entries with a sequence axis ([B, L, k] too) are cut alike; [B] entries are not
  batch = {k: jnp.asarray(v) for k, v in data.items()}
  batch["teacher_topk_ids"] = jnp.arange(4 * (P + N) * 3).reshape(4, P + N, 3)
  out = buckets.trim_batch(batch, P, 3)
  np.testing.assert_array_equal(out["teacher_topk_ids"], batch["teacher_topk_ids"][:, 2:P + 6])


def test_trim_keeps_the_batch_sharding():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  prompts, completions = PROMPTS * 2, [1, 2, 3, 1, 2, 1, 9, 1]  # the longest row lives on one device only
  batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
           for k, v in _batch(prompts, completions).items()}
  out = buckets.trim_batch(batch, P, 4)
  assert out["tokens"].shape == (8, P + 12)  # completion 9 -> 12, from the one device that holds it
  for key, value in out.items():
    assert value.sharding == batch[key].sharding, key
    np.testing.assert_array_equal(value, _batch(prompts, completions)[key][:, :P + 12])


def test_shape_log_once_per_shape(caplog):
  log = buckets.ShapeLog("train step")
  with caplog.at_level(logging.WARNING):
    for width in (8, 8, 12, 8):
      log({"tokens": np.zeros((2, width))})
  lines = [r.getMessage() for r in caplog.records if "compiling" in r.getMessage()]
  assert lines == ["train step: compiling for batch shape [2, 8] (1 shape so far)",
                   "train step: compiling for batch shape [2, 12] (2 shapes so far)"]


def _config(hidden):
  return models.qwen3(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, rope_theta=10_000.0)


def test_trimmed_step_equals_full_step():
  """The real jitted step (teacher scoring inside, forward and reverse KL, two micro-batches) on the full
  and the trimmed batch: same loss, metrics and parameters after one update, to float32 rounding."""
  objective = objectives.mixed(0.3)
  student = state_lib.split(models.Transformer(_config(32), rngs=nnx.Rngs(0)))
  teacher = state_lib.split(models.Transformer(_config(32), rngs=nnx.Rngs(1)))
  optimizer = optax.sgd(0.5)
  step = build_train_step(student=state_lib.Split(student.graphdef, None, student.rest),
                          objective=objective, optimizer=optimizer, micro_batches=2)
  full = {k: jnp.asarray(v) for k, v in _batch().items()}
  trimmed = buckets.trim_batch(full, P, 3)
  assert trimmed["tokens"].shape == (4, 12)  # from [4, 24]
  results = []
  for batch in (full, trimmed):
    state = state_lib.init_state(jax.tree.map(jnp.copy, student.params), optimizer, seed=0)
    results.append(step(state, batch, teacher))
  (state_full, metrics_full), (state_cut, metrics_cut) = results
  assert set(metrics_full) == set(metrics_cut)
  for key in metrics_full:
    np.testing.assert_allclose(metrics_cut[key], metrics_full[key], rtol=2e-5, atol=1e-6, err_msg=key)
  assert metrics_full["num_tokens"] == sum(COMPLETIONS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
               state_cut.params, state_full.params)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state_full.params,
                                       student.params))
  assert max(moved) > 1e-4  # the update did something, so the comparison above can fail
