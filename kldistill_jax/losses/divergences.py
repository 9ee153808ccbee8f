"""Exact token-level divergences between a student q_θ and a teacher p_T over the full vocabulary.

Every function takes logits of shape [..., V] (typically [B, T, V]) and an optional mask of shape [...];
position i of the logits is compared with position i of the other logits: these functions never shift
(alignment is the caller's job). All math runs in float32 whatever the input dtype. `temperature` divides
both models' logits. `chunk_size` processes that many positions at a time so that the peak extra memory is
O(chunk_size * V) (values and gradients identical to the unchunked form).

Directions, written out once:
  forward_kl  = KL(p_T || q_θ) = Σ_v p_T(v) (log p_T(v) - log q_θ(v))   (mean-seeking; SFT on soft targets)
  reverse_kl  = KL(q_θ || p_T) = Σ_v q_θ(v) (log q_θ(v) - log p_T(v))   (mode-seeking; on-policy distillation)
  mixed_kl    = lam * reverse_kl + (1 - lam) * forward_kl               (lam = weight of the REVERSE KL)
"""

import functools
import math

import jax
import jax.numpy as jnp

from kldistill_jax.losses import _checks
from kldistill_jax.losses.chunking import as_batch_time, map_position_chunks, reduce_positions
from kldistill_jax.losses.logits_kl import per_position_kl


def log_probs(logits, temperature=1.0):
  """float32 log-softmax of logits / temperature over the last axis."""
  return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def kl_from_log_probs(logp, logq):
  """KL(P || Q) per position from float32 log-probs [..., V]; entries with P(v) = 0 contribute 0."""
  # The inner `where` keeps -inf - -inf = NaN out of both the value and the gradient.
  diff = jnp.where(logp > -jnp.inf, logp - logq, 0.0)
  return jnp.sum(jnp.exp(logp) * diff, axis=-1)


def entropy_from_log_probs(logp):
  """Shannon entropy (nats) per position from float32 log-probs [..., V]."""
  return -jnp.sum(jnp.exp(logp) * jnp.where(logp > -jnp.inf, logp, 0.0), axis=-1)


def _log_mixture(logp, logq, weight_p):
  """log(weight_p * P + (1 - weight_p) * Q), stably; weight_p is a Python float in [0, 1]."""
  if weight_p == 0.0:
    return logq
  if weight_p == 1.0:
    return logp
  # Where both are -inf (a vocabulary entry both models mask), logaddexp's gradient is NaN: feed it
  # zeros there and put the -inf back afterwards, so no NaN reaches the gradient.
  both_masked = (logp == -jnp.inf) & (logq == -jnp.inf)
  a = jnp.where(both_masked, 0.0, logp + math.log(weight_p))
  b = jnp.where(both_masked, 0.0, logq + math.log1p(-weight_p))
  return jnp.where(both_masked, -jnp.inf, jnp.logaddexp(a, b))


# Per-position divergence kernels: (student log-probs, teacher log-probs) -> [...]; lam etc. bound by partial.
def _forward(s_logp, t_logp):
  return kl_from_log_probs(t_logp, s_logp)


def _reverse(s_logp, t_logp):
  return kl_from_log_probs(s_logp, t_logp)


def _jsd(s_logp, t_logp, *, beta):
  log_m = _log_mixture(t_logp, s_logp, beta)
  return beta * kl_from_log_probs(t_logp, log_m) + (1.0 - beta) * kl_from_log_probs(s_logp, log_m)


def _skew_forward(s_logp, t_logp, *, alpha):
  return kl_from_log_probs(t_logp, _log_mixture(t_logp, s_logp, alpha))


def _skew_reverse(s_logp, t_logp, *, alpha):
  return kl_from_log_probs(s_logp, _log_mixture(s_logp, t_logp, alpha))


