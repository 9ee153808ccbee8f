"""forward_kl / reverse_kl / mixed_kl with the one-pass analytic gradient (losses/logits_kl.py) against
plain autodiff of the same divergences (the generic kernel path) and the float64 NumPy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from kldistill_jax import losses as L
from kldistill_jax.losses import divergences as D

B, T, V = 2, 7, 11  # N = 14 positions; chunk sizes 4 and 5 do not divide it, 14 does (single call)
LAM = 0.3

LOSSES = {
    "forward_kl": (lambda s, t, *a, lam, **k: L.forward_kl(s, t, *a, **k), lambda lam: D._forward),
    "reverse_kl": (lambda s, t, *a, lam, **k: L.reverse_kl(s, t, *a, **k), lambda lam: D._reverse),
    "mixed_kl": (L.mixed_kl,
                 lambda lam: lambda s, t: lam * D._reverse(s, t) + (1.0 - lam) * D._forward(s, t)),
}
REFERENCE = {"forward_kl": lambda s, t, tau, lam: ref.forward_kl(s, t, tau),
             "reverse_kl": lambda s, t, tau, lam: ref.reverse_kl(s, t, tau),
             "mixed_kl": lambda s, t, tau, lam: ref.mixed_kl(s, t, lam, tau)}


def autodiff(name, s, t, mask=None, *, lam=LAM, temperature=1.0, reduction="mean", chunk_size=None,
             num_tokens=None):
  """The same loss through plain autodiff of the log-softmax kernels (the implementation before)."""
  return D._token_loss(LOSSES[name][1](lam), s, t, mask, temperature, reduction, chunk_size, num_tokens)


def analytic(name, s, t, mask=None, *, lam=LAM, **kw):
  return LOSSES[name][0](s, t, mask, lam=lam, **kw)


def logits_pair(seed=0, shape=(B, T, V), scale=3.0):
  rng = np.random.default_rng(seed)
  return ((scale * rng.standard_normal(shape)).astype(np.float32),
          (scale * rng.standard_normal(shape)).astype(np.float32))


def make_mask(kind, seed=1):
  rng = np.random.default_rng(seed)
  if kind is None:
    return None
  if kind == "bool":
    m = rng.random((B, T)) < 0.6
    m[0, 0] = True
    return m
  w = (rng.random((B, T)) * 2).astype(np.float32)  # float weights, some exactly zero
  w[rng.random((B, T)) < 0.3] = 0.0
  w[0, 0] = 0.7
  return w


def assert_close(got, want, rtol=1e-5, err_msg=""):
  """rtol, with an absolute floor of rtol/10 of the largest |want| for entries that cancel to ~0."""
  want = np.asarray(want, np.float64)
  atol = 0.1 * rtol * max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol, err_msg=err_msg)


@functools.lru_cache(maxsize=None)
def _bundle(fn, name, reduction, chunk_size, num_tokens):
  """Compiled (value, cotangent) -> (value, grads w.r.t. student, teacher, temperature, lam)."""

  @jax.jit
  def run(s, t, mask, tau, lam, ct):
    f = lambda a, b, tau, lam: fn(name, a, b, mask, lam=lam, temperature=tau, reduction=reduction,
                                  chunk_size=chunk_size, num_tokens=num_tokens)
    value, vjp = jax.vjp(f, s, t, tau, lam)
    return (value,) + vjp(ct)

  return run


# ------------------------------------------------------------------------------------ equal to autodiff

@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("chunk_size", [None, 4, 5, 14])
@pytest.mark.parametrize("name", list(LOSSES))
def test_values_and_all_gradients_equal_autodiff(name, chunk_size, mask_kind):
  """Value and the gradients w.r.t. the student AND teacher logits, temperature and lam, for every
  reduction (a random per-position cotangent for "none"), temperature != 1, bool and float masks."""
  s, t = logits_pair(seed=list(LOSSES).index(name))
  mask = make_mask(mask_kind)
  rng = np.random.default_rng(3)
  for reduction, num_tokens in (("mean", None), ("mean", 9.0), ("sum", None), ("none", None)):
    ct = rng.standard_normal((B, T)).astype(np.float32) if reduction == "none" else np.float32(0.7)
    args = (s, t, mask, np.float32(1.3), np.float32(LAM), ct)
    got = _bundle(analytic, name, reduction, chunk_size, num_tokens)(*args)
    want = _bundle(autodiff, name, reduction, chunk_size, num_tokens)(*args)
    for what, g, w in zip(("value", "student grad", "teacher grad", "temperature grad", "lam grad"), got, want):
      assert g.dtype == w.dtype and g.shape == w.shape, what
      # the scalar hyper-parameter gradients sum per-position terms of both signs: float32 round-off of
      # the two summation orders reaches ~1e-5 of the (partly cancelled) total
      assert_close(g, w, rtol=5e-5 if what in ("temperature grad", "lam grad") else 1e-5,
                   err_msg=f"{what}, reduction={reduction}, num_tokens={num_tokens}")


@pytest.mark.parametrize("name", list(LOSSES))
def test_values_and_grads_match_numpy_reference(name):
  """Value against the float64 reference; student gradient against its closed form; teacher gradient
  against central differences of the reference (an independent derivation)."""
  s, t = logits_pair(seed=4, shape=(2, 2, 6))
  mask = np.array([[1.0, 0.0], [0.5, 2.0]], np.float32)
  tau = 1.4
  per_pos = REFERENCE[name](s, t, tau, LAM)
  for chunk_size in (None, 3):
    loss = lambda a, b: analytic(name, a, b, mask, temperature=tau, reduction="sum", chunk_size=chunk_size)
    value, (g_s, g_t) = jax.value_and_grad(loss, argnums=(0, 1))(s, t)
    np.testing.assert_allclose(value, ref.reduce(per_pos, mask, "sum"), rtol=1e-5)
    lam = {"forward_kl": 0.0, "reverse_kl": 1.0, "mixed_kl": LAM}[name]
    np.testing.assert_allclose(g_s, ref.mixed_kl_grad(s, t, lam, tau) * mask[..., None], rtol=1e-4,
                               atol=1e-6)
    t64, eps, fd = t.astype(np.float64), 1e-6, np.zeros(t.shape)
    for i in np.ndindex(*t.shape):
      plus, minus = t64.copy(), t64.copy()
      plus[i] += eps
      minus[i] -= eps
      fd[i] = (REFERENCE[name](s, plus, tau, LAM) - REFERENCE[name](s, minus, tau, LAM))[i[:-1]] / (2 * eps)
    np.testing.assert_allclose(g_t, fd * mask[..., None], rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------------------ edge cases

@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_inputs_give_bf16_grads_computed_in_float32(name, chunk_size):
  s, t = (jnp.asarray(x, jnp.bfloat16) for x in logits_pair(seed=5))
  s32, t32 = s.astype(jnp.float32), t.astype(jnp.float32)
  for reduction in ("sum", "mean"):
    kw = dict(temperature=1.2, reduction=reduction, chunk_size=chunk_size)
    value, (g_s, g_t) = jax.value_and_grad(lambda a, b: analytic(name, a, b, **kw), argnums=(0, 1))(s, t)
    assert value.dtype == jnp.float32 and g_s.dtype == jnp.bfloat16 and g_t.dtype == jnp.bfloat16
    # the float32 computation on the same (bf16-valued) logits, rounded once to bf16
    want_value, (w_s, w_t) = jax.value_and_grad(lambda a, b: autodiff(name, a, b, **kw),
                                                argnums=(0, 1))(s32, t32)
    assert_close(value, want_value, err_msg="value")
    for g, w in ((g_s, w_s), (g_t, w_t)):
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w.astype(jnp.bfloat16), np.float32),
                                 rtol=2e-2, atol=1e-2 * float(np.max(np.abs(w))))


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("name", list(LOSSES))
def test_all_masked_and_padding_rows(name, chunk_size):
  s, t = logits_pair(seed=6)
  grad = jax.grad(lambda a, b, m, r: analytic(name, a, b, m, reduction=r, chunk_size=chunk_size),
                  argnums=(0, 1))
  zeros = np.zeros((B, T), bool)
  for reduction in ("mean", "sum"):
    assert float(analytic(name, s, t, zeros, reduction=reduction, chunk_size=chunk_size)) == 0.0
    for g in grad(s, t, zeros, reduction):
      np.testing.assert_array_equal(g, np.zeros_like(s))
  np.testing.assert_array_equal(analytic(name, s, t, zeros, reduction="none"), np.zeros((B, T)))
  # a masked padding row of -inf logits in both models, plus vocabulary entries both models mask
  s[0, 0], t[0, 0] = -np.inf, -np.inf
  s[..., -2:], t[..., -2:] = -np.inf, -np.inf
  mask = np.ones((B, T), bool)
  mask[0, 0] = False
  g_s, g_t = grad(s, t, mask, "mean")
  assert np.isfinite(g_s).all() and np.isfinite(g_t).all()
  np.testing.assert_array_equal(g_s[0, 0], 0.0)
  np.testing.assert_array_equal(g_t[..., -2:], 0.0)
  want = jax.grad(lambda a, b: autodiff(name, a, b, mask, chunk_size=chunk_size), argnums=(0, 1))(s, t)
  assert_close(g_s, want[0])
  assert_close(g_t, want[1])


def test_grad_through_none_reduction_with_a_random_cotangent():
  s, t = logits_pair(seed=7)
  mask = make_mask("float")
  ct = np.random.default_rng(8).standard_normal((B, T)).astype(np.float32)
  for name in LOSSES:
    for chunk_size in (None, 5):
      f = lambda fn, a, b: jnp.sum(ct * fn(name, a, b, mask, temperature=0.8, reduction="none",
                                            chunk_size=chunk_size))
      got = jax.grad(functools.partial(f, analytic), argnums=(0, 1))(s, t)
      want = jax.grad(functools.partial(f, autodiff), argnums=(0, 1))(s, t)
      for g, w in zip(got, want):
        assert_close(g, w, err_msg=f"{name} C={chunk_size}")


def test_jit_vmap_grad_compose():
  rng = np.random.default_rng(9)
  s = (3 * rng.standard_normal((3, B, T, V))).astype(np.float32)
  t = (3 * rng.standard_normal((3, B, T, V))).astype(np.float32)
  mask = rng.random((3, B, T)) < 0.7
  mask[:, 0, 0] = True
  for name in LOSSES:
    for chunk_size in (None, 4):
      f = lambda fn, a, b, m: fn(name, a, b, m, temperature=1.5, chunk_size=chunk_size)
      got = jax.jit(jax.vmap(jax.value_and_grad(functools.partial(f, analytic), argnums=(0, 1))))(s, t, mask)
      for k in range(3):
        want = jax.value_and_grad(functools.partial(f, autodiff), argnums=(0, 1))(s[k], t[k], mask[k])
        for g, w in zip(jax.tree.leaves((got[0][k], got[1][0][k], got[1][1][k])), jax.tree.leaves(want)):
          assert_close(g, w, err_msg=f"{name} C={chunk_size} k={k}")


def test_traced_lam_and_temperature():
  s, t = logits_pair(seed=10)
  f = jax.jit(jax.grad(lambda a, lam, tau: L.mixed_kl(a, t, lam=lam, temperature=tau, chunk_size=4),
                       argnums=(0, 1, 2)))
  got = f(s, 0.4, 1.5)
  want = jax.grad(lambda a, lam, tau: autodiff("mixed_kl", a, t, lam=lam, temperature=tau), argnums=(0, 1, 2))(
      s, 0.4, 1.5)
  for g, w in zip(got, want):
    assert_close(g, w)


def test_scratch_beyond_the_gradient_is_per_chunk():
  """Compiled value+grad of the chunked loss: no [N, V]-sized temporary besides the gradient (an output),
  and scratch that does not grow with the number of positions."""
  v, c = 4096, 16

  def scratch(n):
    x = jax.ShapeDtypeStruct((1, n, v), jnp.float32)
    f = jax.jit(jax.value_and_grad(lambda a, b: L.mixed_kl(a, b, lam=0.5, chunk_size=c)))
    return f.lower(x, x).compile().memory_analysis().temp_size_in_bytes

  small, large = scratch(512), scratch(2048)
  assert large < 0.1 * 4 * 2048 * v, large  # < 10% of one [N, V] float32 tensor
  assert large <= 1.1 * small, (small, large)
