"""models.attention: blockwise (flash) and splash (Pallas interpreter) against the xla reference, values
and gradients; decode over a partially filled cache; the model with each implementation; the config."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kldistill_jax import models
from kldistill_jax.errors import UserError
from kldistill_jax.models import attention, sharding
from kldistill_jax.train import defaults, setup

B, T, H, K, D = 3, 37, 6, 2, 8  # GQA 6:2; 37 is divided by neither block size below
# Row 0 full, row 1 left-padded by 5, row 2 a right-padded prompt then a completion (a hole of 4).
VALID = np.ones((B, T), bool)
VALID[1, :5] = False
VALID[2, 9:13] = False


def _qkv(t=T, s=T, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return draw(B, t, H, D), draw(B, K, s, D), draw(B, K, s, D)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def _loss(fn, weights):
  """A loss that ignores query rows with no valid key (their output is unspecified garbage)."""
  return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)


@pytest.mark.parametrize("blocks", [(8, 16), (5, 7), (64, 64)], ids=["8x16", "5x7", "one-block"])
def test_blockwise_matches_xla_values_and_gradients(blocks):
  q, k, v = _qkv()
  valid = jnp.asarray(VALID)
  weights = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H, D)), jnp.float32)
  weights = weights * valid[:, :, None, None]  # every query with a real token has a valid key (itself)
  reference = lambda q, k, v: attention.xla(q, k, v, valid, jnp.int32(0))
  ours = lambda q, k, v: attention.blockwise(q, k, v, valid, jnp.int32(0), block_q=blocks[0],
                                             block_k=blocks[1])
  keep = np.asarray(valid)[:, :, None, None]
  out_ref, out = jax.jit(reference)(q, k, v), jax.jit(ours)(q, k, v)
  assert _rel_err(np.where(keep, out, 0), np.where(keep, out_ref, 0)) <= 1e-5
  grads_ref = jax.jit(jax.grad(_loss(reference, weights), argnums=(0, 1, 2)))(q, k, v)
  grads = jax.jit(jax.grad(_loss(ours, weights), argnums=(0, 1, 2)))(q, k, v)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert _rel_err(g, g_ref) <= 1e-5, name
  # Control: the same comparison sees a wrong mask (no causality) by far more than the tolerance.
  leaky = attention.xla(q, k, v, valid, jnp.int32(T))
  assert _rel_err(np.where(keep, leaky, 0), np.where(keep, out_ref, 0)) > 1e-2


def test_blockwise_rows_without_keys_are_zero_with_zero_gradient():
  q, k, v = _qkv()
  valid = jnp.asarray(VALID)
  out = attention.blockwise(q, k, v, valid, jnp.int32(0), block_q=8, block_k=16)
  assert np.all(np.asarray(out[1, :5]) == 0)  # left padding: no valid key at or before these slots
  grad_q = jax.grad(lambda q: jnp.sum(attention.blockwise(q, k, v, valid, jnp.int32(0), block_q=8,
                                                          block_k=16)))(q)
  assert np.all(np.asarray(grad_q[1, :5]) == 0) and np.all(np.isfinite(np.asarray(grad_q)))


@pytest.mark.parametrize("t", [1, 5])
def test_decode_over_a_partially_filled_cache_matches_xla_and_reads_only_filled_blocks(t):
  """t new queries at slots [23, 23 + t) of a 50-slot cache. Slots past the queries hold stale values
  marked valid (the causal bound must hide them); key blocks past the last query are NaN: a kernel that
  reads them (or multiplies them by a zero probability) returns NaN."""
  s, index, bk = 50, 23, 8
  q, k, v = _qkv(t=t, s=s, seed=2)
  valid = jnp.asarray(VALID[:, :s] if s <= T else np.concatenate([VALID, np.ones((B, s - T), bool)], 1))
  reference = attention.xla(q, k, v, valid, jnp.int32(index))
  last_block_end = -(-(index + t) // bk) * bk
  k_nan, v_nan = k.at[:, :, last_block_end:].set(jnp.nan), v.at[:, :, last_block_end:].set(jnp.nan)
  decode = jax.jit(lambda q, k, v, index: attention.blockwise(q, k, v, valid, index, block_k=bk))
  out = decode(q, k_nan, v_nan, jnp.int32(index))
  assert _rel_err(out, reference) <= 1e-5
  # The same compiled step at another index: the trip count is dynamic, not baked in.
  out = decode(q, k, v, jnp.int32(index + 10))
  assert _rel_err(out, attention.xla(q, k, v, valid, jnp.int32(index + 10))) <= 1e-5
  # The model's stacked cache [layers, B, K, S, D], layer 1 read in place (the layer scan's decode): the
  # other layers are all NaN, so reading them, or copying the layer out whole, cannot go unnoticed.
  stack = lambda x: jnp.stack([jnp.full_like(x, jnp.nan), x, jnp.full_like(x, jnp.nan)])
  stacked = jax.jit(lambda q, k, v, index, layer: attention.blockwise(q, k, v, valid, index, block_k=bk,
                                                                      layer=layer))
  assert _rel_err(stacked(q, stack(k_nan), stack(v_nan), jnp.int32(index), jnp.int32(1)), reference) <= 1e-5


def test_splash_in_the_pallas_interpreter_matches_xla():
  """The TPU kernel itself (not a reimplementation), run by the Pallas interpreter on CPU; head_dim 128
  and T padded to its 128 block, as on a TPU."""
  rng = np.random.default_rng(3)
  b, t, h, kv, d = 3, 36, 4, 2, 128
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
             for shape in ((b, t, h, d), (b, kv, t, d), (b, kv, t, d)))
  valid = jnp.asarray(VALID[:b, :t])
  keep = np.asarray(valid)[:, :, None, None]
  weights = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) * keep
  reference = lambda q, k, v: attention.xla(q, k, v, valid, jnp.int32(0))
  ours = lambda q, k, v: attention.splash(q, k, v, valid, interpret=True)
  assert _rel_err(np.where(keep, ours(q, k, v), 0), np.where(keep, reference(q, k, v), 0)) <= 1e-5
  grads = jax.grad(_loss(ours, weights), argnums=(0, 1, 2))(q, k, v)
  grads_ref = jax.grad(_loss(reference, weights), argnums=(0, 1, 2))(q, k, v)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert _rel_err(g, g_ref) <= 1e-5, name


# ------------------------------------------------------------------------------------------- the model

CONFIG = models.qwen3(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=6,
                      num_kv_heads=2, head_dim=8)
LENGTH = 13
MASK = np.ones((2, LENGTH), np.int32)
MASK[0, :4] = 0  # left padding


@pytest.fixture
def small_blocks(monkeypatch):
  """Blocks of 3 queries x 4 keys, so the tiny model's 13 tokens span several (partial) blocks."""
  monkeypatch.setattr(attention, "BLOCK_Q", 3)
  monkeypatch.setattr(attention, "BLOCK_K", 4)


