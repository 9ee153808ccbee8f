"""The losses on a simulated 8-device (data, fsdp, tensor) mesh equal their single-device results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import numpy_reference as ref
from kldistill_jax import losses as L

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason=f"needs 8 devices, found {jax.device_count()}: tests/conftest.py must set "
           "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is first imported")

B, T, V = 8, 6, 16  # batch over data x fsdp = 4 shards of 2 rows; vocabulary over tensor = 2 shards
DS, DT = 8, 12
RTOL = 1e-6
BATCH = ("data", "fsdp")


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)


def put(mesh, x, spec):
  return jax.device_put(x, NamedSharding(mesh, spec))


def single(x):
  return jax.device_put(x, jax.devices()[0])


def assert_close(got, want, rtol=RTOL, err_msg=""):
  """rtol, with an absolute floor of rtol times the largest |want| for entries that cancel to ~0 (a
  vocabulary split over devices changes the summation order of the softmax normalisers)."""
  want = np.asarray(want, np.float64)
  atol = rtol * max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol, err_msg=err_msg)


def uneven_mask():
  """Row b has b + 1 unmasked tokens (capped at T): each batch shard holds a different count."""
  return np.arange(T)[None, :] < np.minimum(np.arange(B) + 1, T)[:, None]


def data(seed=0):
  rng = np.random.default_rng(seed)
  s = (3 * rng.standard_normal((B, T, V))).astype(np.float32)
  t = (3 * rng.standard_normal((B, T, V))).astype(np.float32)
  return s, t, uneven_mask()


LOSSES = {
    "forward_kl": lambda s, t, m, c: L.forward_kl(s, t, m, temperature=1.5, chunk_size=c),
    "reverse_kl": lambda s, t, m, c: L.reverse_kl(s, t, m, chunk_size=c),
    "mixed_kl": lambda s, t, m, c: L.mixed_kl(s, t, m, lam=0.3, temperature=0.9, chunk_size=c),
}


def _value_and_grad(fn, chunk):
  return jax.jit(jax.value_and_grad(lambda s, t, m: fn(s, t, m, chunk)))


@pytest.mark.parametrize("name,chunk,vocab_sharded", [
    ("forward_kl", None, False), ("forward_kl", 5, True), ("reverse_kl", None, True), ("reverse_kl", 5, False),
    ("mixed_kl", None, True), ("mixed_kl", 5, True)])
def test_full_vocab_losses_sharded(mesh, name, chunk, vocab_sharded):
  s, t, m = data(seed=list(LOSSES).index(name))
  spec = P(BATCH, None, "tensor" if vocab_sharded else None)
  f = _value_and_grad(LOSSES[name], chunk)
  val, grad = f(put(mesh, s, spec), put(mesh, t, spec), put(mesh, m, P(BATCH, None)))
  want_val, want_grad = f(single(s), single(t), single(m))
  assert len(grad.sharding.device_set) == 8
  assert_close(val, want_val)
  assert_close(grad, want_grad)


def test_unchunked_loss_keeps_batch_sharding(mesh):
  s, t, m = data()
  spec = P(BATCH, None, "tensor")
  f = jax.jit(jax.grad(lambda a, b, c: L.reverse_kl(a, b, c)))
  grad = f(put(mesh, s, spec), put(mesh, t, spec), put(mesh, m, P(BATCH, None)))
  assert tuple(grad.sharding.spec)[:1] == (BATCH,), grad.sharding.spec


def test_chunked_and_fused_keep_batch_sharding(mesh):
  s, t, m = data()
  f = jax.jit(jax.grad(lambda a, b, c: L.reverse_kl(a, b, c, chunk_size=4)))
  grad = f(put(mesh, s, P(BATCH, None, None)), put(mesh, t, P(BATCH, None, None)), put(mesh, m, P(BATCH, None)))
  assert tuple(grad.sharding.spec)[:1] == (BATCH,), grad.sharding.spec
  rng = np.random.default_rng(0)
  hs, ht = rng.standard_normal((B, T, DS), np.float32), rng.standard_normal((B, T, DT), np.float32)
  ws, wt = rng.standard_normal((DS, V), np.float32), rng.standard_normal((DT, V), np.float32)
  f = jax.jit(jax.grad(lambda a, b, c, d: L.fused_token_kl(a, b, c, d, lam=0.4, chunk_size=4)))
  g_h = f(put(mesh, hs, P(BATCH, None, None)), put(mesh, ws, P()), put(mesh, ht, P(BATCH, None, None)),
          put(mesh, wt, P()))
  assert tuple(g_h.sharding.spec)[:1] == (BATCH,), g_h.sharding.spec


def test_token_mean_is_global(mesh):
  s, t, m = data(seed=5)
  counts = m.reshape(4, -1).sum(-1)
  assert len(set(counts.tolist())) == 4  # every batch shard holds a different number of tokens
  spec = P(BATCH, None, "tensor")
  val = jax.jit(L.forward_kl)(put(mesh, s, spec), put(mesh, t, spec), put(mesh, m, P(BATCH, None)))
  per_pos = ref.forward_kl(s, t)
  global_mean = per_pos[m].mean()
  shard_means = np.mean([per_pos[2 * i:2 * i + 2][m[2 * i:2 * i + 2]].mean() for i in range(4)])
  assert abs(global_mean - shard_means) > 0.05  # the two would be told apart
  np.testing.assert_allclose(val, global_mean, rtol=2e-5)
  # and the same for the sampled estimator
  q, p = ref.log_softmax(s)[..., 0].astype(np.float32), ref.log_softmax(t)[..., 0].astype(np.float32)
  val = jax.jit(L.reverse_kl_policy_gradient)(put(mesh, q, P(BATCH, None)), put(mesh, p, P(BATCH, None)),
                                              put(mesh, m, P(BATCH, None)))
  np.testing.assert_allclose(val, (q.astype(np.float64) - p)[m].mean(), rtol=2e-5)


@pytest.mark.parametrize("head_sharded", [False, True])
def test_fused_sharded(mesh, head_sharded):
  rng = np.random.default_rng(7)
  hs = rng.standard_normal((B, T, DS)).astype(np.float32)
  ws = (rng.standard_normal((DS, V)) * 3 / np.sqrt(DS)).astype(np.float32)
  ht = rng.standard_normal((B, T, DT)).astype(np.float32)
  wt = (rng.standard_normal((DT, V)) * 3 / np.sqrt(DT)).astype(np.float32)
  m = uneven_mask()
  f = jax.jit(jax.value_and_grad(
      lambda a, b, c, d, mask: L.fused_token_kl(a, b, c, d, mask, lam=0.4, temperature=1.2, chunk_size=5),
      (0, 1)))
  head_spec = P(None, "tensor") if head_sharded else P()
  val, (g_h, g_w) = f(put(mesh, hs, P(BATCH, None, None)), put(mesh, ws, head_spec),
                      put(mesh, ht, P(BATCH, None, None)), put(mesh, wt, head_spec), put(mesh, m, P(BATCH, None)))
  want_val, (w_h, w_w) = f(*(single(x) for x in (hs, ws, ht, wt, m)))
  assert_close(val, want_val)
  assert_close(g_h, w_h)
  assert_close(g_w, w_w)
  # the global token mean, against the float64 reference
  want64 = ref.reduce(ref.mixed_kl(hs.astype(np.float64) @ ws, ht.astype(np.float64) @ wt, 0.4, 1.2), m)
  np.testing.assert_allclose(val, want64, rtol=2e-5)


@pytest.mark.parametrize("discount", [0.0, 1.0])
def test_policy_gradient_sharded(mesh, discount):
  rng = np.random.default_rng(8)
  q = ref.log_softmax(3 * rng.standard_normal((B, T, 5)))[..., 0].astype(np.float32)
  p = ref.log_softmax(3 * rng.standard_normal((B, T, 5)))[..., 0].astype(np.float32)
  b = ref.log_softmax(3 * rng.standard_normal((B, T, 5)))[..., 0].astype(np.float32)
  m = uneven_mask()
  f = jax.jit(jax.value_and_grad(lambda x, y, z, mask: L.reverse_kl_policy_gradient(
      x, y, mask, discount=discount, behavior_logprobs=z, clip=3.0)))
  spec = P(BATCH, None)
  val, grad = f(*(put(mesh, x, spec) for x in (q, p, b, m)))
  want_val, want_grad = f(*(single(x) for x in (q, p, b, m)))
  assert_close(val, want_val)
  assert_close(grad, want_grad)
  w = np.minimum(np.exp(q.astype(np.float64) - b), 3.0)
  R = ref.reward_to_go(p.astype(np.float64) - q, m, discount)
  np.testing.assert_allclose(grad, -w * R * m / m.sum(), rtol=1e-5, atol=1e-7)
