"""The decoder against an independent float64 NumPy forward pass, plus causality, padding, the KV cache,
remat, mixed precision, parameter counts, config validation and sharding on a simulated 8-device mesh."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from kldistill_jax import models
from kldistill_jax.errors import UserError
from kldistill_jax.models import sharding
from kldistill_jax.train import defaults, setup

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, head_dim=8)
# Scaling chosen so that all three Llama 3 bands occur for head_dim 8 / theta 10_000 (wavelengths 6.3, 63,
# 628, 6283 against the band edges 32 and 128) and the scaled frequencies matter at small positions.
LLAMA_SCALING = models.Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=128)
CONFIGS = {
    # Qwen3's head_dim is explicit: heads * head_dim = 48 != hidden_size here.
    "qwen3": models.qwen3(num_kv_heads=2, tie_word_embeddings=True, **{**TINY, "head_dim": 12}),
    "qwen2": models.qwen2(num_kv_heads=1, **TINY),
    "llama": models.llama(num_kv_heads=2, rope_theta=10_000.0, rope_scaling=LLAMA_SCALING, **TINY),
}


def build(config, seed=0):
  """A model whose norm scales and biases are random too (init sets them to 1 / 0, hiding mistakes)."""
  model = models.Transformer(config, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 100)
  norms = [model.norm]
  layers = model.layers  # one Block, every variable stacked [num_layers, ...]: one draw covers all layers
  norms += [layers.input_layernorm, layers.post_attention_layernorm]
  attn = layers.self_attn
  if attn.q_norm is not None:
    norms += [attn.q_norm, attn.k_norm]
  for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
    if proj.bias is not None:
      proj.bias[...] = jnp.asarray(0.5 * rng.standard_normal(proj.bias.shape), jnp.float32)
  for norm in norms:
    norm.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(norm.scale.shape), jnp.float32)
  return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request):
  return request.param, CONFIGS[request.param], build(CONFIGS[request.param])


def _np(x):
  return np.asarray(x, np.float64)


@nnx.jit(static_argnames="return_hidden")
def forward(model, tokens, positions, mask=None, return_hidden=False):
  return model(tokens, positions, attention_mask=mask, return_hidden=return_hidden)[0]


def run(model, tokens, positions, mask=None, return_hidden=False):
  """Jitted forward on NumPy inputs -> NumPy output (one compile per config, shape and mask presence)."""
  as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  return np.asarray(forward(model, as_int(tokens), as_int(positions), as_int(mask), return_hidden))


# ----------------------------------------------------------------------------- NumPy reference forward

def ref_inverse_frequencies(config):
  d, theta, s = config.head_dim, config.rope_theta, config.rope_scaling
  out = []
  for i in range(d // 2):
    f = theta ** (-(2.0 * i) / d)
    if s is not None:
      wavelength = 2 * math.pi / f
      if wavelength < s.original_max_position_embeddings / s.high_freq_factor:
        pass  # high frequency: unchanged
      elif wavelength > s.original_max_position_embeddings / s.low_freq_factor:
        f = f / s.factor
      else:
        smooth = ((s.original_max_position_embeddings / wavelength - s.low_freq_factor)
                  / (s.high_freq_factor - s.low_freq_factor))
        f = (1 - smooth) * f / s.factor + smooth * f
    out.append(f)
  return np.array(out)


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x_THD, positions_T, inv_freq):
  half = x_THD.shape[-1] // 2
  angles = positions_T[:, None, None] * inv_freq[None, None, :]  # [T, 1, D/2]
  cos, sin = np.cos(angles), np.sin(angles)
  x1, x2 = x_THD[..., :half], x_THD[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _dense(x, proj):
  y = x @ _np(proj.kernel[...])
  return y if proj.bias is None else y + _np(proj.bias[...])


def ref_forward(model, tokens, positions, mask=None, inv_freq=None):
  """float64 logits [B, T, V]; query j attends to keys i <= j with mask[i] = 1 (one row at a time)."""
  c = model.config
  inv_freq = ref_inverse_frequencies(c) if inv_freq is None else inv_freq
  tokens, positions = np.asarray(tokens), _np(positions)
  mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask).astype(bool)
  groups = c.num_heads // c.num_kv_heads
  embed = _np(model.embed_tokens[...])
  head = embed.T if c.tie_word_embeddings else _np(model.lm_head.kernel[...])
  out = []
  for b in range(tokens.shape[0]):
    t = tokens.shape[1]
    x = embed[tokens[b]]
    for layer in map(model.block, range(c.num_layers)):
      a = layer.self_attn
      h = _rms(x, _np(layer.input_layernorm.scale[...]), c.rms_norm_eps)
      q = _dense(h, a.q_proj).reshape(t, c.num_heads, c.head_dim)
      k = _dense(h, a.k_proj).reshape(t, c.num_kv_heads, c.head_dim)
      v = _dense(h, a.v_proj).reshape(t, c.num_kv_heads, c.head_dim)
      if c.qk_norm:
        q = _rms(q, _np(a.q_norm.scale[...]), c.rms_norm_eps)
        k = _rms(k, _np(a.k_norm.scale[...]), c.rms_norm_eps)
      q, k = _rope(q, positions[b], inv_freq), _rope(k, positions[b], inv_freq)
      heads = np.zeros((t, c.num_heads, c.head_dim))
      for hh in range(c.num_heads):
        kv = hh // groups
        for j in range(t):
          keys = [i for i in range(j + 1) if mask[b, i]]
          if not keys:
            continue
          s = np.array([q[j, hh] @ k[i, kv] for i in keys]) / math.sqrt(c.head_dim)
          p = np.exp(s - s.max())
          p /= p.sum()
          heads[j, hh] = sum(pi * v[i, kv] for pi, i in zip(p, keys))
      x = x + _dense(heads.reshape(t, -1), a.o_proj)
      h = _rms(x, _np(layer.post_attention_layernorm.scale[...]), c.rms_norm_eps)
      gate = _dense(h, layer.mlp.gate_proj)
      x = x + _dense(gate / (1 + np.exp(-gate)) * _dense(h, layer.mlp.up_proj), layer.mlp.down_proj)
    out.append(_rms(x, _np(model.norm.scale[...]), c.rms_norm_eps) @ head)
  return np.stack(out)


def _tokens(shape, seed=0, vocab=61):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _padded_positions(mask):
  mask = np.asarray(mask)
  return np.maximum(np.cumsum(mask, 1) - 1, 0) * mask


B, T = 2, 8
POSITIONS = np.arange(T)[None].repeat(B, 0)
# Row 0 is left-padded by 3 (the padding holds arbitrary tokens), row 1 is full.
MASK = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1] * T])


def test_reference_inverse_frequencies_cover_all_llama3_bands():
  """The test's scaling really exercises the kept, interpolated and slowed bands, and matches rope.py."""
  c = CONFIGS["llama"]
  ratio = ref_inverse_frequencies(c.replace(rope_scaling=None)) / ref_inverse_frequencies(c)
  assert ratio[0] == 1.0 and 1.5 < ratio[1] < 7.5 and np.allclose(ratio[2:], 8.0)


