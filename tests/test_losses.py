"""Full-vocabulary divergences against the independent float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from kldistill_jax import losses as L

B, T, V = 2, 5, 11
RTOL, ATOL = 2e-5, 2e-6  # float32 library vs float64 reference

# name -> (library loss with its hyper-parameter bound, reference per-position values)
LOSSES = {
    "forward_kl": (L.forward_kl, ref.forward_kl),
    "reverse_kl": (L.reverse_kl, ref.reverse_kl),
    "mixed_kl": (lambda s, t, *a, **k: L.mixed_kl(s, t, *a, lam=0.3, **k),
                 lambda s, t, tau: ref.mixed_kl(s, t, 0.3, tau)),
    "generalized_jsd": (lambda s, t, *a, **k: L.generalized_jsd(s, t, *a, beta=0.3, **k),
                        lambda s, t, tau: ref.generalized_jsd(s, t, 0.3, tau)),
    "jsd_symmetric": (lambda s, t, *a, **k: L.generalized_jsd(s, t, *a, beta=0.5, **k),
                      lambda s, t, tau: ref.generalized_jsd(s, t, 0.5, tau)),
    "skew_forward_kl": (lambda s, t, *a, **k: L.skew_forward_kl(s, t, *a, alpha=0.1, **k),
                        lambda s, t, tau: ref.skew_forward_kl(s, t, 0.1, tau)),
    "skew_reverse_kl": (lambda s, t, *a, **k: L.skew_reverse_kl(s, t, *a, alpha=0.25, **k),
                        lambda s, t, tau: ref.skew_reverse_kl(s, t, 0.25, tau)),
}
SKEW_AND_JSD = ("generalized_jsd", "jsd_symmetric", "skew_forward_kl", "skew_reverse_kl")


def logits_pair(seed=0, shape=(B, T, V), scale=3.0):
  rng = np.random.default_rng(seed)
  return ((scale * rng.standard_normal(shape)).astype(np.float32),
          (scale * rng.standard_normal(shape)).astype(np.float32))


def make_mask(kind, shape=(B, T), seed=1):
  rng = np.random.default_rng(seed)
  if kind is None:
    return None
  if kind == "bool":
    m = rng.random(shape) < 0.6
    m.flat[0] = True
    return m
  w = rng.random(shape).astype(np.float32) * 2.0  # float weights, a few exactly zero
  w[rng.random(shape) < 0.3] = 0.0
  w.flat[0] = 0.7
  return w


# ---------------------------------------------------------------------------------------------------- values

def test_reference_sanity():
  """The reference itself: KL(p||p) = 0, KL >= 0, and the analytic gradient matches finite differences."""
  s, t = logits_pair(shape=(2, 3, 7))
  np.testing.assert_allclose(ref.forward_kl(s, s), 0.0, atol=1e-12)
  assert (ref.forward_kl(s, t) > 0).all() and (ref.reverse_kl(s, t) > 0).all()
  s = s.astype(np.float64)
  for lam, tau in ((0.0, 1.0), (0.4, 1.7), (1.0, 0.6)):
    g = ref.mixed_kl_grad(s, t, lam, tau)
    eps, fd = 1e-6, np.zeros_like(s)
    for i in np.ndindex(*s.shape):
      plus, minus = s.copy(), s.copy()
      plus[i] += eps
      minus[i] -= eps
      fd[i] = (ref.mixed_kl(plus, t, lam, tau) - ref.mixed_kl(minus, t, lam, tau))[i[:-1]] / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.7])
@pytest.mark.parametrize("name", list(LOSSES))
def test_values_match_reference(name, temperature, mask_kind):
  fn, ref_fn = LOSSES[name]
  s, t = logits_pair(seed=list(LOSSES).index(name))
  mask = make_mask(mask_kind)
  per_pos = ref_fn(s, t, temperature)
  for reduction in ("none", "sum", "mean"):
    got = fn(s, t, mask, temperature=temperature, reduction=reduction)
    assert got.dtype == jnp.float32
    want = ref.reduce(per_pos, mask, reduction)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=reduction)
  got = fn(s, t, mask, temperature=temperature, num_tokens=37)
  np.testing.assert_allclose(got, ref.reduce(per_pos, mask, "sum") / 37, rtol=RTOL, atol=ATOL)


def test_mean_divides_by_global_count_not_per_sequence():
  s, t = logits_pair()
  mask = np.zeros((B, T), bool)
  mask[0, :1] = True
  mask[1, :] = True
  per_pos = ref.forward_kl(s, t)
  got = L.forward_kl(s, t, mask)
  np.testing.assert_allclose(got, per_pos[mask].mean(), rtol=RTOL)
  per_seq = np.mean([per_pos[b][mask[b]].mean() for b in range(B)])
  assert abs(per_seq - per_pos[mask].mean()) > 1e-2  # the two conventions are distinguishable here


@pytest.mark.parametrize("name", list(LOSSES))
def test_all_masked(name):
  fn, _ = LOSSES[name]
  s, t = logits_pair()
  mask = np.zeros((B, T), bool)
  assert float(fn(s, t, mask)) == 0.0
  assert float(fn(s, t, mask, reduction="sum")) == 0.0
  np.testing.assert_array_equal(fn(s, t, mask, reduction="none"), np.zeros((B, T)))
  g = jax.grad(lambda x: fn(x, t, mask))(s)
  np.testing.assert_array_equal(g, np.zeros_like(s))


def test_identical_distributions_give_zero():
  s, _ = logits_pair()
  for name, (fn, _) in LOSSES.items():
    np.testing.assert_allclose(fn(s, s, reduction="none"), 0.0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("shape", [(V,), (7, V), (2, 3, 2, V)])
def test_other_ranks(shape):
  s, t = logits_pair(shape=shape)
  got = L.mixed_kl(s, t, lam=0.6, reduction="none")
  assert got.shape == shape[:-1]
  np.testing.assert_allclose(got, ref.mixed_kl(s, t, 0.6), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("temperature", [1.0, 1.8])
def test_token_stats(temperature):
  s, t = logits_pair(seed=3)
  targets = np.random.default_rng(4).integers(0, V, (B, T))
  stats = L.token_stats(s, t, targets, temperature=temperature)
  q, p = ref.softmax(s, temperature), ref.softmax(t, temperature)
  want = {"forward_kl": ref.kl(p, q), "reverse_kl": ref.kl(q, p), "student_entropy": ref.entropy(q),
          "teacher_entropy": ref.entropy(p),
          "student_logprob": np.take_along_axis(ref.log_softmax(s, temperature), targets[..., None], -1)[..., 0],
          "teacher_logprob": np.take_along_axis(ref.log_softmax(t, temperature), targets[..., None], -1)[..., 0]}
  assert set(stats) == set(want)
  for k in want:
    assert stats[k].shape == (B, T) and stats[k].dtype == jnp.float32
    np.testing.assert_allclose(stats[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)
  assert set(L.token_stats(s, t)) == {"forward_kl", "reverse_kl", "student_entropy", "teacher_entropy"}


# ------------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_mixed_kl_grad_matches_analytic(lam, mask_kind):
  s, t = logits_pair(seed=5)
  tau = 1.3
  mask = make_mask(mask_kind)
  w = np.ones((B, T)) if mask is None else mask.astype(np.float64)
  g_pos = ref.mixed_kl_grad(s, t, lam, tau) * w[..., None]
  g = jax.grad(lambda x: L.mixed_kl(x, t, mask, lam=lam, temperature=tau))(s)
  np.testing.assert_allclose(g, g_pos / w.sum(), rtol=1e-4, atol=1e-7)
  g = jax.grad(lambda x: L.mixed_kl(x, t, mask, lam=lam, temperature=tau, reduction="sum"))(s)
  np.testing.assert_allclose(g, g_pos, rtol=1e-4, atol=1e-6)
  g = jax.grad(lambda x: L.mixed_kl(x, t, mask, lam=lam, temperature=tau, num_tokens=50))(s)
  np.testing.assert_allclose(g, g_pos / 50, rtol=1e-4, atol=1e-7)


def test_forward_reverse_grads_are_the_endpoints():
  s, t = logits_pair(seed=6)
  g = jax.grad(lambda x: L.forward_kl(x, t, reduction="sum"))(s)
  np.testing.assert_allclose(g, ref.mixed_kl_grad(s, t, 0.0), rtol=1e-4, atol=1e-6)
  g = jax.grad(lambda x: L.reverse_kl(x, t, reduction="sum"))(s)
  np.testing.assert_allclose(g, ref.mixed_kl_grad(s, t, 1.0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", SKEW_AND_JSD)
def test_skew_and_jsd_grads_match_finite_differences(name):
  """No closed form in the reference: central differences of the float64 reference instead."""
  fn, ref_fn = LOSSES[name]
  s, t = logits_pair(seed=7, shape=(2, 2, 6))
  s64, tau = s.astype(np.float64), 1.4
  g = jax.grad(lambda x: fn(x, t, temperature=tau, reduction="sum"))(s)
  eps, fd = 1e-6, np.zeros_like(s64)
  for i in np.ndindex(*s.shape):
    plus, minus = s64.copy(), s64.copy()
    plus[i] += eps
    minus[i] -= eps
    fd[i] = (ref_fn(plus, t, tau) - ref_fn(minus, t, tau))[i[:-1]] / (2 * eps)
  np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-6)


def test_student_grads_sum_to_zero_over_vocab():
  """Every loss is invariant to shifting a position's student logits, so its gradient sums to zero."""
  s, t = logits_pair(seed=8)
  for name, (fn, _) in LOSSES.items():
    g = jax.grad(lambda x: fn(x, t))(s)
    np.testing.assert_allclose(np.sum(g, -1), 0.0, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------------------------- composition

@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0])
def test_mixed_is_convex_combination(lam):
  s, t = logits_pair(seed=9)
  mask = make_mask("float")
  got = L.mixed_kl(s, t, mask, lam=lam, reduction="none")
  want = lam * L.reverse_kl(s, t, mask, reduction="none") + (1 - lam) * L.forward_kl(s, t, mask, reduction="none")
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # lam is the weight of the REVERSE KL
  np.testing.assert_allclose(L.mixed_kl(s, t, lam=1.0), ref.reverse_kl(s, t).mean(), rtol=RTOL)
  np.testing.assert_allclose(L.mixed_kl(s, t, lam=0.0), ref.forward_kl(s, t).mean(), rtol=RTOL)