def _model(implementation):
  return models.Transformer(CONFIG.replace(attention=implementation), rngs=nnx.Rngs(0))


def _inputs():
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 61, MASK.shape), jnp.int32)
  positions = jnp.asarray(np.maximum(np.cumsum(MASK, 1) - 1, 0) * MASK)
  return tokens, positions, jnp.asarray(MASK)


@nnx.jit
def _forward(model, tokens, positions, mask):
  return model(tokens, positions, attention_mask=mask)[0]


@nnx.jit
def _cached(model, tokens, positions, cache, mask):
  return model(tokens, positions, cache, mask)


@pytest.mark.parametrize("implementation", ["blockwise", "splash"])
def test_model_forward_and_gradients_match_xla(small_blocks, implementation):
  tokens, positions, mask = _inputs()
  real = np.asarray(mask, bool)

  def loss(model):
    logits = model(tokens, positions, attention_mask=mask)[0]
    return jnp.sum(jnp.where(mask[..., None] > 0, jax.nn.log_softmax(logits), 0.0)[..., :7])

  results = []
  for name in ("xla", implementation):
    model = _model(name)
    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    results.append((np.asarray(_forward(model, tokens, positions, mask)), float(value),
                    jax.tree.leaves(nnx.to_pure_dict(grads))))
  (logits_ref, value_ref, grads_ref), (logits, value, grads) = results
  assert _rel_err(logits[real], logits_ref[real]) <= 1e-5
  assert value == pytest.approx(value_ref, rel=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    assert _rel_err(g, g_ref) <= 1e-4


def test_model_cached_decoding_equals_full_forward_with_blockwise(small_blocks):
  """Prefill 5 (4 of row 0 padding), then one token at a time into a 16-slot cache (last block clamped)."""
  tokens, positions, mask = _inputs()
  model = _model("blockwise")
  full = np.asarray(_forward(_model("xla"), tokens, positions, mask))
  cache = models.init_cache(CONFIG, 2, 16)
  pieces, start = [], 0
  for size in (5,) + (1,) * (LENGTH - 5):
    piece = slice(start, start + size)
    logits, cache = _cached(model, tokens[:, piece], positions[:, piece], cache, mask[:, piece])
    pieces.append(np.asarray(logits))
    start += size
  real = np.asarray(mask, bool)
  assert _rel_err(np.concatenate(pieces, 1)[real], full[real]) <= 1e-5


# ------------------------------------------------------------------------------------------ the config

def test_attention_is_a_model_config_field_settable_per_model_in_a_run_config():
  with pytest.raises(UserError, match="attention must be one of"):
    CONFIG.replace(attention="flash")
  config = defaults.base_config()
  assert config.student.attention == config.teacher.attention == "auto"
  config.student.attention = "blockwise"  # what --config.student.attention=blockwise sets
  config.student.model = ml_collections.ConfigDict(dict(hidden_size=32, intermediate_size=48, num_layers=1,
                                                        num_heads=4, num_kv_heads=2, head_dim=8))
  assert setup.inline_model_config(config.student, 61, "student").attention == "blockwise"
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model = setup.load_model(config.student, "student", 61, mesh, seed=0)
  assert model.layers.self_attn.implementation == "blockwise"
