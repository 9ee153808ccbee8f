"""The KV cache as an explicit value: the model takes one and returns the updated one."""

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer for S slots, written left to right in lockstep across the batch.

  k, v:  [layers, B, kv_heads, S, head_dim]: every layer stacked, as the layers' parameters are (the
         model's layer scan carries them and writes each step's slots in place); per layer the layout
         attention reads without a transpose
  valid: [B, S] bool, True where a slot holds a real (non-padding) token
  index: [] int32, the next slot to write
  A query written at slot i attends to the valid slots j <= i (causality is slot order; RoPE uses the
  explicit positions passed to the model, so left-padded rows can start at position 0).
  """
  k: tuple
  v: tuple
  valid: jax.Array
  index: jax.Array

  @property
  def max_len(self):
    return self.valid.shape[1]


def init_cache(config, batch_size, max_len, dtype=None):
  """An empty cache for `max_len` slots (prompt + generated tokens) in `dtype` (default: compute)."""
  dtype = config.compute_jnp_dtype if dtype is None else jnp.dtype(dtype)
  shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 valid=jnp.zeros((batch_size, max_len), bool), index=jnp.zeros((), jnp.int32))