def per_position(kernel, student_logits, teacher_logits, *, temperature=1.0, chunk_size=None, mask=None):
  """kernel(student log-probs, teacher log-probs) evaluated at every position: returns [...] float32.

  Positions where `mask` is 0 are computed on zero logits instead of theirs, so that padding rows
  (e.g. all -inf) put no NaN into the gradient; their values are meaningless and the reductions drop them.
  """
  _checks.check_logits_pair(student_logits, teacher_logits)
  _checks.check_temperature(temperature)
  _checks.check_chunk_size(chunk_size)
  s_BTV, t_BTV = as_batch_time(student_logits, 1), as_batch_time(teacher_logits, 1)
  keep_BT = as_batch_time(jnp.ones(student_logits.shape[:-1], bool) if mask is None else mask != 0, 0)

  def chunk_fn(s_BCV, t_BCV, keep_BC):
    s_BCV = jnp.where(keep_BC[..., None], s_BCV, 0.0)
    t_BCV = jnp.where(keep_BC[..., None], t_BCV, 0.0)
    return kernel(log_probs(s_BCV, temperature), log_probs(t_BCV, temperature))

  values = map_position_chunks(chunk_fn, (s_BTV, t_BTV, keep_BT), chunk_size)
  return values.reshape(student_logits.shape[:-1])


def _token_loss(kernel, student_logits, teacher_logits, mask, temperature, reduction, chunk_size,
                num_tokens):
  _checks.check_reduction(reduction)
  _checks.check_mask(mask, student_logits.shape[:-1])
  values = per_position(kernel, student_logits, teacher_logits, temperature=temperature,
                        chunk_size=chunk_size, mask=mask)
  return reduce_positions(values, mask, reduction, num_tokens)


def _kl_loss(kind, student_logits, teacher_logits, mask, temperature, reduction, chunk_size, num_tokens,
             lam=0.0):
  """Forward/reverse/mixed KL with the closed-form gradient of `logits_kl` (same values and gradients
  as `_token_loss` with the matching kernel, less time and memory)."""
  _checks.check_logits_pair(student_logits, teacher_logits)
  _checks.check_temperature(temperature)
  _checks.check_chunk_size(chunk_size)
  _checks.check_reduction(reduction)
  _checks.check_mask(mask, student_logits.shape[:-1])
  keep = jnp.ones(student_logits.shape[:-1], bool) if mask is None else mask != 0
  values = per_position_kl(as_batch_time(student_logits, 1), as_batch_time(teacher_logits, 1),
                           as_batch_time(keep, 0), kind=kind, lam=lam, temperature=temperature,
                           chunk_size=chunk_size)
  return reduce_positions(values.reshape(student_logits.shape[:-1]), mask, reduction, num_tokens)


def forward_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean",
               chunk_size=None, num_tokens=None):
  """KL(p_T || q_θ) per position: cross-entropy against the teacher's soft targets minus its entropy.

  Args:
    student_logits, teacher_logits: [..., V], same shape, any float dtype.
    mask: optional [...] (bool or float weights); masked positions contribute nothing.
    temperature: divides both logits before the softmax.
    reduction: "mean" (masked sum / number of unmasked positions in the whole array), "sum" or "none".
    chunk_size: positions per chunk (None: all at once).
    num_tokens: denominator for "mean" instead of the mask's count (the global count when accumulating).

  The gradient (w.r.t. both logits) has a closed form (`logits_kl`): the forward pass only reduces each
  chunk to a few numbers per position, the backward pass writes the gradient in one elementwise pass.
  Scratch beyond the gradient itself is about chunk_size * V float32; on a CPU small chunks (1-16) are
  also the fastest, their intermediates staying in cache (bench/logits_kl.py). No forward-mode autodiff
  (jvp).
  """
  return _kl_loss("forward", student_logits, teacher_logits, mask, temperature, reduction, chunk_size,
                  num_tokens)


def reverse_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean",
               chunk_size=None, num_tokens=None):
  """KL(q_θ || p_T) per position, exact over the vocabulary. Arguments as in `forward_kl`."""
  return _kl_loss("reverse", student_logits, teacher_logits, mask, temperature, reduction, chunk_size,
                  num_tokens)


def mixed_kl(student_logits, teacher_logits, mask=None, *, lam, temperature=1.0, reduction="mean",
             chunk_size=None, num_tokens=None):
  """lam * KL(q_θ || p_T) + (1 - lam) * KL(p_T || q_θ): lam=0 is pure forward, lam=1 pure reverse KL.

  Note the direction: TRL's GKD `beta` and EasyDeL's `beta` weigh opposite ends; here `lam` always
  weighs the REVERSE KL. Other arguments as in `forward_kl`.
  """
  _checks.check_in_range("lam", lam, 0.0, 1.0)
  return _kl_loss("mixed", student_logits, teacher_logits, mask, temperature, reduction, chunk_size,
                  num_tokens, lam=lam)