def test_forward_matches_numpy_reference(family):
  _, config, model = family
  tokens = _tokens((B, T), seed=1)
  positions = POSITIONS + np.array([[0], [37]])  # an offset row makes RoPE angles large
  logits = forward(model, jnp.asarray(tokens), jnp.asarray(positions))
  assert logits.dtype == jnp.float32 and logits.shape == (B, T, 61)
  logits = np.asarray(logits)
  expected = ref_forward(model, tokens, positions)
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
  assert np.abs(expected).max() > 0.2  # the comparison is not between near-zero numbers
  if config.rope_scaling is not None:  # negative control: the same reference without Llama 3 scaling
    unscaled = ref_inverse_frequencies(config.replace(rope_scaling=None))
    wrong = ref_forward(model, tokens, positions, inv_freq=unscaled)
    assert np.abs(wrong - logits).max() > 1e-2


@pytest.mark.parametrize("attention", ["auto", "xla"])  # auto = blockwise on CPU
def test_forward_with_padding_mask_matches_numpy_reference(family, attention):
  _, config, model = family
  model = model if attention == "auto" else build(config.replace(attention=attention))
  tokens = _tokens((B, T), seed=2)
  positions = _padded_positions(MASK)
  logits = run(model, tokens, positions, MASK)
  expected = ref_forward(model, tokens, positions, MASK)
  real = MASK.astype(bool)
  np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=0)
  assert np.all(np.isfinite(logits))  # fully masked padding queries stay finite