def test_skew_alpha_zero_is_plain_kl():
  s, t = logits_pair(seed=10)
  np.testing.assert_allclose(L.skew_forward_kl(s, t, alpha=0.0), L.forward_kl(s, t), rtol=1e-6)
  np.testing.assert_allclose(L.skew_reverse_kl(s, t, alpha=0.0), L.reverse_kl(s, t), rtol=1e-6)


def test_jit_vmap_grad_compose():
  K = 3
  rng = np.random.default_rng(11)
  s = (3 * rng.standard_normal((K, B, T, V))).astype(np.float32)
  t = (3 * rng.standard_normal((K, B, T, V))).astype(np.float32)
  mask = rng.random((K, B, T)) < 0.7
  mask[:, 0, 0] = True

  def loss(x, y, m):
    return L.mixed_kl(x, y, m, lam=0.4, temperature=1.5)

  values = jax.jit(jax.vmap(loss))(s, t, mask)
  grads = jax.jit(jax.vmap(jax.grad(loss)))(s, t, mask)
  for k in range(K):
    np.testing.assert_allclose(values[k], loss(s[k], t[k], mask[k]), rtol=1e-6)
    np.testing.assert_allclose(grads[k], jax.grad(loss)(s[k], t[k], mask[k]), rtol=1e-5, atol=1e-8)
    want = ref.reduce(ref.mixed_kl(s[k], t[k], 0.4, 1.5), mask[k])
    np.testing.assert_allclose(values[k], want, rtol=RTOL)
    w = mask[k].astype(np.float64)[..., None]
    np.testing.assert_allclose(grads[k], ref.mixed_kl_grad(s[k], t[k], 0.4, 1.5) * w / w.sum(),
                               rtol=1e-4, atol=1e-7)
  # grad of a jitted function, and a traced (scheduled) lam / temperature
  g = jax.grad(jax.jit(loss))(s[0], t[0], mask[0])
  np.testing.assert_allclose(g, grads[0], rtol=1e-5, atol=1e-8)
  traced = jax.jit(lambda lam, tau: L.mixed_kl(s[0], t[0], mask[0], lam=lam, temperature=tau))(0.4, 1.5)
  np.testing.assert_allclose(traced, values[0], rtol=1e-6)