def generalized_jsd(student_logits, teacher_logits, mask=None, *, beta, temperature=1.0,
                    reduction="mean", chunk_size=None, num_tokens=None):
  """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024), beta in (0, 1).

  With M = beta * p_T + (1 - beta) * q_θ:  JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(q_θ || M).
  beta = 0.5 is the symmetric JSD. At beta -> 0 or 1 this tends to 0 (not to a KL); TRL special-cases
  those endpoints as forward (beta=0) and reverse (beta=1) KL, so here they are rejected: call
  `forward_kl` / `reverse_kl` instead. Other arguments as in `forward_kl`.
  """
  _checks.check_in_range("beta", beta, 0.0, 1.0, low_open=True, high_open=True)
  return _token_loss(functools.partial(_jsd, beta=float(beta)), student_logits, teacher_logits, mask,
                     temperature, reduction, chunk_size, num_tokens)


def skew_forward_kl(student_logits, teacher_logits, mask=None, *, alpha=0.1, temperature=1.0,
                    reduction="mean", chunk_size=None, num_tokens=None):
  """DistiLLM's alpha-skew forward KL: KL(p_T || alpha * p_T + (1 - alpha) * q_θ), alpha in [0, 1).

  alpha = 0 is `forward_kl`; DistiLLM's default is 0.1. Other arguments as in `forward_kl`.
  """
  _checks.check_in_range("alpha", alpha, 0.0, 1.0, high_open=True)
  return _token_loss(functools.partial(_skew_forward, alpha=float(alpha)), student_logits,
                     teacher_logits, mask, temperature, reduction, chunk_size, num_tokens)


def skew_reverse_kl(student_logits, teacher_logits, mask=None, *, alpha=0.1, temperature=1.0,
                    reduction="mean", chunk_size=None, num_tokens=None):
  """DistiLLM's alpha-skew reverse KL: KL(q_θ || alpha * q_θ + (1 - alpha) * p_T), alpha in [0, 1).

  alpha = 0 is `reverse_kl`. Other arguments as in `forward_kl`.
  """
  _checks.check_in_range("alpha", alpha, 0.0, 1.0, high_open=True)
  return _token_loss(functools.partial(_skew_reverse, alpha=float(alpha)), student_logits,
                     teacher_logits, mask, temperature, reduction, chunk_size, num_tokens)


def token_stats(student_logits, teacher_logits, targets=None, *, temperature=1.0, chunk_size=None):
  """Per-position diagnostics in one chunked pass: a dict of [...] float32 arrays.

  Keys: "forward_kl", "reverse_kl", "student_entropy", "teacher_entropy", and, when integer `targets`
  of shape [...] are given, "student_logprob" / "teacher_logprob" of those tokens (all at `temperature`).
  Differentiable: the objectives take their losses from the same pass.
  """
  _checks.check_logits_pair(student_logits, teacher_logits)
  _checks.check_temperature(temperature)
  _checks.check_chunk_size(chunk_size)
  _checks.check_mask(targets, student_logits.shape[:-1], name="targets")
  s_BTV, t_BTV = as_batch_time(student_logits, 1), as_batch_time(teacher_logits, 1)
  xs = (s_BTV, t_BTV) if targets is None else (s_BTV, t_BTV, as_batch_time(targets, 0))

  def chunk_fn(s_BCV, t_BCV, targets_BC=None):
    s_logp, t_logp = log_probs(s_BCV, temperature), log_probs(t_BCV, temperature)
    out = {"forward_kl": _forward(s_logp, t_logp), "reverse_kl": _reverse(s_logp, t_logp),
           "student_entropy": entropy_from_log_probs(s_logp),
           "teacher_entropy": entropy_from_log_probs(t_logp)}
    if targets_BC is not None:
      out["student_logprob"] = jnp.take_along_axis(s_logp, targets_BC[..., None], axis=-1)[..., 0]
      out["teacher_logprob"] = jnp.take_along_axis(t_logp, targets_BC[..., None], axis=-1)[..., 0]
    return out

  stats = map_position_chunks(chunk_fn, xs, chunk_size)
  return jax.tree.map(lambda v: v.reshape(student_logits.shape[:-1]), stats)