def test_causality(family):
  _, _, model = family
  tokens = _tokens((B, T), seed=3)
  base = run(model, tokens, POSITIONS)
  for t in (0, 3, 7):
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 1) % 61
    logits = run(model, changed, POSITIONS)
    np.testing.assert_allclose(logits[:, :t], base[:, :t], atol=1e-6, rtol=0)
    assert np.abs(logits[:, t:] - base[:, t:]).max(axis=-1).min() > 1e-4  # every later position changes


def test_left_padding_equals_unpadded_row(family):
  _, _, model = family
  tokens = _tokens((B, T), seed=4)
  logits = run(model, tokens, _padded_positions(MASK), MASK)
  # Row 0 alone: its 5 real tokens at positions 0..4, unmasked (the filler after them is invisible to
  # them by causality, so this is the unpadded row; it keeps one compiled shape for the whole module).
  alone = tokens.copy()
  alone[0] = np.concatenate([tokens[0, 3:], _tokens(3, seed=11)])
  alone = run(model, alone, POSITIONS)
  np.testing.assert_allclose(logits[0, 3:], alone[0, :5], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[1], alone[1], atol=1e-5, rtol=0)
  # Negative control: without the mask the padding leaks into the real positions. (Positions shifted by a
  # constant would NOT be a control: RoPE attention only sees relative positions.)
  leaky = run(model, tokens, _padded_positions(MASK))
  assert np.abs(leaky[0, 3:] - alone[0, :5]).max() > 1e-3


@nnx.jit
def _cached_step(model, tokens, positions, cache, mask):
  return model(tokens, positions, cache, mask)


# Prefill chunks of 4 then single tokens; the first chunk of 4 in "prefill4+4" holds 3 pads of row 0.
@pytest.mark.parametrize("chunks", [(1,) * 8, (4, 1, 1, 1, 1), (4, 4)],
                         ids=["one-by-one", "prefill4", "prefill4+4"])
def test_cached_decoding_equals_full_forward(family, chunks):
  """A left-padded and a full row; the cache has spare slots at the end."""
  _, config, model = family
  tokens = _tokens((B, T), seed=6)
  positions = _padded_positions(MASK)
  full = run(model, tokens, positions, MASK)
  cache = models.init_cache(config, B, T + 3)
  pieces, start = [], 0
  for size in chunks:
    sl = slice(start, start + size)
    logits, cache = _cached_step(model, jnp.asarray(tokens[:, sl]), jnp.asarray(positions[:, sl]), cache,
                                 jnp.asarray(MASK[:, sl]))
    pieces.append(np.asarray(logits))
    start += size
  assert start == T and int(cache.index) == T
  np.testing.assert_array_equal(np.asarray(cache.valid), np.concatenate([MASK, np.zeros((B, 3))], 1) > 0)
  cached = np.concatenate(pieces, 1)
  real = MASK.astype(bool)
  np.testing.assert_allclose(cached[real], full[real], atol=1e-5, rtol=0)


