"""Decoder-only transformer (Qwen3 / Qwen2 / Llama 3) in Flax NNX with an explicit KV cache.

    logits, cache = model(tokens, positions, cache=None, attention_mask=None)

tokens, positions, attention_mask: [B, T]. Without a cache, token t attends to tokens <= t that the mask
keeps. With a cache, the T tokens are written at slots [cache.index, cache.index + T) and attend to every
valid slot up to their own. Parameters are stored as `[in, out]` kernels and carry logical axis names
(`logical_axes` metadata) that `models.sharding` maps onto a ('data', 'fsdp', 'tensor') mesh.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from kldistill_jax.models import attention, rope, sharding
from kldistill_jax.models.cache import KVCache, init_cache

def _param(rngs, shape, dtype, axes, scale=None):
  scale = 1.0 / jnp.sqrt(shape[0]) if scale is None else scale
  return nnx.Param(scale * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


class Dense(nnx.Module):
  """x @ kernel (+ bias) (+ lora(x), a low-rank adapter that `models.lora.add` sets); kernel [in, out]."""

  def __init__(self, d_in, d_out, axes, *, bias=False, dtype, rngs):
    self.kernel = _param(rngs, (d_in, d_out), dtype, axes)
    self.bias = nnx.Param(jnp.zeros((d_out,), dtype), logical_axes=axes[1:]) if bias else None
    self.lora = nnx.data(None)  # data, not static: models/lora.py may put an adapter here

  def __call__(self, x):
    y = jnp.dot(x, self.kernel[...].astype(x.dtype))
    if self.lora is not None:  # base + adapter, never merged into the kernel while training or sampling
      y = y + self.lora(x)
    return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, dim, eps, *, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)  # HF's order: cast, then scale


class Attention(nnx.Module):

  def __init__(self, config, *, rngs):
    c, dtype = config, config.param_jnp_dtype
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.q_proj = Dense(c.hidden_size, c.num_heads * c.head_dim, ("embed", "heads"), bias=c.qkv_bias,
                        dtype=dtype, rngs=rngs)
    self.k_proj = Dense(c.hidden_size, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"),
                        bias=c.qkv_bias, dtype=dtype, rngs=rngs)
    self.v_proj = Dense(c.hidden_size, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"),
                        bias=c.qkv_bias, dtype=dtype, rngs=rngs)
    self.o_proj = Dense(c.num_heads * c.head_dim, c.hidden_size, ("heads", "embed"), dtype=dtype, rngs=rngs)
    self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype) if c.qk_norm else None
    self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype) if c.qk_norm else None
    self.inv_freq = nnx.Variable(rope.inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling))
    self.implementation = c.attention

  def __call__(self, x_BTD, positions_BT, key_valid_BS, layer_cache):
    """(output [B, T, D], the updated stacked (k, v) cache or None). layer_cache: None, or (k, v) of
    every layer [layers, B, kv_heads, S, head_dim], this layer's index and the slot to write at."""
    b, t, _ = x_BTD.shape
    q = self.q_proj(x_BTD).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x_BTD).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x_BTD).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = jnp.asarray(self.inv_freq[...])
    q, k = rope.apply(q, positions_BT, inv_freq), rope.apply(k, positions_BT, inv_freq)
    # Attention runs in the cache's [B, kv_heads, slots, head_dim] layout.
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if layer_cache is None:
      out = attention.attend(q, k, v, key_valid_BS, 0, implementation=self.implementation)
      return self.o_proj(out.reshape(b, t, -1)), None
    # Write this step's keys/values into this layer's slots of the stacked cache, in place, and attend
    # over the filled slots straight from the stack (slicing the layer out first would copy all S slots).
    cache_k, cache_v, layer, offset = layer_cache
    write = lambda cache, new: jax.lax.dynamic_update_slice(cache, new[None].astype(cache.dtype),
                                                            (layer, 0, 0, offset, 0))
    cache_k, cache_v = write(cache_k, k), write(cache_v, v)
    out = attention.attend(q, cache_k, cache_v, key_valid_BS, offset, layer=layer,
                           implementation=self.implementation)
    return self.o_proj(out.reshape(b, t, -1)), (cache_k, cache_v)


