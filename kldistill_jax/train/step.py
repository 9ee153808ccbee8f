"""The distillation step, a module-level pure function `(state, batch, teacher) -> (state, metrics)`.

Batch (global arrays, batch axis split over ('data', 'fsdp')):
  tokens          int [B, L]   prompt (left-padded) + response, contiguous per row.
  attention_mask  int [B, L]   1 on real tokens (prompt and response up to its EOS).
  loss_mask       int [B, L]   1 on the response tokens that are trained.
  behavior_logprobs / teacher_logprobs  optional [B, L] (see `objectives`).
  teacher_topk_ids / teacher_topk_logprobs  optional [B, L, k] (see `objectives`).
  teacher_hidden  optional bfloat16 [B, L, D_teacher]: the teacher's final (post-norm) hidden states,
                  cached (`trajectories`, teacher_cache.hidden_states); the teacher is then its output head.

The teacher enters as a frozen `state.Split`, as its output head [D_teacher, V] (an array: with
batch["teacher_hidden"], the exact loss needs nothing else of it, so no teacher forward runs), or None
(the data is the teacher): it is never donated, never differentiated, never in the optimizer state.
`build_train_step` applies jit, shardings and donation once.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

from kldistill_jax import cross_objectives, objectives
from kldistill_jax.errors import UserError
from kldistill_jax.models import sequence
from kldistill_jax.train.state import Split, TrainState

TEACHER_HIDDEN = objectives.TEACHER_HIDDEN
STEP_KEYS = ("tokens", "attention_mask", "loss_mask", "behavior_logprobs", "teacher_logprobs",
             *objectives.TOPK_KEYS, TEACHER_HIDDEN, *cross_objectives.KEYS)


def _forward(model, batch, hidden):
  return sequence.forward(model, batch["tokens"], batch["attention_mask"], hidden=hidden)


def loss_and_metrics(params, batch, teacher, *, student, objective, fused=True, shared_vocab=None):
  """Objective loss of the student with `params` on one (micro-)batch; teacher may be None.
  shared_vocab: the `cross_objectives.SharedVocab` when objective.cross_tokenizer is on."""
  model = student.merge(params)
  if objective.cross_tokenizer != "off":
    return _cross_tokenizer(model, batch, teacher.merge(), objective, shared_vocab)
  source = objectives.teacher_source(objective, batch, live_teacher=teacher is not None)
  if source == "hidden":
    return _from_cached_hidden(model, batch, teacher, objective=objective, fused=fused)
  teacher_model = teacher.merge() if source == "live" else None
  if fused and (teacher_model is not None or objective.estimator == "sampled"):
    # Never materialises [B, L, V] logits: the exact KL fused (losses.fused_token_kl), the sampled
    # estimator's token log-probs in position chunks (losses.token_logprobs).
    s_hidden = _forward(model, batch, hidden=True)
    t_hidden = t_head = None
    if teacher_model is not None:
      t_hidden = lax.stop_gradient(_forward(teacher_model, batch, hidden=True))
      t_head = lax.stop_gradient(teacher_model.output_head())
    return objectives.compute_from_hidden(objective, s_hidden, model.output_head(), t_hidden, t_head, batch)
  s_logits = _forward(model, batch, hidden=False)
  t_logits = None
  if teacher_model is not None:
    t_logits = lax.stop_gradient(_forward(teacher_model, batch, hidden=False))
  return objectives.compute(objective, s_logits, t_logits, batch)


def _cross_tokenizer(model, batch, teacher_model, objective, shared_vocab):
  """Each model on its own tokens of the same text (`cross_objectives`): logits, never fused."""
  s_logits = _forward(model, batch, hidden=False)
  teacher_view = {"tokens": batch["teacher_tokens"], "attention_mask": batch["teacher_attention_mask"]}
  t_logits = lax.stop_gradient(_forward(teacher_model, teacher_view, hidden=False))
  return cross_objectives.compute(objective, s_logits, t_logits, batch, shared_vocab)


def _from_cached_hidden(model, batch, teacher_head, *, objective, fused):
  """The exact loss at cached teacher hidden states: the teacher's logits are hidden @ head, nothing more.
  The bfloat16 states are cast to the head's dtype first (float32 for a float32 teacher: what its live
  forward would hand the loss), so the only difference from a live teacher is the states' rounding."""
  if getattr(teacher_head, "ndim", None) != 2:
    raise ValueError("batch['teacher_hidden'] needs the teacher's output head [D, V] as the teacher "
                     f"argument, got {type(teacher_head).__name__}")
  t_hidden = batch[TEACHER_HIDDEN]
  t_hidden = t_hidden.astype(jnp.promote_types(t_hidden.dtype, teacher_head.dtype))
  if fused:
    return objectives.compute_from_hidden(objective, _forward(model, batch, hidden=True),
                                          model.output_head(), t_hidden, teacher_head, batch)
  t_logits = jnp.dot(t_hidden, teacher_head, preferred_element_type=jnp.float32)
  return objectives.compute(objective, _forward(model, batch, hidden=False), t_logits, batch)


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
               fused=True, shared_vocab=None):
  """One distillation update of the objective on `batch` (see `apply_gradients`)."""
  batch = {k: batch[k] for k in STEP_KEYS if k in batch}
  loss_fn = functools.partial(loss_and_metrics, teacher=teacher, student=student, objective=objective,
                              fused=fused, shared_vocab=shared_vocab)
  return apply_gradients(state, batch, loss_fn, optimizer=optimizer, micro_batches=micro_batches)


def build_train_step(*, student, objective, optimizer, micro_batches, state_shardings=None,
                     batch_sharding=None, fused=True, shared_vocab=None):
  """jit(train_step) with the static parts bound, the state donated and (on a mesh) its shardings."""
  if micro_batches < 1:
    raise UserError(f"micro_batches must be >= 1, got {micro_batches}")

  def step(state, batch, teacher, frozen):
    return train_step(state, batch, teacher, student=Split(student.graphdef, None, frozen),
                      objective=objective, optimizer=optimizer, micro_batches=micro_batches, fused=fused,
                      shared_vocab=shared_vocab)

  if state_shardings is None:
    jitted = jax.jit(step, donate_argnums=(0,))
  else:
    jitted = jax.jit(step, donate_argnums=(0,), in_shardings=(state_shardings, batch_sharding, None, None),
                     out_shardings=(state_shardings, None))
  # The student's frozen variables (a LoRA student's base weights) are an argument, never a closed-over
  # constant: jit would bake constants into the compiled program.
  def run(state, batch, teacher):
    return jitted(state, batch, teacher, student.rest)

  # bench/memory_plan.py compiles the step on abstract inputs without running it.
  run.lower = lambda state, batch, teacher: jitted.lower(state, batch, teacher, student.rest)
  return run
