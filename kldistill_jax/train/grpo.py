"""The math of GRPO (Shao et al. 2024, DeepSeekMath): group-normalised advantages and the clipped loss.

Pure jnp functions of arrays, jit/vmap/grad-safe, float32 inside whatever the input dtype. Per-token log-probs
are [B, T] with position t of every argument referring to the same sampled token (nothing is shifted here);
each row is one completion and carries its sequence-level advantage.
"""

import numbers

import jax.numpy as jnp
from jax import lax

from kldistill_jax.losses import _checks
from kldistill_jax.losses.chunking import mask_weights, reduce_positions


def group_advantages(rewards, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6):
  """(r - group mean) / (group std + eps) for each of G completions of a prompt, float32, shape of `rewards`.

  rewards: [P * G] with each prompt's G completions contiguous, or [P, G]. The std is the population std
  (ddof=0), as in GRPO; normalize_std=False keeps only the mean baseline (Dr. GRPO). A group whose rewards
  are all equal (all right or all wrong) has no signal and gets exactly 0, not rounding noise / eps.
  """
  if rewards.ndim not in (1, 2):
    raise ValueError(f"rewards must be [P * G] or [P, G], got shape {rewards.shape}")
  if not isinstance(group_size, numbers.Integral) or group_size < 1:
    raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
  fits = rewards.shape[-1] % group_size == 0 if rewards.ndim == 1 else rewards.shape[-1] == group_size
  if not fits:
    raise ValueError(f"rewards of shape {rewards.shape} do not split into groups of group_size={group_size}")
  r_PG = rewards.astype(jnp.float32).reshape(-1, group_size)
  centered = r_PG - jnp.mean(r_PG, axis=-1, keepdims=True)
  if normalize_std:
    centered = centered / (jnp.std(r_PG, axis=-1, keepdims=True) + eps)
  constant = jnp.all(r_PG == r_PG[:, :1], axis=-1, keepdims=True)
  return jnp.where(constant, 0.0, centered).reshape(rewards.shape)


def grpo_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps=0.2, ref_logprobs=None, kl_coef=0.0,
              num_tokens=None):
  """Clipped-ratio policy loss, token mean over the batch, plus kl_coef * k3 KL to a reference.

  Per unmasked token, with r = exp(logprobs - old_logprobs) and the row's advantage A:
  -min(r A, clip(r, 1 - clip_eps, 1 + clip_eps) A). The mean divides by the unmasked tokens of the whole
  batch (long completions weigh more than short ones), or by `num_tokens` when given (the global count under
  gradient accumulation). The KL term is k3 = exp(ref - lp) - (ref - lp) - 1 per token, gradient through lp.

  Args:
    logprobs: [B, T] log-probs of the sampled tokens under the policy being trained (gradients flow here).
    old_logprobs: [B, T] the same tokens under the policy that sampled them (constant).
    advantages: [B] one advantage per completion, e.g. `group_advantages`.
    mask: [B, T] 1 on completion tokens; float weights scale each token's term.
    ref_logprobs: optional [B, T] under a frozen reference; required when kl_coef > 0.

  Returns:
    (loss, metrics): metrics hold policy_loss, clip_fraction (share of tokens where the clipped term is the
    active one, so their gradient is 0), ratio_mean, and kl (the k3 token mean) when ref_logprobs is given.
  """
  _checks.check_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
  _checks.check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
  _checks.check_mask(mask, logprobs.shape)
  if advantages.shape != logprobs.shape[:1]:
    raise ValueError(f"advantages has shape {advantages.shape} but logprobs {logprobs.shape} needs "
                     f"{logprobs.shape[:1]}: one advantage per row")
  _checks.check_in_range("clip_eps", clip_eps, 0.0, 1.0, low_open=True, high_open=True)
  _checks.check_in_range("kl_coef", kl_coef, 0.0, float("inf"))
  if ref_logprobs is None and _checks._concrete(kl_coef) != 0.0:
    raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
  keep = mask_weights(mask, logprobs.shape) != 0
  lp = logprobs.astype(jnp.float32)
  # Zero the log-ratios of masked tokens before exp: padding may hold -inf, and an inf/NaN in the unselected
  # branch of a later `where` would still turn the gradient into NaN.
  log_ratio = jnp.where(keep, lp - lax.stop_gradient(old_logprobs.astype(jnp.float32)), 0.0)
  ratio = jnp.exp(log_ratio)
  a_B1 = lax.stop_gradient(advantages.astype(jnp.float32))[:, None]
  unclipped = ratio * a_B1
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a_B1
  clip_active = clipped < unclipped
  # `where` rather than `minimum`: inside the range both terms tie, and min would split the gradient between
  # them; this way an unclipped token's gradient is exactly that of r A, a clipped token's exactly 0.
  policy_loss = reduce_positions(-jnp.where(clip_active, clipped, unclipped), mask, "mean", num_tokens)

  def token_mean(values):
    return reduce_positions(values, mask, "mean", num_tokens)

  metrics = {"policy_loss": lax.stop_gradient(policy_loss),
             "clip_fraction": token_mean(clip_active.astype(jnp.float32)),
             "ratio_mean": lax.stop_gradient(token_mean(ratio))}
  loss = policy_loss
  if ref_logprobs is not None:
    ref_log_ratio = jnp.where(keep, lax.stop_gradient(ref_logprobs.astype(jnp.float32)) - lp, 0.0)
    kl = token_mean(jnp.expm1(ref_log_ratio) - ref_log_ratio)
    metrics["kl"] = lax.stop_gradient(kl)
    loss = loss + kl_coef * kl
  return loss, metrics