def test_return_hidden_times_output_head_is_logits(family):
  _, config, model = family
  tokens = _tokens((B, T), seed=7)
  logits = run(model, tokens, POSITIONS)
  hidden = run(model, tokens, POSITIONS, return_hidden=True)
  assert hidden.shape == (B, T, config.hidden_size)
  np.testing.assert_allclose(_np(hidden) @ _np(model.output_head()), logits, atol=1e-5, rtol=0)
  if config.tie_word_embeddings:
    assert model.lm_head is None
    np.testing.assert_array_equal(np.asarray(model.output_head()), np.asarray(model.embed_tokens[...]).T)
  else:
    np.testing.assert_array_equal(np.asarray(model.output_head()), np.asarray(model.lm_head.kernel[...]))


def _loss(model, tokens):
  logits, _ = model(tokens[:, :-1], jnp.arange(tokens.shape[1] - 1)[None])
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


_value_and_grad = nnx.jit(nnx.value_and_grad(_loss))


def test_remat_gives_identical_loss_and_gradients():
  config = CONFIGS["qwen3"]
  tokens = jnp.asarray(_tokens((B, T), seed=8))
  results = []
  for remat in ("none", "block", "save_dots"):
    model = build(config.replace(remat=remat), seed=1)
    loss, grads = _value_and_grad(model, tokens)
    results.append((float(loss), jax.tree.leaves(nnx.to_pure_dict(grads))))
  (loss0, g0) = results[0]
  for loss1, g1 in results[1:]:
    assert loss0 == pytest.approx(loss1, abs=1e-6)
    assert len(g0) == len(g1) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    for a, b in zip(g0, g1):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
  assert min(float(jnp.abs(g).max()) for g in g0) > 1e-4  # every parameter gets a gradient


def test_layers_are_scanned_so_the_program_does_not_grow_with_depth():
  """One block in the lowered value+grad whatever the depth (compile time: bench/compile_time.py); the
  recomputation the remat policies add is checked against XLA's FLOP count in tests/test_flops.py."""
  def dots(num_layers):
    config = CONFIGS["qwen3"].replace(num_layers=num_layers)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: models.Transformer(config, rngs=nnx.Rngs(0))))
    loss = lambda state, tokens: jnp.sum(nnx.merge(graphdef, state)(tokens, jnp.arange(T)[None])[0])
    lowered = jax.jit(jax.grad(loss)).lower(state, jax.ShapeDtypeStruct((1, T), jnp.int32))
    return lowered.as_text().count("dot_general")
  assert dots(1) == dots(7) > 0


def test_bfloat16_compute_with_float32_params():
  config = CONFIGS["qwen2"]
  f32 = build(config)
  tokens = _tokens((B, T), seed=9)
  bf16 = build(config.replace(compute_dtype="bfloat16"))
  assert bf16.layers.mlp.up_proj.kernel[...].dtype == jnp.float32
  ref_logits = run(f32, tokens, POSITIONS)
  logits = forward(bf16, jnp.asarray(tokens), jnp.asarray(POSITIONS))
  assert logits.dtype == jnp.float32
  logits = np.asarray(logits)
  assert np.all(np.isfinite(logits))
  assert 0.3 < np.abs(ref_logits).mean() < 3  # the tolerance below is relative to logits of scale ~1
  error = np.abs(logits - ref_logits)
  assert error.mean() < 0.03 and error.max() < 0.25, (error.mean(), error.max())  # ~8 bits of mantissa
  assert not np.array_equal(logits, ref_logits)  # bf16 really was used
  assert models.init_cache(bf16.config, B, T).k.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tied", [True, False])
