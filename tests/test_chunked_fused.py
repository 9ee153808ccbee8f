"""Chunked == unchunked for every full-vocabulary loss; fused hidden-state KL == materialised mixed_kl."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from kldistill_jax import losses as L
from kldistill_jax.losses import fused as fused_module

B, T, V = 2, 7, 11  # N = 14 positions
DS, DT = 6, 9
# Chunk sizes: 4 and 5 do not divide N = 14 (the last chunk is shifted back and overlaps), 1 and 7 do,
# 14 == N and 20 > N take the single-call path.
CHUNKED_CASES = ([(n, c) for n in ("forward_kl", "reverse_kl", "mixed_kl") for c in (4, 5)]
                 + [(n, 5) for n in ("generalized_jsd", "skew_forward_kl", "skew_reverse_kl")]
                 + [("mixed_kl", c) for c in (1, 7, 14, 20)])

LOSSES = {
    "forward_kl": L.forward_kl,
    "reverse_kl": L.reverse_kl,
    "mixed_kl": lambda s, t, *a, **k: L.mixed_kl(s, t, *a, lam=0.3, **k),
    "generalized_jsd": lambda s, t, *a, **k: L.generalized_jsd(s, t, *a, beta=0.4, **k),
    "skew_forward_kl": lambda s, t, *a, **k: L.skew_forward_kl(s, t, *a, alpha=0.1, **k),
    "skew_reverse_kl": lambda s, t, *a, **k: L.skew_reverse_kl(s, t, *a, alpha=0.2, **k),
}


def logits_pair(seed=0, shape=(B, T, V), scale=3.0):
  rng = np.random.default_rng(seed)
  return ((scale * rng.standard_normal(shape)).astype(np.float32),
          (scale * rng.standard_normal(shape)).astype(np.float32))


def float_mask(seed=1, shape=(B, T)):
  rng = np.random.default_rng(seed)
  w = (rng.random(shape) * 2).astype(np.float32)
  w[rng.random(shape) < 0.3] = 0.0
  w[0, 0] = 1.0
  return w


def bool_mask(seed=2, shape=(B, T)):
  m = np.random.default_rng(seed).random(shape) < 0.6
  m[0, 0] = True
  return m


# ---------------------------------------------------------------------------------------------------- chunking

def assert_close(got, want, rtol=1e-5, err_msg=""):
  """rtol, with an absolute floor of rtol/10 of the largest |want| for entries that cancel to ~0."""
  want = np.asarray(want, np.float64)
  atol = 0.1 * rtol * max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol, err_msg=err_msg)


@functools.lru_cache(maxsize=None)
def _loss_bundle(name, chunk_size):
  """One compiled function per (loss, chunk size): mean and per-position values, and their gradients."""
  fn = LOSSES[name]

  @jax.jit
  def run(s, t, mask, ct):
    kw = dict(temperature=1.3, chunk_size=chunk_size)
    mean, g_mean = jax.value_and_grad(lambda x: fn(x, t, mask, **kw))(s)
    # reduction "none", differentiated with a non-uniform cotangent
    none, vjp = jax.vjp(lambda x: fn(x, t, mask, reduction="none", **kw), s)
    return mean, g_mean, none, vjp(ct)[0]

  return run


@pytest.mark.parametrize("name,chunk_size", CHUNKED_CASES)
def test_chunked_equals_unchunked(name, chunk_size):
  s, t = logits_pair(seed=list(LOSSES).index(name))
  mask = float_mask()
  ct = np.random.default_rng(3).standard_normal((B, T)).astype(np.float32)
  got = _loss_bundle(name, chunk_size)(s, t, mask, ct)
  want = _loss_bundle(name, None)(s, t, mask, ct)
  for what, g, w in zip(("mean", "grad of mean", "none", "grad of none"), got, want):
    assert_close(g, w, err_msg=what)


def test_chunked_matches_reference():
  s, t = logits_pair(seed=10)
  mask = bool_mask()
  f = jax.jit(jax.value_and_grad(lambda x: jnp.sum(L.mixed_kl(x, t, mask, lam=0.7, chunk_size=5, reduction="none"))))
  val, g = f(s)
  np.testing.assert_allclose(val, ref.reduce(ref.mixed_kl(s, t, 0.7), mask, "sum"), rtol=2e-5)
  np.testing.assert_allclose(g, ref.mixed_kl_grad(s, t, 0.7) * mask[..., None], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [4, 20])
def test_token_stats_chunked(chunk_size):
  s, t = logits_pair(seed=11)
  targets = np.random.default_rng(4).integers(0, V, (B, T))
  full = L.token_stats(s, t, targets, temperature=0.8)
  chunked = L.token_stats(s, t, targets, temperature=0.8, chunk_size=chunk_size)
  assert set(full) == set(chunked)
  for k in full:  # atol: an entropy of ~2e-4 sums terms of ~1e-3 with cancellation; XLA may round it
    # differently in the two programs (4.8e-7 apart with LLVM at -O0, as the suite compiles)
    np.testing.assert_allclose(chunked[k], full[k], rtol=1e-5, atol=1e-6, err_msg=k)

  def combo(x, c):
    st = L.token_stats(x, t, targets, temperature=0.8, chunk_size=c)
    return (jnp.sum(st["forward_kl"]) + 0.5 * jnp.sum(st["reverse_kl"]) - 0.3 * jnp.sum(st["student_entropy"])
            + 0.2 * jnp.sum(st["student_logprob"]))

  grad = jax.jit(jax.grad(combo), static_argnums=1)
  assert_close(grad(s, chunk_size), grad(s, None))


def test_chunked_leading_rank_and_vmap():
  s, t = logits_pair(seed=12, shape=(3, B, T, V))
  f = lambda x, y: L.reverse_kl(x, y, chunk_size=5, reduction="none")
  got = jax.vmap(f)(s, t)
  for k in range(3):
    np.testing.assert_allclose(got[k], ref.reverse_kl(s[k], t[k]), rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------------------------------------------- fused

def hidden_and_heads(seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  hs = rng.standard_normal((B, T, DS)).astype(np.float32)
  ws = (rng.standard_normal((DS, V)) * 3 / np.sqrt(DS)).astype(np.float32)
  ht = rng.standard_normal((B, T, DT)).astype(np.float32)
  wt = (rng.standard_normal((DT, V)) * 3 / np.sqrt(DT)).astype(np.float32)
  return tuple(jnp.asarray(a, dtype) for a in (hs, ws, ht, wt))


def materialised(hs, ws, ht, wt, mask=None, **kw):
  s = jnp.einsum("...d,dv->...v", hs, ws, precision="highest", preferred_element_type=jnp.float32)
  t = jnp.einsum("...d,dv->...v", ht, wt, precision="highest", preferred_element_type=jnp.float32)
  return L.mixed_kl(s, t, mask, **kw)


FUSED_CASES = [  # (temperature, mask kind, reduction, num_tokens); no mask: test_fused_blocked_head_grad
    (1.7, "bool", "mean", None),
    (0.8, "float", "sum", None),
    (1.3, "float", "mean", 25.0),
]


def _fused_vs_materialised(hs, ws, ht, wt, cases, chunk_size):
  """One compiled function: (value, d/dh_s, d/dW_s) of the fused and the materialised form per case."""

  @jax.jit
  def run(hs, ws, ht, wt):
    out = []
    for mask, kw in cases:
      f = lambda a, b: L.fused_token_kl(a, b, ht, wt, mask, chunk_size=chunk_size, **kw)
      m = lambda a, b: materialised(a, b, ht, wt, mask, **kw)
      out.append((jax.value_and_grad(f, (0, 1))(hs, ws), jax.value_and_grad(m, (0, 1))(hs, ws)))
    return out

  return run(hs, ws, ht, wt)


def _check_fused(results, cases):
  for ((val, (g_h, g_w)), (want, (w_h, w_w))), (mask, kw) in zip(results, cases):
    msg = str(kw)
    assert_close(val, want, err_msg=msg)
    assert_close(g_h, w_h, err_msg=msg)
    assert_close(g_w, w_w, err_msg=msg)


@pytest.mark.parametrize("lam,chunk_size", [(0.0, 4), (0.3, 5), (1.0, 4), (0.3, 14), (1.0, 128)])
def test_fused_equals_materialised(lam, chunk_size):
  hs, ws, ht, wt = hidden_and_heads(seed=int(10 * lam) + chunk_size)
  cases = [({None: None, "bool": bool_mask(), "float": float_mask()}[mask_kind],
            dict(lam=lam, temperature=temperature, reduction=reduction, num_tokens=num_tokens))
           for temperature, mask_kind, reduction, num_tokens in FUSED_CASES]
  results = _fused_vs_materialised(hs, ws, ht, wt, cases, chunk_size)
  _check_fused(results, cases)
  # and the values against the float64 reference, independently of mixed_kl
  s64 = np.asarray(hs, np.float64) @ np.asarray(ws, np.float64)
  t64 = np.asarray(ht, np.float64) @ np.asarray(wt, np.float64)
  for ((val, _), _), (mask, kw) in zip(results, cases):
    want64 = ref.reduce(ref.mixed_kl(s64, t64, lam, kw["temperature"]), mask, kw["reduction"], kw["num_tokens"])
    np.testing.assert_allclose(val, want64, rtol=2e-5, err_msg=str(kw))


def test_fused_head_grad_against_analytic_reference():
  """d/dW_s = h^T dz, d/dh_s = dz W_s^T with dz the analytic per-position gradient (mean reduction)."""
  hs, ws, ht, wt = hidden_and_heads(seed=20)
  mask = bool_mask()
  g_h, g_w = jax.grad(lambda a, b: L.fused_token_kl(a, b, ht, wt, mask, lam=0.45, temperature=1.4,
                                                     chunk_size=5), (0, 1))(hs, ws)
  h64, w64 = np.asarray(hs, np.float64), np.asarray(ws, np.float64)
  dz = ref.mixed_kl_grad(h64 @ w64, np.asarray(ht, np.float64) @ np.asarray(wt, np.float64), 0.45, 1.4)
  dz = dz * mask[..., None] / mask.sum()
  np.testing.assert_allclose(g_h, dz @ w64.T, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(g_w, np.einsum("btd,btv->dv", h64, dz), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("block", [3, 4])
def test_fused_blocked_head_grad(monkeypatch, block):
  """HEAD_GRAD_BLOCK not dividing V = 11 exercises the shifted last block of the head-gradient update."""
  monkeypatch.setattr(fused_module, "HEAD_GRAD_BLOCK", block)
  hs, ws, ht, wt = hidden_and_heads(seed=21)
  cases = [(float_mask(), dict(lam=0.6, temperature=1.2)), (None, dict(lam=0.1, reduction="sum"))]
  _check_fused(_fused_vs_materialised(hs, ws, ht, wt, cases, 5), cases)


@pytest.mark.parametrize("chunk_size", [5, 128])
def test_fused_stats_equal_token_stats(chunk_size):
  hs, ws, ht, wt = hidden_and_heads(seed=22)
  mask = bool_mask()
  loss, stats = L.fused_token_kl_with_stats(hs, ws, ht, wt, mask, lam=0.2, temperature=1.5, chunk_size=chunk_size)
  want = L.token_stats(hs @ ws, ht @ wt, temperature=1.5)
  assert set(stats) == set(want)
  for k in want:
    assert stats[k].shape == (B, T)
    np.testing.assert_allclose(stats[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # stats are unmasked; the loss is the masked mixture of them
  mix = 0.2 * want["reverse_kl"] + 0.8 * want["forward_kl"]
  np.testing.assert_allclose(loss, np.sum(np.where(mask, mix, 0.0)) / mask.sum(), rtol=1e-5)


def test_fused_teacher_gets_zero_grad():
  hs, ws, ht, wt = hidden_and_heads(seed=23)
  g = jax.grad(lambda a, b, c, d: L.fused_token_kl(a, b, c, d, lam=0.5, chunk_size=5), (2, 3))(hs, ws, ht, wt)
  for x in g:
    np.testing.assert_array_equal(x, 0.0)


def test_fused_jit_traced_lam_and_vmap():
  hs, ws, ht, wt = hidden_and_heads(seed=24)
  f = jax.jit(jax.value_and_grad(
      lambda a, b, lam, tau: L.fused_token_kl(a, b, ht, wt, lam=lam, temperature=tau, chunk_size=4), (0, 1)))
  val, (g_h, g_w) = f(hs, ws, 0.35, 1.2)
  want, (w_h, w_w) = jax.jit(jax.value_and_grad(
      lambda a, b: materialised(a, b, ht, wt, lam=0.35, temperature=1.2), (0, 1)))(hs, ws)
  assert_close(val, want)
  assert_close(g_h, w_h)
  assert_close(g_w, w_w)
  # vmap over the batch axis (per-sequence means) against a python loop
  per_seq = jax.vmap(lambda a, c: L.fused_token_kl(a, ws, c, wt, lam=0.35, chunk_size=4))(hs, ht)
  for b in range(B):
    np.testing.assert_allclose(per_seq[b], materialised(hs[b], ws, ht[b], wt, lam=0.35), rtol=1e-5)


def test_fused_all_masked():
  hs, ws, ht, wt = hidden_and_heads(seed=25)
  mask = np.zeros((B, T), bool)
  val, g = jax.value_and_grad(lambda a, b: L.fused_token_kl(a, b, ht, wt, mask, lam=0.5, chunk_size=4), (0, 1))(hs, ws)
  assert float(val) == 0.0
  for x in g:
    np.testing.assert_array_equal(x, 0.0)


def test_fused_bf16():
  hs, ws, ht, wt = hidden_and_heads(seed=26, dtype=jnp.bfloat16)
  mask = bool_mask()
  val, (g_h, g_w) = jax.value_and_grad(
      lambda a, b: L.fused_token_kl(a, b, ht, wt, mask, lam=0.3, chunk_size=5), (0, 1))(hs, ws)
  assert val.dtype == jnp.float32 and g_h.dtype == jnp.bfloat16 and g_w.dtype == jnp.bfloat16
  f32 = [x.astype(jnp.float32) for x in (hs, ws, ht, wt)]
  want, (w_h, w_w) = jax.value_and_grad(
      lambda a, b: materialised(a, b, f32[2], f32[3], mask, lam=0.3), (0, 1))(f32[0], f32[1])
  np.testing.assert_allclose(val, want, rtol=1e-5)  # bf16 products are exact in float32 accumulation
  assert float(val) >= 0.0
  # the bf16 tolerance of test_fused_bf16_hidden_with_float32_heads (dz enters the gradient matmuls in
  # bf16), plus the gradients' own bf16 rounding
  for g, w in ((g_h, w_h), (g_w, w_w)):
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0, atol=2e-2 * float(np.max(np.abs(w))))


def test_fused_bf16_hidden_with_float32_heads():
  """Training's mixed precision: bf16 hidden states, float32 heads. The heads are cast to bf16 (the
  compute dtype) with float32 accumulation, so the value is the float32 reference on the bf16-rounded
  heads (to 1e-5), not on the float32 ones. Stated bf16 tolerance of the gradients (dz is rounded to bf16
  before the two gradient matmuls, as autodiff of a bf16 matmul does): 2% of the largest entry."""
  hs, ws, ht, wt = hidden_and_heads(seed=27)
  hs, ht = hs.astype(jnp.bfloat16), ht.astype(jnp.bfloat16)
  mask = float_mask()
  fused = lambda a, b: L.fused_token_kl(a, b, ht, wt, mask, lam=0.4, temperature=1.3, chunk_size=5)
  val, (g_h, g_w) = jax.value_and_grad(fused, (0, 1))(hs, ws)
  assert g_h.dtype == jnp.bfloat16 and g_w.dtype == jnp.float32
  # every dot of the loss (forward and gradient) takes bf16 operands, as lowered for an accelerator (on
  # XLA:CPU they are widened to float32 first: the same products, see fused._matmul)
  hlo = jax.jit(jax.value_and_grad(fused, (0, 1))).trace(hs, ws).lower(lowering_platforms=("tpu",)).as_text()
  dots = re.findall(r"dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", hlo)
  assert len(dots) >= 4 and all("bf16" in a and "bf16" in b for a, b in dots), dots

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  rounded = lambda w: f32(w.astype(jnp.bfloat16))
  reference = lambda a, b, w_t: materialised(a, b, f32(ht), w_t, mask, lam=0.4, temperature=1.3)
  want, (w_h, w_w) = jax.value_and_grad(reference, (0, 1))(f32(hs), rounded(ws), rounded(wt))
  unrounded = reference(f32(hs), ws, wt)
  assert abs(float(val) - float(want)) <= 1e-5 * abs(float(want))
  assert abs(float(val) - float(unrounded)) > 10 * abs(float(val) - float(want))  # the heads were cast
  for g, w in ((g_h, w_h), (g_w, w_w)):
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0, atol=2e-2 * float(np.max(np.abs(w))))


def test_fused_errors():
  hs, ws, ht, wt = hidden_and_heads()
  kw = dict(lam=0.5)
  with pytest.raises(ValueError, match=r"student_head must have shape \[hidden=6, V\]"):
    L.fused_token_kl(hs, ws[:-1], ht, wt, **kw)
  with pytest.raises(ValueError, match=r"teacher_head must have shape \[hidden=9, V\]"):
    L.fused_token_kl(hs, ws, ht, wt[:-1], **kw)
  with pytest.raises(ValueError, match=r"student_head"):
    L.fused_token_kl(hs, ws[None], ht, wt, **kw)
  with pytest.raises(ValueError, match=r"vocabulary size mismatch.*V=11.*V=10"):
    L.fused_token_kl(hs, ws, ht, wt[:, :-1], **kw)
  with pytest.raises(ValueError, match=r"shape mismatch: student_hidden.*teacher_hidden"):
    L.fused_token_kl(hs, ws, ht[:, :-1], wt, **kw)
  with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum'\), got 'none'"):
    L.fused_token_kl(hs, ws, ht, wt, reduction="none", **kw)
  with pytest.raises(ValueError, match=r"mask has shape"):
    L.fused_token_kl(hs, ws, ht, wt, np.ones((B, T + 1), bool), **kw)
  with pytest.raises(ValueError, match=r"lam must be in"):
    L.fused_token_kl(hs, ws, ht, wt, lam=1.2)
  with pytest.raises(ValueError, match=r"temperature must be > 0"):
    L.fused_token_kl(hs, ws, ht, wt, temperature=0.0, **kw)
  with pytest.raises(ValueError, match=r"chunk_size"):
    L.fused_token_kl(hs, ws, ht, wt, chunk_size=0, **kw)


# ------------------------------------------------------------------------------------------------------ memory

def _temp_bytes(fn, t, v=32768, ds=64, dt=128):
  args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in ((t, ds), (ds, v), (t, dt), (dt, v))]
  compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(*args).compile()  # compiled, never run
  return compiled.memory_analysis().temp_size_in_bytes


def test_fused_memory_does_not_grow_with_tokens():
  """Deterministic compiled temp sizes (not timings): fused is O(chunk * V), the naive form O(T * V)."""
  v = 32768
  fused = lambda hs, ws, ht, wt: L.fused_token_kl(hs, ws, ht, wt, lam=0.5, chunk_size=32)
  naive = lambda hs, ws, ht, wt: L.mixed_kl(hs @ ws, ht @ wt, lam=0.5)
  f_small, f_big = _temp_bytes(fused, 512), _temp_bytes(fused, 2048)
  assert f_big <= 1.25 * f_small, (f_small, f_big)
  # The constant part (an f32 [D_s, V] head-gradient accumulator and a few [chunk, V] temporaries, ~20 MiB)
  # is compared with one f32 [T, V] tensor at the larger size.
  assert f_big < 0.25 * 2048 * v * 4, f_big
  n_small, n_big = _temp_bytes(naive, 512), _temp_bytes(naive, 2048)
  assert n_big > 3 * n_small, (n_small, n_big)
  assert n_big > 10 * f_big