def test_vmap_over_every_loss():
  rng = np.random.default_rng(12)
  s = (3 * rng.standard_normal((2, B, T, V))).astype(np.float32)
  t = (3 * rng.standard_normal((2, B, T, V))).astype(np.float32)
  for name, (fn, ref_fn) in LOSSES.items():
    got = jax.vmap(lambda x, y: fn(x, y, reduction="none"))(s, t)
    for k in range(2):
      np.testing.assert_allclose(got[k], ref_fn(s[k], t[k], 1.0), rtol=RTOL, atol=ATOL, err_msg=name)


# ------------------------------------------------------------------------------------------- dtypes and -inf

@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_inputs(name):
  fn, ref_fn = LOSSES[name]
  rng = np.random.default_rng(13)
  base = (3 * rng.standard_normal((64, 32))).astype(np.float32)
  # teacher and student close: rounding to bf16 must not turn the divergence negative
  s = jnp.asarray(base + 1e-2 * rng.standard_normal(base.shape).astype(np.float32), jnp.bfloat16)
  t = jnp.asarray(base, jnp.bfloat16)
  got = fn(s, t, reduction="none", temperature=1.3)
  assert got.dtype == jnp.float32
  want = ref_fn(np.asarray(s.astype(jnp.float32)), np.asarray(t.astype(jnp.float32)), 1.3)
  # values ~3e-5 here; float32 log-prob differences carry ~3e-7 absolute round-off
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  if name in ("forward_kl", "reverse_kl", "mixed_kl"):
    assert float(got.min()) >= 0.0
    assert float(fn(t, t, reduction="none").min()) >= 0.0
  else:  # no clamp: only float32 round-off below zero
    assert float(got.min()) >= -1e-6
  # far-apart bf16 logits too
  s2, t2 = (jnp.asarray(x, jnp.bfloat16) for x in logits_pair(seed=14))
  want2 = ref_fn(np.asarray(s2.astype(jnp.float32)), np.asarray(t2.astype(jnp.float32)), 1.0)
  np.testing.assert_allclose(fn(s2, t2, reduction="none"), want2, rtol=2e-5, atol=1e-5)
  g = jax.grad(lambda x: fn(x, t2))(s2)
  assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g.astype(jnp.float32))).all()