def test_num_params_counts_param_leaves(name, tied):
  config = CONFIGS[name].replace(tie_word_embeddings=tied)
  model = nnx.eval_shape(lambda: models.Transformer(config, rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert config.num_params() == count


def test_num_params_of_qwen3_0p6b():
  # Qwen3-0.6B has 596,049,920 parameters (tied embeddings), the count Hugging Face reports.
  assert models.config.QWEN3_0P6B.num_params() == 596_049_920


def test_config_validation():
  with pytest.raises(ValueError, match="multiple"):
    models.qwen3(num_kv_heads=3, **TINY)
  with pytest.raises(ValueError, match="family"):
    models.ModelConfig(family="gpt2", num_kv_heads=2, **TINY)
  with pytest.raises(TypeError):
    models.qwen3(num_kv_heads=2, compute_dtype="float33", **TINY)
  with pytest.raises(TypeError):
    models.qwen3(num_kv_heads=2, param_dtype="bfloat", **TINY)
  with pytest.raises(ValueError, match="vocab_size"):
    models.qwen3(num_kv_heads=2, **{**TINY, "vocab_size": 0})
  assert models.qwen3(num_kv_heads=2, **TINY).family == "qwen3"
  with pytest.raises(ValueError, match="remat must be one of"):
    models.qwen3(num_kv_heads=2, remat="all", **TINY)
  # The boolean of earlier configs: True is "block", False "none".
  assert [models.qwen3(num_kv_heads=2, remat=r, **TINY).remat for r in (True, False)] == ["block", "none"]
  section = defaults.base_config().student
  section.remat = "all"  # --config.student.remat=all: refused before any model is built, the field named
  with pytest.raises(UserError, match=r"student\.remat must be one of none, block, save_dots, got 'all'"):
    setup.load_model(section, "student", 61, None, seed=0)


# ----------------------------------------------------------------------------- sharding

@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(2, 2, 2)


def test_make_mesh(mesh):
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh(2, 2, 1)
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh(1, 1, 1)
  assert sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]).devices.size == 1


def test_spec_for_replicates_indivisible_dims(mesh):
  assert sharding.spec_for((32, 48), ("embed", "mlp"), mesh) == P("fsdp", "tensor")
  assert sharding.spec_for((61, 32), ("vocab", "embed"), mesh) == P(None, "fsdp")  # 61 % 2 != 0
  assert sharding.spec_for((33, 48), ("embed", "mlp"), mesh) == P(None, "tensor")
  assert sharding.spec_for((32,), ("norm",), mesh) == P(None)
  assert sharding.spec_for((4,), None, mesh) == P()


def test_shard_model_places_parameters(mesh):
  config = CONFIGS["qwen2"]  # one kv head: k/v kernels [32, 8] shard 8 over tensor
  model = sharding.shard_model(build(config), mesh)
  mlp = model.layers.mlp  # stacked [2 layers, ...]: the layer axis is replicated
  for kernel, spec, shard in [(mlp.gate_proj.kernel, P(None, "fsdp", "tensor"), (2, 16, 24)),
                              (mlp.down_proj.kernel, P(None, "tensor", "fsdp"), (2, 24, 16)),
                              (model.embed_tokens, P(None, "fsdp"), (61, 16)),
                              (model.lm_head.kernel, P("fsdp", None), (16, 61)),
                              (model.layers.self_attn.q_proj.bias, P(None, "tensor"), (2, 16)),
                              (model.norm.scale, P(None), (32,))]:
    value = kernel[...]
    assert value.sharding.spec == spec
    assert value.addressable_shards[0].data.shape == shard
    assert len(value.sharding.device_set) == 8


def test_sharded_forward_equals_single_device(mesh, family):
  _, config, single = family
  sharded = sharding.shard_model(build(config), mesh)
  tokens = _tokens((4, T), seed=10)
  mask = np.concatenate([MASK, MASK[::-1]], 0)
  positions = _padded_positions(mask)
  put = lambda x: jax.device_put(jnp.asarray(x, jnp.int32), sharding.batch_sharding(mesh))
  logits = forward(sharded, put(tokens), put(positions), put(mask))
  assert len(logits.sharding.device_set) == 8
  expected = run(single, tokens, positions, mask)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)
