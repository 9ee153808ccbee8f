"""Sampled-token estimators: they see only the log-probs of the tokens actually drawn, shape [B, T].

Position t of every argument refers to the same token (the caller aligns them; nothing is shifted here).
"""

import jax.numpy as jnp
from jax import lax

from kldistill_jax.losses import _checks
from kldistill_jax.losses.chunking import mask_weights, reduce_positions

KL_ESTIMATORS = ("k1", "k2", "k3")


def _as_f32(x):
  return None if x is None else jnp.asarray(x).astype(jnp.float32)


def reward_to_go(rewards, mask=None, *, discount=0.0):
  """R_t = Σ_{k >= t, mask_k != 0} discount^(k - t) * r_k along the last axis (masked rewards count 0).

  discount = 0 gives R_t = r_t at unmasked tokens; discount = 1 the undiscounted sum of the future.
  """
  _checks.check_in_range("discount", discount, 0.0, 1.0)
  # Masked rewards are dropped; fractional mask weights scale loss terms elsewhere, never rewards.
  r = jnp.where(mask_weights(mask, rewards.shape) != 0, _as_f32(rewards), 0.0)

  def step(future, r_t):
    total = r_t + discount * future
    return total, total

  _, rtg_TB = lax.scan(step, jnp.zeros(r.shape[:-1], jnp.float32), jnp.moveaxis(r, -1, 0), reverse=True)
  return jnp.moveaxis(rtg_TB, 0, -1)


def importance_weights(student_logprobs, behavior_logprobs, clip=None):
  """Stop-gradient per-token ratios q_θ(y_t) / behavior(y_t), truncated above at `clip` when given.

  E_{y~behavior}[w(y) f(y)] = E_{y~q_θ}[f(y)] untruncated, provided behavior(y) > 0 wherever q_θ(y) > 0
  (a greedy, top-k or top-p sampler breaks that: no weight brings back a token that is never drawn).
  """
  if clip is not None:
    _checks.check_in_range("clip", clip, 0.0, float("inf"), low_open=True)
  log_ratio = lax.stop_gradient(_as_f32(student_logprobs) - _as_f32(behavior_logprobs))
  weights = jnp.exp(log_ratio)
  return weights if clip is None else jnp.minimum(weights, clip)


def reverse_kl_policy_gradient(student_logprobs, teacher_logprobs, mask=None, *, discount=0.0,
                               behavior_logprobs=None, clip=None, num_tokens=None):
  """Reverse KL(q_θ || p_T) on sampled tokens: k1 value, REINFORCE gradient with a dense reward.

  Args:
    student_logprobs: [B, T] log q_θ(y_t | s_t) of the sampled tokens; gradients flow through these.
    teacher_logprobs: [B, T] log p_T(y_t | s_t) of the same tokens; treated as constant.
    mask: optional [B, T]; only unmasked tokens earn reward; float weights scale each token's term
      of the estimate (e.g. sequence probabilities for an exact expectation over enumerated sequences).
    discount: reward-to-go discount. 0 = per-token reward (on-policy distillation as usually run);
      1 = unbiased gradient of the SEQUENCE-level reverse KL (the future terms included).
    behavior_logprobs: [B, T] log-probs under the distribution that actually drew the tokens (the
      teacher, for teacher prefixes; the student at another sampling temperature); adds stop-gradient
      importance weights q_θ / behavior per token. None: the tokens are draws of q_θ (weights 1).
      With discount > 0 these per-token weights do not correct the future rewards (no product of ratios).
    clip: upper truncation of the importance weights (None: untruncated).
    num_tokens: denominator of the token mean (the global count when accumulating micro-batches).

  Returns:
    A scalar whose VALUE is the k1 estimate mean_t w_t (log q_θ - log p_T) over unmasked tokens
    (w_t = 1 without `behavior_logprobs`) and whose GRADIENT w.r.t. `student_logprobs` is the REINFORCE
    estimator -mean_t w_t R_t ∇ log q_θ(y_t) with reward r_t = stop_gradient(log p_T - log q_θ) and R_t
    its reward-to-go.

  Unbiased means, for discount = 0 and clip None: at each position, the expectation over y_t ~ behavior
  (None: q_θ) of the gradient is ∇ KL(q_θ(·|s_t) || p_T(·|s_t)) for that prefix s_t, whatever
  distribution the prefixes came from, provided behavior > 0 wherever q_θ > 0.
  """
  _checks.check_same_shape("teacher_logprobs", teacher_logprobs, "student_logprobs", student_logprobs)
  _checks.check_same_shape("behavior_logprobs", behavior_logprobs, "student_logprobs", student_logprobs)
  _checks.check_mask(mask, student_logprobs.shape)
  logq, logp = _as_f32(student_logprobs), _as_f32(teacher_logprobs)
  weights = (jnp.ones_like(logq) if behavior_logprobs is None
             else importance_weights(logq, behavior_logprobs, clip))
  reward = lax.stop_gradient(logp - logq)
  returns = lax.stop_gradient(reward_to_go(reward, mask, discount=discount))
  value = reduce_positions(lax.stop_gradient(weights * (logq - logp)), mask, "mean", num_tokens)
  surrogate = reduce_positions(-weights * returns * logq, mask, "mean", num_tokens)
  # value + (surrogate - sg(surrogate)): the value of the estimate, the gradient of the surrogate.
  return value + surrogate - lax.stop_gradient(surrogate)