def _with_masked_vocab(seed=15, n_masked=3):
  s, t = logits_pair(seed=seed)
  s[..., -n_masked:] = -np.inf
  t[..., -n_masked:] = -np.inf
  return s, t


@pytest.mark.parametrize("name", LOSSES)
def test_masked_vocabulary_entries(name):
  """-inf logits in both models (e.g. a masked vocabulary) give finite values and gradients."""
  fn, ref_fn = LOSSES[name]
  s, t = _with_masked_vocab()
  mask = make_mask("bool")
  got = fn(s, t, mask, temperature=1.2, reduction="none")
  # the reference on the vocabulary without the masked entries
  want = ref.reduce(ref_fn(s[..., :-3], t[..., :-3], 1.2), mask, "none")
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  for chunk_size in (None, 4):
    g = jax.grad(lambda x: fn(x, t, mask, temperature=1.2, chunk_size=chunk_size))(s)
    assert np.isfinite(g).all(), name
    np.testing.assert_array_equal(g[..., -3:], 0.0)


def test_masked_vocabulary_grads_match_reference_for_mixed():
  s, t = _with_masked_vocab(seed=16)
  g = jax.grad(lambda x: L.mixed_kl(x, t, lam=0.6, reduction="sum"))(s)
  np.testing.assert_allclose(g[..., :-3], ref.mixed_kl_grad(s[..., :-3], t[..., :-3], 0.6), rtol=1e-4, atol=1e-6)


