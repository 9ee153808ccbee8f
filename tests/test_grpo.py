"""GRPO math against hand-computed numbers, jax.grad of direct formulas and NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kldistill_jax.train.grpo import group_advantages, grpo_loss

# Two groups of three completions: one prompt solved once, one solved by all three (no signal).
REWARDS = jnp.array([1.0, 0.0, 0.0, 0.1, 0.1, 0.1])


def test_group_advantages_by_hand():
  # Group 0: mean 1/3, population std sqrt(((2/3)^2 + 2 (1/3)^2) / 3) = sqrt(2)/3, so (2/3) / (sqrt(2)/3)
  # = sqrt(2) and (-1/3) / (sqrt(2)/3) = -1/sqrt(2). Group 1 is constant: exactly 0 (no rounding noise / eps).
  s = math.sqrt(2)
  np.testing.assert_allclose(group_advantages(REWARDS, 3), [s, -1 / s, -1 / s, 0, 0, 0], rtol=1e-5)
  assert np.all(np.asarray(group_advantages(REWARDS, 3))[3:] == 0.0)
  np.testing.assert_allclose(group_advantages(REWARDS, 3, normalize_std=False),
                             [2 / 3, -1 / 3, -1 / 3, 0, 0, 0], rtol=1e-6)


def test_group_advantages_two_dimensional_matches_flat():
  flat = group_advantages(REWARDS, 3)
  grid = group_advantages(REWARDS.reshape(2, 3), 3)
  assert grid.shape == (2, 3)
  np.testing.assert_array_equal(grid.reshape(-1), flat)
  np.testing.assert_array_equal(jax.jit(group_advantages, static_argnums=1)(REWARDS, 3), flat)


def test_group_advantages_population_std_and_eps():
  # [0, 1, 2]: mean 1, population std sqrt(2/3) (the sample std would be 1).
  advantages = group_advantages(jnp.array([0.0, 1.0, 2.0]), 3, eps=0.0)
  np.testing.assert_allclose(advantages, [-math.sqrt(1.5), 0.0, math.sqrt(1.5)], rtol=1e-6)
  np.testing.assert_allclose(group_advantages(jnp.array([0.0, 1.0, 2.0]), 3, eps=0.5),
                             [-1 / (math.sqrt(2 / 3) + 0.5), 0.0, 1 / (math.sqrt(2 / 3) + 0.5)], rtol=1e-6)


@pytest.mark.parametrize("shape, group_size", [((5,), 3), ((2, 4), 3), ((2, 3, 1), 3), ((6,), 0)])
def test_group_advantages_bad_shapes(shape, group_size):
  with pytest.raises(ValueError):
    group_advantages(jnp.zeros(shape), group_size)


# Four completions of two tokens, clip_eps = 0.2 (range [0.8, 1.2]); the last token of row 2 is padding.
RATIOS = np.array([[1.1, 1.5], [0.9, 0.5], [0.5, 1.0], [1.5, 1.1]], np.float32)
ADVANTAGES = jnp.array([1.0, -1.0, 2.0, -0.5])
MASK = jnp.array([[1, 1], [1, 1], [1, 0], [1, 1]], jnp.float32)
OLD = jnp.array([[-1.0, -2.0], [-0.5, -1.5], [-3.0, -0.2], [-0.7, -1.1]])
LOGPROBS = OLD + jnp.log(RATIOS)
# Per-token -min(r A, clip(r) A):
#   row 0, A=+1:   r=1.1 inside -> -1.1;  r=1.5 clipped to 1.2 -> -1.2 (clip active)
#   row 1, A=-1:   r=0.9 inside -> +0.9;  r=0.5: min(-0.5, -0.8) = -0.8 -> +0.8 (clip active)
#   row 2, A=+2:   r=0.5: min(1.0, 1.6) = 1.0 -> -1.0 (not active: positive A is not clipped below); masked
#   row 3, A=-0.5: r=1.5: min(-0.75, -0.6) = -0.75 -> +0.75 (not active);  r=1.1 -> +0.55
# Token mean over the 7 unmasked tokens: (-1.1 - 1.2 + 0.9 + 0.8 - 1.0 + 0.75 + 0.55) / 7 = -0.3 / 7.
# (The mean of per-sequence means would be (-1.15 + 0.85 - 1.0 + 0.65) / 4 = -0.1625.)
HAND_LOSS = -0.3 / 7
HAND_CLIP_FRACTION = 2 / 7
HAND_RATIO_MEAN = (1.1 + 1.5 + 0.9 + 0.5 + 0.5 + 1.5 + 1.1) / 7


def test_loss_by_hand():
  loss, metrics = grpo_loss(LOGPROBS, OLD, ADVANTAGES, MASK)
  np.testing.assert_allclose(loss, HAND_LOSS, rtol=1e-5)
  np.testing.assert_allclose(metrics["policy_loss"], HAND_LOSS, rtol=1e-5)
  np.testing.assert_allclose(metrics["clip_fraction"], HAND_CLIP_FRACTION, rtol=1e-6)
  np.testing.assert_allclose(metrics["ratio_mean"], HAND_RATIO_MEAN, rtol=1e-5)
  assert "kl" not in metrics


def test_jit_and_bfloat16_inputs():
  loss, metrics = jax.jit(grpo_loss)(LOGPROBS, OLD, ADVANTAGES, MASK)
  np.testing.assert_allclose(loss, HAND_LOSS, rtol=1e-5)
  bf16 = grpo_loss(LOGPROBS.astype(jnp.bfloat16), OLD.astype(jnp.bfloat16), ADVANTAGES, MASK)[0]
  assert bf16.dtype == jnp.float32


def test_gradient_per_token_by_hand():
  # d(r A)/d lp = r A at unclipped tokens; clipped and masked tokens get exactly 0.
  grads = jax.grad(lambda lp: grpo_loss(lp, OLD, ADVANTAGES, MASK)[0])(LOGPROBS)
  expected = -np.array([[1.1 * 1.0, 0.0], [0.9 * -1.0, 0.0], [0.5 * 2.0, 0.0], [1.5 * -0.5, 1.1 * -0.5]]) / 7
  np.testing.assert_allclose(grads, expected, rtol=1e-5, atol=1e-7)
  assert grads[0, 1] == 0.0 and grads[1, 1] == 0.0 and grads[2, 1] == 0.0


def _token_logprobs(logits_BTV, tokens_BT):
  return jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), tokens_BT[..., None], axis=-1)[..., 0]


def test_gradient_at_ratio_one_is_policy_gradient():
  # At r = 1 the clipped objective's gradient is -A grad(log q) summed over unmasked tokens / their count.
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = jax.random.normal(k1, (3, 5, 7))
  tokens = jax.random.randint(k2, (3, 5), 0, 7)
  advantages = jax.random.normal(k3, (3,))
  mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], jnp.float32)
  old = _token_logprobs(logits, tokens)

  def grpo(params):
    return grpo_loss(_token_logprobs(params, tokens), old, advantages, mask)[0]

  def direct(params):
    return -jnp.sum(advantages[:, None] * _token_logprobs(params, tokens) * mask) / jnp.sum(mask)

  np.testing.assert_allclose(jax.grad(grpo)(logits), jax.grad(direct)(logits), rtol=1e-5, atol=1e-7)


def test_masked_tokens_contribute_nothing():
  # Garbage (even -inf) at masked positions and a fully masked extra row change neither values nor gradients.
  junk = jnp.array([[0, 0], [0, 0], [0, -jnp.inf], [0, 0], [-jnp.inf, 5.0]])

  def pad(x, fill):
    return jnp.concatenate([x, jnp.full((1,) + x.shape[1:], fill, x.dtype)])

  lp, old = pad(LOGPROBS, 0.0) + junk, pad(OLD, 0.0) - junk
  ref = pad(OLD, 0.0) + 3 * junk
  mask, advantages = pad(MASK, 0.0), pad(ADVANTAGES, 4.0)

  def loss(lp):
    return grpo_loss(lp, old, advantages, mask, ref_logprobs=ref, kl_coef=0.1)

  (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(lp)
  clean = grpo_loss(LOGPROBS, OLD, ADVANTAGES, MASK, ref_logprobs=OLD, kl_coef=0.1)
  np.testing.assert_allclose(value, clean[0], rtol=1e-6)
  for name in clean[1]:
    np.testing.assert_allclose(metrics[name], clean[1][name], rtol=1e-6)
  assert np.all(np.isfinite(grads)) and grads[2, 1] == 0.0 and np.all(grads[4] == 0.0)


def test_kl_term_against_numpy():
  rng = np.random.default_rng(0)
  lp = rng.normal(-2.0, 0.5, (3, 4)).astype(np.float32)
  old = lp + rng.normal(0.0, 0.1, (3, 4)).astype(np.float32)
  ref = lp + rng.normal(0.0, 0.5, (3, 4)).astype(np.float32)
  advantages = np.array([0.5, -1.0, 0.0], np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
  coef = 0.3

  def loss(x):
    return grpo_loss(x, jnp.asarray(old), jnp.asarray(advantages), jnp.asarray(mask),
                     ref_logprobs=jnp.asarray(ref), kl_coef=coef)

  (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(lp))
  d = ref - lp
  k3 = np.exp(d) - d - 1
  n = mask.sum()
  np.testing.assert_allclose(metrics["kl"], (k3 * mask).sum() / n, rtol=1e-5)
  np.testing.assert_allclose(value, metrics["policy_loss"] + coef * metrics["kl"], rtol=1e-5)
  # Through the KL term alone (zero advantage in row 2): d k3 / d lp = 1 - exp(ref - lp).
  np.testing.assert_allclose(grads[2], coef * (1 - np.exp(d[2])) * mask[2] / n, rtol=1e-4)


def test_num_tokens_makes_micro_batches_sum_to_the_batch():
  full = grpo_loss(LOGPROBS, OLD, ADVANTAGES, MASK)[0]
  halves = [grpo_loss(LOGPROBS[s], OLD[s], ADVANTAGES[s], MASK[s], num_tokens=7)[0]
            for s in (slice(0, 2), slice(2, 4))]
  np.testing.assert_allclose(sum(halves), full, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(old_logprobs=jnp.zeros((4, 3))), "old_logprobs"),
    (dict(advantages=jnp.zeros((4, 2))), "advantages"),
    (dict(mask=jnp.ones((4, 3))), "mask"),
    (dict(kl_coef=0.1), "ref_logprobs"),
    (dict(ref_logprobs=jnp.zeros((2, 2)), kl_coef=0.1), "ref_logprobs"),
    (dict(clip_eps=0.0), "clip_eps"),
    (dict(ref_logprobs=OLD, kl_coef=-1.0), "kl_coef"),
])
def test_bad_arguments(kwargs, match):
  args = {**dict(logprobs=LOGPROBS, old_logprobs=OLD, advantages=ADVANTAGES, mask=MASK), **kwargs}
  with pytest.raises(ValueError, match=match):
    grpo_loss(**args)
