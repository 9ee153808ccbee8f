"""Forward KL against a teacher known only through its top-k log-probs (e.g. a cached teacher).

Both distributions are COARSENED to the teacher's k listed tokens plus one "rest" bucket holding every
other token, and the loss is the exact KL of the coarsened distributions:

    Σ_{i≤k} p_i (log p_i − log q_i) + p_rest (log p_rest − log q_rest),
    p_rest = 1 − Σ_{i≤k} p_i,   q_rest = 1 − Σ_{i≤k} q_i.

A true KL, at most the full forward KL(p_T || q_θ) (data-processing inequality), equal to it when the k
tokens are the whole vocabulary. Its gradient w.r.t. the student logits is (q − target) / temperature,
target = p_i on the listed tokens and p_rest · q_v / q_rest elsewhere: cross-entropy against the teacher's
top-k, the rest mass spread the way the student spreads it.
"""

import math

import jax
import jax.numpy as jnp

from kldistill_jax.losses import _checks
from kldistill_jax.losses.chunking import reduce_positions
from kldistill_jax.losses.divergences import log_probs


def _log1mexp(x):
  """log(1 − e^x) for x < 0, accurate both near 0 and far below it (Mächler's switch at −log 2)."""
  return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _teacher_rest(t_logp_k):
  """log p_rest from the listed log-probs [..., k]; −inf where they hold all the mass.

  A listed mass >= 1 only happens when p_rest is 0 up to rounding, so that is the one place it is clamped.
  """
  listed = jax.nn.logsumexp(t_logp_k, axis=-1)
  has_rest = listed < 0
  return jnp.where(has_rest, _log1mexp(jnp.where(has_rest, listed, -1.0)), -jnp.inf)


def _student_rest(s_logp, ids, has_rest):
  """log q_rest as a logsumexp over the UNLISTED tokens (1 − Σ q_i would cancel catastrophically)."""
  listed = jnp.put_along_axis(jnp.zeros(s_logp.shape, bool), ids, True, axis=-1, inplace=False)
  # Rows without a rest bucket get finite dummies: an all -inf logsumexp has a NaN gradient.
  rest = jnp.where(has_rest[..., None], jnp.where(listed, -jnp.inf, s_logp), 0.0)
  return jax.nn.logsumexp(rest, axis=-1)


def topk_kl_from_log_probs(student_log_probs, teacher_topk_ids, teacher_topk_logprobs):
  """The coarsened forward KL per position from float32 student log-probs [..., V] and the teacher's
  top-k ids / log-probs [..., k]; listed tokens with p_i = 0 contribute 0."""
  t_logp = teacher_topk_logprobs.astype(jnp.float32)
  s_logp_k = jnp.take_along_axis(student_log_probs, teacher_topk_ids, axis=-1)
  # The inner `where` keeps -inf - -inf = NaN out of both the value and the gradient.
  listed = jnp.sum(jnp.exp(t_logp) * jnp.where(t_logp > -jnp.inf, t_logp - s_logp_k, 0.0), axis=-1)
  if teacher_topk_ids.shape[-1] == student_log_probs.shape[-1]:
    return listed  # k distinct ids = the whole vocabulary: the rest bucket is empty, p_rest = 0 exactly
  t_rest = _teacher_rest(t_logp)
  has_rest = t_rest > -jnp.inf
  s_rest = _student_rest(student_log_probs, teacher_topk_ids, has_rest)
  rest = jnp.exp(t_rest) * jnp.where(has_rest, t_rest - s_rest, 0.0)
  return listed + rest


def _check_topk(student_logits, ids, logprobs):
  _checks.check_same_shape("teacher_topk_logprobs", logprobs, "teacher_topk_ids", ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"teacher_topk_ids must be integers, got dtype {ids.dtype}")
  positions, vocab = student_logits.shape[:-1], student_logits.shape[-1]
  if tuple(ids.shape[:-1]) != tuple(positions) or not 1 <= ids.shape[-1] <= vocab:
    raise ValueError(f"teacher_topk_ids has shape {tuple(ids.shape)}; expected [..., k] with [...] = "
                     f"{tuple(positions)} (student_logits {tuple(student_logits.shape)}) and 1 <= k <= "
                     f"V={vocab}")


def topk_forward_kl(student_logits, teacher_topk_ids, teacher_topk_logprobs, mask=None, *,
                    temperature=1.0, reduction="mean", num_tokens=None):
  """Forward KL(p_T || q_θ) coarsened to the teacher's top-k tokens plus a rest bucket (module docstring).

  Args:
    student_logits: [..., V], any float dtype.
    teacher_topk_ids: int [..., k], distinct token ids per position (e.g. `jax.lax.top_k`'s), k <= V.
    teacher_topk_logprobs: [..., k] the teacher's log-probs of those ids AT `temperature` (the trajectory
      cache stores temperature-1 values, so the trainer allows top-k caches only at temperature 1).
    mask: optional [...] (bool or float weights); masked positions contribute nothing.
    temperature: divides the student logits.
    reduction, num_tokens: as in `forward_kl`.
  """
  _checks.check_reduction(reduction)
  _checks.check_temperature(temperature)
  _check_topk(student_logits, teacher_topk_ids, teacher_topk_logprobs)
  _checks.check_mask(mask, student_logits.shape[:-1])
  keep = jnp.ones(student_logits.shape[:-1], bool) if mask is None else mask != 0
  # Masked positions get zero logits and log-probs (finite, no rest bucket), so padding rows (e.g. all
  # -inf) put no NaN into the gradient; their values are meaningless and the reduction drops them.
  s = jnp.where(keep[..., None], student_logits, 0.0)
  t = jnp.where(keep[..., None], teacher_topk_logprobs, 0.0)
  values = topk_kl_from_log_probs(log_probs(s, temperature), teacher_topk_ids, t)
  return reduce_positions(values, mask, reduction, num_tokens)