def test_teacher_only_masked_vocab_forward_kl_finite():
  """p_T(v) = 0 terms vanish in KL(p_T || q): forward KL with teacher-only -inf entries is finite."""
  s, t = logits_pair(seed=17)
  t[..., :2] = -np.inf
  got = L.forward_kl(s, t, reduction="none")
  np.testing.assert_allclose(got, ref.forward_kl(s, t), rtol=RTOL, atol=ATOL)
  assert np.isfinite(jax.grad(lambda x: L.forward_kl(x, t))(s)).all()
  # and symmetrically for the reverse KL with student-only -inf entries
  np.testing.assert_allclose(L.reverse_kl(t, s, reduction="none"), ref.reverse_kl(t, s), rtol=RTOL, atol=ATOL)


def test_fully_masked_padding_rows():
  """A padded position whose logits are all -inf contributes nothing to the value or the gradient."""
  s, t = logits_pair(seed=18)
  s[0, 0] = -np.inf
  t[0, 0] = -np.inf
  mask = np.ones((B, T), bool)
  mask[0, 0] = False
  for name, (fn, ref_fn) in LOSSES.items():
    valid = ref_fn(np.where(mask[..., None], s, 0.0), np.where(mask[..., None], t, 0.0), 1.0)
    np.testing.assert_allclose(fn(s, t, mask), ref.reduce(valid, mask), rtol=RTOL, err_msg=name)
    assert np.isfinite(jax.grad(lambda x: fn(x, t, mask))(s)).all(), name


# --------------------------------------------------------------------------------------------------- errors

ALL_FNS = [(n, f) for n, (f, _) in LOSSES.items()] + [
    ("token_stats", lambda s, t, *a, **k: L.token_stats(s, t, **k))]


@pytest.mark.parametrize("name,fn", ALL_FNS)
def test_vocab_and_shape_errors(name, fn):
  s = np.zeros((B, T, V), np.float32)
  with pytest.raises(ValueError, match=r"vocabulary size mismatch.*V=11.*V=13"):
    fn(s, np.zeros((B, T, 13), np.float32))
  with pytest.raises(ValueError, match=r"shape mismatch.*student_logits.*teacher_logits"):
    fn(s, np.zeros((B, T + 1, V), np.float32))
  with pytest.raises(ValueError, match=r"temperature must be > 0"):
    fn(s, s, temperature=0.0)
  with pytest.raises(ValueError, match=r"temperature must be > 0"):
    fn(s, s, temperature=-1.0)
  for bad in (0, -2, 2.5):
    with pytest.raises(ValueError, match=r"chunk_size"):
      fn(s, s, chunk_size=bad)


@pytest.mark.parametrize("name", list(LOSSES))
def test_mask_and_reduction_errors(name):
  fn, _ = LOSSES[name]
  s = np.zeros((B, T, V), np.float32)
  with pytest.raises(ValueError, match=r"mask has shape \(2, 4\)"):
    fn(s, s, np.ones((B, T - 1), bool))
  with pytest.raises(ValueError, match=r"mask has shape \(2, 5, 11\)"):
    fn(s, s, np.ones((B, T, V), bool))
  with pytest.raises(ValueError, match=r"reduction must be one of"):
    fn(s, s, reduction="avg")


def test_hyperparameter_errors():
  s = np.zeros((B, T, V), np.float32)
  for lam in (-0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"lam must be in \[0.0, 1.0\]"):
      L.mixed_kl(s, s, lam=lam)
  for beta in (0.0, 1.0, -0.5, 2.0):
    with pytest.raises(ValueError, match=r"beta must be in \(0.0, 1.0\)"):
      L.generalized_jsd(s, s, beta=beta)
  for fn in (L.skew_forward_kl, L.skew_reverse_kl):
    for alpha in (1.0, -0.1):
      with pytest.raises(ValueError, match=r"alpha must be in \[0.0, 1.0\)"):
        fn(s, s, alpha=alpha)
  with pytest.raises(ValueError, match=r"targets has shape"):
    L.token_stats(s, s, np.zeros((B, T + 1), np.int32))
  with pytest.raises(ValueError, match=r"scalar"):
    L.mixed_kl(s, s, lam=np.array([0.1, 0.2]))