def forward_kl_from_teacher_samples(student_logprobs, teacher_logprobs, mask=None, *, num_tokens=None):
  """Forward KL(p_T || q_θ) on tokens DRAWN FROM THE TEACHER: k1 value, cross-entropy gradient.

  The value is mean_t (log p_T - log q_θ) over unmasked tokens, an unbiased estimate of the forward KL
  at those prefixes; the gradient w.r.t. `student_logprobs` is that of the token-mean negative
  log-likelihood, -mean_t ∇ log q_θ(y_t) (hard-label SFT on teacher samples). Shapes [B, T].
  """
  _checks.check_same_shape("teacher_logprobs", teacher_logprobs, "student_logprobs", student_logprobs)
  _checks.check_mask(mask, student_logprobs.shape)
  logq, logp = _as_f32(student_logprobs), _as_f32(teacher_logprobs)
  value = reduce_positions(lax.stop_gradient(logp - logq), mask, "mean", num_tokens)
  nll = reduce_positions(-logq, mask, "mean", num_tokens)
  return value + nll - lax.stop_gradient(nll)


def kl_estimate(student_logprobs, teacher_logprobs, mask=None, *, kind="k1", reduction="mean",
                num_tokens=None):
  """Estimate of KL(q_θ || p_T) from tokens drawn from q_θ (Schulman's k1 / k2 / k3), for logging.

  With log-ratio l = log p_T - log q_θ:  k1 = -l (unbiased, high variance, can be negative),
  k2 = l^2 / 2 (biased, low variance), k3 = (e^l - 1) - l (unbiased, always >= 0).
  """
  if kind not in KL_ESTIMATORS:
    raise ValueError(f"kind must be one of {KL_ESTIMATORS}, got {kind!r}")
  _checks.check_reduction(reduction)
  _checks.check_same_shape("teacher_logprobs", teacher_logprobs, "student_logprobs", student_logprobs)
  _checks.check_mask(mask, student_logprobs.shape)
  log_ratio = _as_f32(teacher_logprobs) - _as_f32(student_logprobs)
  if kind == "k1":
    values = -log_ratio
  elif kind == "k2":
    values = 0.5 * jnp.square(log_ratio)
  else:
    values = jnp.expm1(log_ratio) - log_ratio
  return reduce_positions(values, mask, reduction, num_tokens)
