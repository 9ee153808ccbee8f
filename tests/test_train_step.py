"""The distillation step: each cell of the 2x2 and a mixture on a tiny model.

The step's loss is checked against an independent path (full logits from the models -> NumPy float64
reference of the exact token KLs), its update against plain SGD on the gradient of that loss, gradient
accumulation against one big batch, the 8-device mesh against 1 device, and golden values against
drift. The teacher is never donated or changed.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import numpy_reference as ref
from kldistill_jax import models, objectives
from kldistill_jax.models import sharding
from kldistill_jax.train import state as state_lib
from kldistill_jax.train.step import build_train_step

V, B, L, P = 24, 8, 10, 4
LR = 0.5
CELLS = {"sft": objectives.sft, "dagger": objectives.dagger, "offline_rl": objectives.offline_rl,
         "opd": objectives.opd, "mixed_0.3": objectives.mixed(0.3)}
# Loss of the first step of each cell (float32, jax 0.10 CPU), recorded from this test's own setup. opd
# equals offline_rl: the same tokens, weighted by the same (made-up) sampler log-probs.
GOLDEN = {"dagger": 1.01920974, "mixed_0.3": 1.00971198, "offline_rl": 0.38647225, "opd": 0.38647225,
          "sft": 1.01920974}


def _config(hidden):
  return models.qwen3(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10_000.0)


@pytest.fixture(scope="module")
def setup():
  student = state_lib.split(models.Transformer(_config(32), rngs=nnx.Rngs(0)))
  teacher = state_lib.split(models.Transformer(_config(48), rngs=nnx.Rngs(1)))
  k = jax.random.split(jax.random.key(7), 2)
  tokens = np.asarray(jax.random.randint(k[0], (B, L), 2, V), np.int32)
  lengths = np.asarray(jax.random.randint(k[1], (B,), 2, L - P + 1))  # response lengths 2..6
  attention = np.zeros((B, L), np.int32)
  loss_mask = np.zeros((B, L), np.int32)
  for b, n in enumerate(lengths):
    attention[b, :P + n] = 1
    loss_mask[b, P:P + n] = 1
  behavior = np.asarray(-jax.random.uniform(jax.random.key(9), (B, L), minval=0.5, maxval=3.0), np.float32)
  batch = dict(tokens=tokens, attention_mask=attention, loss_mask=loss_mask, behavior_logprobs=behavior)
  return student, teacher, batch


def _fresh(student, optimizer):
  return state_lib.init_state(jax.tree.map(jnp.copy, student.params), optimizer, seed=0)


def _step(student, teacher, batch, objective, *, micro_batches=1, optimizer=None, **kwargs):
  optimizer = optimizer or optax.sgd(LR)
  fn = build_train_step(student=state_lib.Split(student.graphdef, None, student.rest), objective=objective,
                        optimizer=optimizer, micro_batches=micro_batches, **kwargs)
  return fn(_fresh(student, optimizer), {k: jnp.asarray(v) for k, v in batch.items()}, teacher)


def _logits(split, batch):
  model = split.merge()
  mask = jnp.asarray(batch["attention_mask"])
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  return np.asarray(model(jnp.asarray(batch["tokens"]), positions, None, mask)[0], np.float64)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_step_loss_matches_reference_and_golden(setup, name):
  student, teacher, batch = setup
  objective = CELLS[name]
  _, metrics = _step(student, teacher, batch, objective)
  s, t = _logits(student, batch), _logits(teacher, batch)
  trained = [(b, i) for b in range(B) for i in range(1, L) if batch["loss_mask"][b, i]]
  fkl = np.mean([ref.forward_kl(s[b, i - 1], t[b, i - 1]) for b, i in trained])
  rkl = np.mean([ref.reverse_kl(s[b, i - 1], t[b, i - 1]) for b, i in trained])
  np.testing.assert_allclose(metrics["forward_kl"], fkl, rtol=2e-5)
  np.testing.assert_allclose(metrics["reverse_kl"], rkl, rtol=2e-5)
  assert metrics["num_tokens"] == len(trained)
  if objective.estimator == "exact":
    expected = objective.reverse_weight * rkl + (1 - objective.reverse_weight) * fkl
  else:  # the surrogate's value: mean over trained tokens of w * (log q - log p_T) (k1 reward term)
    s_lp = np.array([ref.log_softmax(s[b, i - 1])[batch["tokens"][b, i]] for b, i in trained])
    t_lp = np.array([ref.log_softmax(t[b, i - 1])[batch["tokens"][b, i]] for b, i in trained])
    # importance weights q / behaviour at either prefix source (the batch's made-up sampler log-probs)
    w = np.exp(s_lp - np.array([batch["behavior_logprobs"][b, i] for b, i in trained]))
    expected = np.mean(w * (s_lp - t_lp))
  np.testing.assert_allclose(metrics["loss"], expected, rtol=5e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], GOLDEN[name], rtol=1e-5, atol=2e-7)  # GPU reductions differ ~1e-7


@pytest.mark.parametrize("name,fused,chunk_size", [("sft", False, None), ("opd", False, None),
                                                   ("mixed_0.3", False, None), ("opd", True, 24),
                                                   ("mixed_0.3", True, 24)])
def test_update_is_sgd_on_the_objective(setup, name, fused, chunk_size):
  """The step's update against SGD on the gradient of `objectives.compute` on full logits; fused: the
  loss from hidden states (the exact KL fused, the sampled estimator's log-probs) in chunks of 3 time
  steps x 8 rows, so the last chunk overlaps."""
  student, teacher, batch = setup
  objective = dataclasses.replace(CELLS[name], chunk_size=chunk_size)
  new_state, _ = _step(student, teacher, batch, objective, fused=fused)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  mask = jbatch["attention_mask"]
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  t_logits = teacher.merge()(jbatch["tokens"], positions, None, mask)[0]

  def loss(params):
    s_logits = student.merge(params)(jbatch["tokens"], positions, None, mask)[0]
    return objectives.compute(objective, s_logits, t_logits, jbatch)[0]

  grads = jax.grad(loss)(student.params)
  expected = jax.tree.map(lambda p, g: p - LR * g, student.params, grads)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-6)  # float32 gradients x LR 0.5


@pytest.mark.parametrize("name", ["dagger", "offline_rl"])
def test_micro_batches_equal_one_big_batch(setup, name):
  student, teacher, batch = setup
  one, m1 = _step(student, teacher, batch, CELLS[name], micro_batches=1)
  four, m4 = _step(student, teacher, batch, CELLS[name], micro_batches=4)
  for key in ("loss", "forward_kl", "reverse_kl", "num_tokens"):
    np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
    # atol as in test_update_is_sgd_on_the_objective: float32 gradients x LR 0.5 (the embedding's, up to
    # ~1.7 per entry, is summed in another order with micro-batches: 2.2e-6 apart measured)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6)


def test_mesh_step_equals_single_device_step(setup):
  """2x2x2 ('data', 'fsdp', 'tensor') mesh vs 1 device, AdamW: params equal to 5e-5 after two steps (the
  updates are ~1e-2; Adam amplifies float32 summation-order noise in near-zero gradients)."""
  student, teacher, batch = setup
  optimizer = optax.adamw(1e-2)
  objective = CELLS["mixed_0.3"]
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  single = build_train_step(student=state_lib.Split(student.graphdef, None, student.rest),
                            objective=objective, optimizer=optimizer, micro_batches=2)
  state = _fresh(student, optimizer)
  for _ in range(2):
    state, metrics = single(state, jbatch, teacher)

  mesh = sharding.make_mesh(2, 2, 2)
  abstract = jax.eval_shape(lambda p: state_lib.init_state(p, optimizer, 0), student.params)
  shardings = state_lib.state_shardings(abstract, mesh)
  sharded_state = jax.jit(lambda p: state_lib.init_state(p, optimizer, 0), out_shardings=shardings)(
      jax.tree.map(jnp.copy, student.params))
  embed = sharded_state.params["embed_tokens"][...]
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # really sharded
  sharded_teacher = jax.device_put(teacher, jax.tree.map(
      lambda x: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), teacher))
  step = build_train_step(student=state_lib.Split(student.graphdef, None, student.rest), objective=objective,
                          optimizer=optimizer, micro_batches=2, state_shardings=shardings,
                          batch_sharding=sharding.batch_sharding(mesh))
  sbatch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in jbatch.items()}
  with jax.set_mesh(mesh):
    for _ in range(2):
      sharded_state, sharded_metrics = step(sharded_state, sbatch, sharded_teacher)
  np.testing.assert_allclose(sharded_metrics["loss"], metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5)


def test_teacher_is_neither_donated_nor_trained(setup):
  student, teacher, batch = setup
  before = [np.asarray(x) for x in jax.tree.leaves(teacher)]
  new_state, _ = _step(student, teacher, batch, CELLS["mixed_0.3"], optimizer=optax.adam(1e-2))
  after = jax.tree.leaves(teacher)  # would raise "Array has been deleted" if donated
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert len(jax.tree.leaves(new_state.opt_state)) == 1 + 2 * len(jax.tree.leaves(student.params))


def test_micro_batches_must_divide_the_batch(setup):
  student, teacher, batch = setup
  with pytest.raises(ValueError, match="micro_batches"):
    _step(student, teacher, batch, CELLS["sft"], micro_batches=0)


def test_bf16_compute_keeps_fp32_masters(setup):
  """compute_dtype bfloat16 (accelerator setting): masters and their update stay float32, the loss is
  the float32 one to bf16 precision."""
  student, teacher, batch = setup
  bf16 = state_lib.split(models.Transformer(_config(32).replace(compute_dtype="bfloat16"), rngs=nnx.Rngs(0)))
  new_state, metrics = _step(bf16, teacher, batch, CELLS["mixed_0.3"], optimizer=optax.adamw(1e-2))
  _, reference = _step(student, teacher, batch, CELLS["mixed_0.3"], optimizer=optax.adamw(1e-2))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.opt_state) if x.ndim)
  np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=3e-2)
  assert not np.allclose(metrics["loss"], reference["loss"], rtol=1e-6)  # bf16 really ran


class _TeacherThatMustNotRun:
  def merge(self):
    raise AssertionError("the teacher's forward ran although the batch's cached outputs serve the objective")


@pytest.mark.parametrize("objective,cache", [("sft", "topk"), ("opd", "logprobs")])
def test_cached_teacher_outputs_replace_the_live_forward(setup, objective, cache):
  """objectives.teacher_source decides for the step too: with cached outputs that serve the objective the
  step never merges (so never runs) the teacher it was handed, and its loss is the loss on the cache."""
  from kldistill_jax.train import step as step_lib
  student, teacher, batch = setup
  t_logp = np.asarray(jax.nn.log_softmax(jnp.asarray(_logits(teacher, batch), jnp.float32)))
  cached = {k: jnp.asarray(v) for k, v in batch.items()}
  if cache == "topk":
    ids = np.argsort(-t_logp, axis=-1)[..., :V].astype(np.int32)  # k = V: the exact forward KL
    cached.update(teacher_topk_ids=jnp.asarray(ids),
                  teacher_topk_logprobs=jnp.asarray(np.take_along_axis(t_logp, ids, -1)))
  else:
    picked = np.take_along_axis(t_logp[:, :-1], batch["tokens"][:, 1:, None], -1)[..., 0]
    cached["teacher_logprobs"] = jnp.asarray(np.pad(picked, ((0, 0), (1, 0))))
  live = {k: jnp.asarray(v) for k, v in batch.items()}
  kwargs = dict(student=state_lib.Split(student.graphdef, None, student.rest), objective=CELLS[objective])
  loss_cached, _ = step_lib.loss_and_metrics(student.params, cached, _TeacherThatMustNotRun(), **kwargs)
  loss_live, _ = step_lib.loss_and_metrics(student.params, live, teacher, **kwargs)
  # The cache holds float32 log-probs of the teacher's logits computed outside the step; the live path
  # recomputes them inside it (other fusion, other summation order): float32 rounding apart, 2.5e-5 seen.
  np.testing.assert_allclose(loss_cached, loss_live, rtol=1e-4)
