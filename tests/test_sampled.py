"""Sampled-token estimators against the float64 NumPy reference, plus Monte-Carlo checks of unbiasedness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from kldistill_jax import losses as L

B, T = 3, 6
RTOL, ATOL = 1e-5, 1e-6


def logprobs(seed=0, shape=(B, T)):
  """Plausible per-token log-probs: log-softmax entries of random logits."""
  rng = np.random.default_rng(seed)
  q = ref.log_softmax(3 * rng.standard_normal(shape + (7,)))[..., 0]
  p = ref.log_softmax(3 * rng.standard_normal(shape + (7,)))[..., 0]
  b = ref.log_softmax(3 * rng.standard_normal(shape + (7,)))[..., 0]
  return q.astype(np.float32), p.astype(np.float32), b.astype(np.float32)


def bool_mask(seed=1, shape=(B, T)):
  m = np.random.default_rng(seed).random(shape) < 0.7
  m[:, 0] = True
  m[0, -1] = False
  return m


def test_reward_to_go_reference_loop():
  rng = np.random.default_rng(2)
  r = rng.standard_normal((2, 5)).astype(np.float32)
  mask = bool_mask(shape=(2, 5))
  for discount in (0.0, 0.5, 0.9, 1.0):
    np.testing.assert_allclose(L.reward_to_go(r, mask, discount=discount), ref.reward_to_go(r, mask, discount),
                               rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(L.reward_to_go(r, discount=1.0), np.cumsum(r[:, ::-1], -1)[:, ::-1], rtol=RTOL)
  np.testing.assert_allclose(L.reward_to_go(r, mask, discount=0.0), r * mask, rtol=RTOL)
  # fractional mask weights drop masked rewards but do not scale the others
  w = np.where(mask, np.random.default_rng(3).random((2, 5)), 0.0).astype(np.float32)
  np.testing.assert_allclose(L.reward_to_go(r, w, discount=0.5), L.reward_to_go(r, mask, discount=0.5), rtol=RTOL)
  np.testing.assert_allclose(L.reward_to_go(r, w, discount=0.5), ref.reward_to_go(r, w, 0.5), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_policy_gradient_value_is_masked_mean_log_ratio(mask_kind):
  q, p, _ = logprobs()
  mask = {None: None, "bool": bool_mask(), "float": np.random.default_rng(3).random((B, T)).astype(np.float32)}[mask_kind]
  for discount in (0.0, 1.0):
    got = L.reverse_kl_policy_gradient(q, p, mask, discount=discount)
    np.testing.assert_allclose(got, ref.reduce(q.astype(np.float64) - p, mask), rtol=RTOL, atol=ATOL)
  got = L.reverse_kl_policy_gradient(q, p, mask, num_tokens=40)
  np.testing.assert_allclose(got, ref.reduce(q.astype(np.float64) - p, mask, "sum") / 40, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("clip", [None, 1.5])
def test_policy_gradient_value_with_behavior(clip):
  q, p, b = logprobs(seed=4)
  mask = bool_mask()
  w = np.exp(q.astype(np.float64) - b)
  if clip is not None:
    w = np.minimum(w, clip)
    assert (w == clip).any() and (w < clip).any()  # the clip is exercised
  got = L.reverse_kl_policy_gradient(q, p, mask, behavior_logprobs=b, clip=clip)
  np.testing.assert_allclose(got, ref.reduce(w * (q - p.astype(np.float64)), mask), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(L.importance_weights(q, b, clip), w, rtol=RTOL)


@pytest.mark.parametrize("discount", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("behavior", [False, True])
def test_policy_gradient_grad_is_reinforce_with_reward_to_go(discount, behavior):
  q, p, b = logprobs(seed=5)
  mask = bool_mask()
  clip = 2.0 if behavior else None
  kwargs = dict(discount=discount, behavior_logprobs=b if behavior else None, clip=clip)
  g = jax.grad(lambda x: L.reverse_kl_policy_gradient(x, p, mask, **kwargs))(q)
  r = p.astype(np.float64) - q
  R = ref.reward_to_go(r, mask, discount)
  w = np.ones_like(R) if not behavior else np.minimum(np.exp(q.astype(np.float64) - b), clip)
  want = -w * R * mask / mask.sum()
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
  if discount == 0.0:  # per-token reward
    np.testing.assert_allclose(g, -w * r * mask / mask.sum(), rtol=1e-5, atol=1e-7)
  # num_tokens replaces the denominator of both value and gradient
  g40 = jax.grad(lambda x: L.reverse_kl_policy_gradient(x, p, mask, num_tokens=40, **kwargs))(q)
  np.testing.assert_allclose(g40, want * mask.sum() / 40, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("discount", [0.0, 0.5, 1.0])
def test_policy_gradient_float_mask_grad(discount):
  """Float weights scale each token's term; zero weights also drop that token's reward from R."""
  q, p, _ = logprobs(seed=6)
  m = np.random.default_rng(7).random((B, T)).astype(np.float32)
  m[0, 2] = 0.0
  m[1, 4] = 0.0
  g = jax.grad(lambda x: L.reverse_kl_policy_gradient(x, p, m, discount=discount))(q)
  R = ref.reward_to_go(p.astype(np.float64) - q, m, discount)
  np.testing.assert_allclose(g, -R * m / m.sum(), rtol=1e-5, atol=1e-7)


def test_policy_gradient_no_grad_to_teacher_or_behavior():
  q, p, b = logprobs(seed=8)
  mask = bool_mask()
  for discount in (0.0, 1.0):
    gp, gb = jax.grad(lambda y, z: L.reverse_kl_policy_gradient(q, y, mask, discount=discount,
                                                                 behavior_logprobs=z), (0, 1))(p, b)
    np.testing.assert_array_equal(gp, 0.0)
    np.testing.assert_array_equal(gb, 0.0)


def test_policy_gradient_jit_vmap_and_dtypes():
  q, p, _ = logprobs(seed=9, shape=(4, B, T))
  mask = bool_mask(shape=(4, B, T))
  f = lambda x, y, m: L.reverse_kl_policy_gradient(x, y, m, discount=0.5)
  vals = jax.jit(jax.vmap(f))(q, p, mask)
  grads = jax.jit(jax.vmap(jax.grad(f)))(q, p, mask)
  for k in range(4):
    np.testing.assert_allclose(vals[k], ref.reduce(q[k].astype(np.float64) - p[k], mask[k]), rtol=RTOL, atol=ATOL)
    R = ref.reward_to_go(p[k].astype(np.float64) - q[k], mask[k], 0.5)
    np.testing.assert_allclose(grads[k], -R * mask[k] / mask[k].sum(), rtol=1e-5, atol=1e-7)
  out = L.reverse_kl_policy_gradient(jnp.asarray(q[0], jnp.bfloat16), jnp.asarray(p[0], jnp.bfloat16), mask[0])
  assert out.dtype == jnp.float32
  assert float(L.reverse_kl_policy_gradient(q[0], p[0], np.zeros_like(mask[0]))) == 0.0


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("mask_kind", [None, "bool"])
def test_kl_estimate_matches_reference(kind, mask_kind):
  q, p, _ = logprobs(seed=10)
  mask = None if mask_kind is None else bool_mask()
  per_tok = ref.kl_estimator(q, p, kind)
  for reduction in ("none", "sum", "mean"):
    got = L.kl_estimate(q, p, mask, kind=kind, reduction=reduction)
    np.testing.assert_allclose(got, ref.reduce(per_tok, mask, reduction), rtol=RTOL, atol=ATOL, err_msg=reduction)
  got = L.kl_estimate(q, p, mask, kind=kind, num_tokens=50)
  np.testing.assert_allclose(got, ref.reduce(per_tok, mask, "sum") / 50, rtol=RTOL, atol=ATOL)


def test_k3_non_negative():
  rng = np.random.default_rng(11)
  q = (5 * rng.standard_normal((50, 40))).astype(np.float32)
  p = (q + 1e-3 * rng.standard_normal(q.shape)).astype(np.float32)  # near-equal too: round-off territory
  for a, b in ((q, p), (q, 10 * rng.standard_normal(q.shape).astype(np.float32))):
    k3 = L.kl_estimate(a, b, kind="k3", reduction="none")
    assert float(k3.min()) >= 0.0
  np.testing.assert_array_equal(L.kl_estimate(q, q, kind="k3", reduction="none"), 0.0)


def test_monte_carlo_estimators_approach_exact_kl():
  """Tokens drawn from a small categorical q: k1 and k3 means -> KL(q || p); k2 -> E_q[l^2]/2 (biased).

  Tolerance: 5 standard errors, from each estimator's EXACT variance under q (N = 200k samples, seed 0).
  """
  rng = np.random.default_rng(0)
  logq = ref.log_softmax(np.array([2.0, 0.5, -1.0, 0.0, 1.2]))
  logp = ref.log_softmax(np.array([0.3, 1.5, -0.5, 0.8, 0.0]))
  q = np.exp(logq)
  exact_kl = ref.kl(q, np.exp(logp))
  n = 200_000
  y = rng.choice(5, size=n, p=q)
  sq, sp = logq[y].astype(np.float32)[None], logp[y].astype(np.float32)[None]
  for kind, target in (("k1", exact_kl), ("k3", exact_kl), ("k2", np.sum(q * 0.5 * (logp - logq) ** 2))):
    per_token = ref.kl_estimator(logq, logp, kind)
    stderr = np.sqrt(np.sum(q * (per_token - np.sum(q * per_token)) ** 2) / n)
    est = float(L.kl_estimate(sq, sp, kind=kind))
    assert abs(est - target) < 5 * stderr, (kind, est, target, stderr)
  assert abs(np.sum(q * ref.kl_estimator(logq, logp, "k2")) - exact_kl) > 10 * stderr  # k2 really is biased
  # the policy-gradient value is the k1 estimate
  est = float(L.reverse_kl_policy_gradient(sq, sp))
  np.testing.assert_allclose(est, float(L.kl_estimate(sq, sp, kind="k1")), rtol=1e-6)


def test_monte_carlo_reinforce_gradient_is_exact_reverse_kl_gradient():
  """E_{y~q}[grad of the per-token surrogate] w.r.t. the student LOGITS = grad KL(q || p) (analytic).

  N = 100k single-token samples (seed 1); tolerance 5 standard errors of the per-sample gradients.
  """
  rng = np.random.default_rng(1)
  z = np.array([1.0, -0.5, 0.3, 2.0, -1.0], np.float32)
  logp = ref.log_softmax(np.array([0.2, 0.9, -0.4, 1.1, 0.0])).astype(np.float32)
  n = 100_000
  y = rng.choice(5, size=n, p=ref.softmax(z))

  def loss(logits):
    lq = jax.nn.log_softmax(logits)
    return L.reverse_kl_policy_gradient(lq[y][None], jnp.asarray(logp)[y][None])

  g = np.asarray(jax.grad(loss)(z), np.float64)
  want = ref.mixed_kl_grad(z, logp, 1.0)  # logp is already normalised: softmax(logp) = p
  # per-sample gradient: -(logp - logq)(onehot(y) - q)
  lq = ref.log_softmax(z)
  per_sample = -(logp[y] - lq[y])[:, None] * (np.eye(5)[y] - np.exp(lq))
  stderr = per_sample.std(0) / np.sqrt(n)
  assert (np.abs(g - want) < 5 * stderr + 1e-6).all(), (g, want, stderr)
  np.testing.assert_allclose(g, per_sample.mean(0), atol=5e-5)  # float32 sum of 100k terms


@pytest.mark.parametrize("mask_kind", [None, "bool"])
def test_forward_kl_from_teacher_samples(mask_kind):
  """Value: mean (log p_T - log q); gradient: that of the token-mean NLL, -mask / count."""
  q, p, _ = logprobs(seed=12)
  mask = None if mask_kind is None else bool_mask()
  m = np.ones((B, T)) if mask is None else mask.astype(np.float64)
  val, g = jax.value_and_grad(lambda x: L.forward_kl_from_teacher_samples(x, p, mask))(q)
  np.testing.assert_allclose(val, ref.reduce(p.astype(np.float64) - q, mask), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(g, -m / m.sum(), rtol=1e-6)
  g = jax.grad(lambda y: L.forward_kl_from_teacher_samples(q, y, mask))(p)
  np.testing.assert_array_equal(g, 0.0)
  val = L.forward_kl_from_teacher_samples(q, p, mask, num_tokens=40)
  np.testing.assert_allclose(val, ref.reduce(p.astype(np.float64) - q, mask, "sum") / 40, rtol=RTOL, atol=ATOL)


def test_monte_carlo_teacher_samples_forward_kl():
  """Tokens drawn from p_T: the value's mean -> KL(p_T || q) (5 exact standard errors, N = 200k, seed 2)."""
  rng = np.random.default_rng(2)
  logq = ref.log_softmax(np.array([2.0, 0.5, -1.0, 0.0, 1.2]))
  logp = ref.log_softmax(np.array([0.3, 1.5, -0.5, 0.8, 0.0]))
  p = np.exp(logp)
  n = 200_000
  y = rng.choice(5, size=n, p=p)
  per_token = logp - logq
  stderr = np.sqrt(np.sum(p * (per_token - np.sum(p * per_token)) ** 2) / n)
  est = float(L.forward_kl_from_teacher_samples(logq[y].astype(np.float32)[None], logp[y].astype(np.float32)[None]))
  assert abs(est - ref.kl(p, np.exp(logq))) < 5 * stderr