class MLP(nnx.Module):

  def __init__(self, config, *, rngs):
    c, dtype = config, config.param_jnp_dtype
    self.gate_proj = Dense(c.hidden_size, c.intermediate_size, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.up_proj = Dense(c.hidden_size, c.intermediate_size, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.down_proj = Dense(c.intermediate_size, c.hidden_size, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):

  def __init__(self, config, *, rngs):
    dtype = config.param_jnp_dtype
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, key_valid, layer_cache):
    attn, kv = self.self_attn(self.input_layernorm(x), positions, key_valid, layer_cache)
    x = x + attn
    return x + self.mlp(self.post_attention_layernorm(x)), kv


# ModelConfig.remat -> what the backward pass keeps of each block's forward (jax.checkpoint policies).
# "block": only the block's input (everything else recomputed); "save_dots": also the outputs of the
# matmuls without batch dimensions, i.e. the q/k/v/o and MLP projections (attention, norms, RoPE and
# activations recomputed: the projections' FLOPs are not paid twice, the L x L attention is never kept).
REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# Layers per scan iteration (`lax.scan`'s unroll), read at trace time. 1 keeps one block in the program
# whatever the depth (compile time flat in depth); tests/test_flops.py unrolls fully so that XLA's cost
# analysis, which counts a loop body once, sees every layer.
SCAN_UNROLL = 1


def stacked_blocks(config, rngs) -> Block:
  """One `Block` whose every variable has a leading [num_layers] axis (logical axis "layers"). The
  layers are built one after another from `rngs` and their states stacked, so whatever variables a block
  holds are stacked, and a seed draws the same parameters as it did for a list of blocks."""
  blocks = [nnx.split(Block(config, rngs=rngs)) for _ in range(config.num_layers)]
  graphdef = blocks[0][0]

  def stack(*variables):
    axes = variables[0].get_metadata().get("logical_axes")
    metadata = {} if axes is None else {"logical_axes": ("layers", *axes)}
    return variables[0].replace(jnp.stack([v[...] for v in variables]), **metadata)

  is_variable = lambda x: isinstance(x, nnx.Variable)
  return nnx.merge(graphdef, jax.tree.map(stack, *[state for _, state in blocks], is_leaf=is_variable))


def run_layers(layers, x, positions, key_valid, kv=None, index=None, *, remat="none"):
  """x through every layer of the stacked `layers`: one `lax.scan` over the split state, so the program
  holds one block whatever the depth. kv: the stacked (k, v) cache, carried through the scan and written
  in place (None without a cache). A pure function of the state, not `nnx.scan`/`nnx.remat`: those fail on
  a module merged inside an outer plain-JAX trace (the train step, the sampler's while_loop).
  Returns (x, the updated kv)."""
  graphdef, state = nnx.split(layers)

  def layer(carry, layer_state_and_index):
    x, kv = carry
    layer_state, i = layer_state_and_index
    layer_cache = None if kv is None else (*kv, i, index)
    x, kv = nnx.merge(graphdef, layer_state)(x, positions, key_valid, layer_cache)
    return (sharding.constrain(x, ("batch", None, None)), kv), None

  if remat != "none":
    layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=False)  # scan: no CSE risk
  num_layers = jax.tree.leaves(state)[0].shape[0]
  (x, kv), _ = jax.lax.scan(layer, (x, kv), (state, jnp.arange(num_layers)), unroll=SCAN_UNROLL)
  return x, kv


class Transformer(nnx.Module):
  """The decoder. `output_head()` is the [D, V] matrix the logits come from (for the fused losses)."""

  def __init__(self, config, *, rngs):
    dtype = config.param_jnp_dtype
    self.config = config
    # Small embeddings (std 0.02, as Hugging Face initialises them): tied to the output head, N(0, 1)
    # entries would make a fresh model's logits std ~sqrt(hidden_size), i.e. near one-hot.
    self.embed_tokens = _param(rngs, (config.vocab_size, config.hidden_size), dtype, ("vocab", "embed"),
                               scale=0.02)
    self.layers = stacked_blocks(config, rngs)  # every block variable stacked: [num_layers, ...]
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.lm_head = (None if config.tie_word_embeddings else
                    Dense(config.hidden_size, config.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs))

  def init_cache(self, batch_size, max_len, dtype=None) -> KVCache:
    """An empty cache for `max_len` slots (default dtype: the compute dtype)."""
    return init_cache(self.config, batch_size, max_len, dtype)

  def block(self, i) -> Block:
    """Layer i as a Block of its own (copies of its slices of the stacked variables): for reading."""
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

  def output_head(self):
    """[D, V]: the transposed embedding when tied, else the LM head kernel."""
    return self.embed_tokens[...].T if self.lm_head is None else self.lm_head.kernel[...]

  def __call__(self, tokens, positions, cache: KVCache | None = None, attention_mask=None, *,
               return_hidden=False):
    """Returns (float32 logits [B, T, V], or final hidden states [B, T, D] with return_hidden, new cache)."""
    b, t = tokens.shape
    compute = self.config.compute_jnp_dtype
    token_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    # Which key slots hold real tokens; causality (slot order) is applied inside attention.
    if cache is None:
      key_valid = token_mask
    else:
      key_valid = valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_mask, cache.index, axis=1)
    x = sharding.constrain(self.embed_tokens[...].astype(compute)[tokens], ("batch", None, None))
    kv = None if cache is None else (cache.k, cache.v)
    x, kv = run_layers(self.layers, x, positions, key_valid, kv, None if cache is None else cache.index,
                       remat=self.config.remat)
    hidden = self.norm(x)
    if cache is not None:
      cache = KVCache(k=kv[0], v=kv[1], valid=valid, index=cache.index + t)
    if return_hidden:
      return hidden, cache
    logits = jnp.dot(hidden, self.output_head().astype(compute), preferred_element_type=jnp.float32)
    return sharding.constrain(logits, ("batch", None, "vocab")), cache
