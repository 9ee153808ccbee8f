"""The distillation step, a module-level pure function `(state, batch, teacher) -> (state, metrics)`.

Batch (global arrays, batch axis split over ('data', 'fsdp')):
  tokens          int [B, L]   prompt (left-padded) + response, contiguous per row.
  attention_mask  int [B, L]   1 on real tokens (prompt and response up to its EOS).
  loss_mask       int [B, L]   1 on the response tokens that are trained.
  behavior_logprobs / teacher_logprobs  optional [B, L] (see `objectives`).
  teacher_topk_ids / teacher_topk_logprobs  optional [B, L, k] (see `objectives`).

The teacher enters as a frozen `state.Split` (or None: the data is the teacher): it is never donated,
never differentiated, never in the optimizer state. `build_train_step` applies jit, shardings and
donation once.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

from kldistill_jax import objectives
from kldistill_jax.errors import UserError
from kldistill_jax.sampling import prompt_positions
from kldistill_jax.train.state import TrainState

STEP_KEYS = ("tokens", "attention_mask", "loss_mask", "behavior_logprobs", "teacher_logprobs",
             *objectives.TOPK_KEYS)


def _forward(model, batch, hidden):
  mask = batch["attention_mask"]
  out, _ = model(batch["tokens"], prompt_positions(mask), None, mask, return_hidden=hidden)
  return out


def teacher_outputs_cached(objective, batch) -> bool:
  """Whether the batch's cached teacher outputs replace the teacher forward: per-token log-probs serve
  the sampled estimator, top-k log-probs the exact forward KL. (The loop counts FLOPs by it too.)"""
  if objective.estimator == "sampled":
    return "teacher_logprobs" in batch
  return objective.kl == "forward" and objectives.TOPK_KEYS[0] in batch


def loss_and_metrics(params, batch, teacher, *, student, objective, fused=True):
  """Objective loss of the student with `params` on one (micro-)batch; teacher may be None."""
  model = student.merge(params)
  cached = teacher_outputs_cached(objective, batch)
  teacher_model = None if teacher is None or cached else teacher.merge()
  if fused and teacher_model is not None and objective.estimator == "exact":
    # Never materialises [B, L, V] logits (see losses.fused_token_kl).
    s_hidden = _forward(model, batch, hidden=True)
    t_hidden = lax.stop_gradient(_forward(teacher_model, batch, hidden=True))
    return objectives.compute_from_hidden(objective, s_hidden, model.output_head(), t_hidden,
                                          lax.stop_gradient(teacher_model.output_head()), batch)
  s_logits = _forward(model, batch, hidden=False)
  t_logits = None
  if teacher_model is not None:
    t_logits = lax.stop_gradient(_forward(teacher_model, batch, hidden=False))
  return objectives.compute(objective, s_logits, t_logits, batch)


def _micro_batches(batch, count):
  """[B, ...] -> [count, B / count, ...] taking rows count apart, so every micro-batch stays spread over
  the whole batch sharding instead of living on a slice of the devices."""
  def split(x):
    b = x.shape[0]
    return x.reshape(b // count, count, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def apply_gradients(state: TrainState, batch, loss_fn, *, optimizer, micro_batches=1):
  """One optimizer update of `loss_fn(params, micro_batch) -> (loss, metrics)` on `batch`, accumulating
  gradients over `micro_batches` in a scan.

  Each micro-batch carries `num_tokens`, the trained tokens (loss_mask[:, 1:]) of the WHOLE batch, so token
  means computed with it add up over micro-batches to the mean of one big batch, update included.
  """
  num_tokens = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(grads, micro):
    (_, metrics), g = grad_fn(state.params, dict(micro, num_tokens=num_tokens))
    return jax.tree.map(jnp.add, grads, g), metrics

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  grads, metrics = lax.scan(accumulate, zeros, _micro_batches(batch, micro_batches))
  metrics = jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)  # shares of global means add up
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["param_norm"] = optax.tree.norm(params)
  new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1, rng=state.rng)
  return new_state, metrics


def train_step(state: TrainState, batch, teacher, *, student, objective, optimizer, micro_batches=1,
               fused=True):
  """One distillation update of the objective on `batch` (see `apply_gradients`)."""
  batch = {k: batch[k] for k in STEP_KEYS if k in batch}
  loss_fn = functools.partial(loss_and_metrics, teacher=teacher, student=student, objective=objective,
                              fused=fused)
  return apply_gradients(state, batch, loss_fn, optimizer=optimizer, micro_batches=micro_batches)


def build_train_step(*, student, objective, optimizer, micro_batches, state_shardings=None,
                     batch_sharding=None, fused=True):
  """jit(train_step) with the static parts bound, the state donated and (on a mesh) its shardings."""
  if micro_batches < 1:
    raise UserError(f"micro_batches must be >= 1, got {micro_batches}")
  step = functools.partial(train_step, student=student, objective=objective, optimizer=optimizer,
                           micro_batches=micro_batches, fused=fused)
  if state_shardings is None:
    return jax.jit(step, donate_argnums=(0,))
  return jax.jit(step, donate_argnums=(0,), in_shardings=(state_shardings, batch_sharding, None),
                 out_shardings=(state_shardings, None))