def test_errors():
  q, p, b = logprobs()
  with pytest.raises(ValueError, match=r"teacher_logprobs has shape \(3, 5\)"):
    L.reverse_kl_policy_gradient(q, p[:, :-1])
  with pytest.raises(ValueError, match=r"behavior_logprobs has shape"):
    L.reverse_kl_policy_gradient(q, p, behavior_logprobs=b[:-1])
  with pytest.raises(ValueError, match=r"mask has shape"):
    L.reverse_kl_policy_gradient(q, p, np.ones((B, T + 1), bool))
  for d in (-0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"discount must be in \[0.0, 1.0\]"):
      L.reverse_kl_policy_gradient(q, p, discount=d)
    with pytest.raises(ValueError, match=r"discount"):
      L.reward_to_go(q, discount=d)
  for c in (0.0, -1.0):
    with pytest.raises(ValueError, match=r"clip must be in"):
      L.reverse_kl_policy_gradient(q, p, behavior_logprobs=b, clip=c)
  with pytest.raises(ValueError, match=r"kind must be one of.*'k4'"):
    L.kl_estimate(q, p, kind="k4")
  with pytest.raises(ValueError, match=r"teacher_logprobs has shape"):
    L.kl_estimate(q, p[:, :-1])
  with pytest.raises(ValueError, match=r"mask has shape"):
    L.kl_estimate(q, p, np.ones((B,), bool))
  with pytest.raises(ValueError, match=r"reduction must be one of"):
    L.kl_estimate(q, p, reduction="max")
  with pytest.raises(ValueError, match=r"teacher_logprobs has shape"):
    L.forward_kl_from_teacher_samples(q, p[:, :-1])
  with pytest.raises(ValueError, match=r"mask has shape"):
    L.forward_kl_from_teacher_samples(q, p, np.ones((B, T + 1), bool))
