"""Position chunking and masked reductions shared by every full-vocabulary loss.

`scan_position_chunks` is what keeps peak memory at O(chunk_size * V): it walks the flattened positions in
chunks with `lax.scan`, reading each chunk with a dynamic slice of the ORIGINAL arrays (no padded copy), and
rematerialises the chunk body in the backward pass, so no [N, V] intermediate is ever stored.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def scan_position_chunks(fn, xs, chunk_size, init=None):
  """Scans `fn(carry, fresh_C, *chunks) -> (carry, pytree of [C, ...])` over chunks of positions.

  Args:
    fn: pure function; positions are independent apart from what it accumulates in `carry`.
      `fresh_C` (bool [C]) is False for positions an earlier chunk already covered (only the last
      chunk has any), so accumulations must ignore those; per-position outputs there are dropped.
    xs: tuple of arrays sharing the leading (position) dimension N.
    chunk_size: positions per chunk, or None for a single call on everything.
    init: the initial carry.

  Returns:
    (final carry, the per-position pytree with leading dimension N).
  """
  n = xs[0].shape[0]
  if chunk_size is None or chunk_size >= n:
    return fn(init, jnp.ones((n,), bool), *xs)
  c = chunk_size
  num_chunks = math.ceil(n / c)

  # The last chunk is shifted back to end exactly at N (its start is clamped), so chunks never read past
  # the end or need a padded copy of the inputs; its overlap with the previous chunk is not fresh.
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(carry, i):
    start = jnp.minimum(i * c, n - c)
    chunk = tuple(lax.dynamic_slice_in_dim(x, start, c) for x in xs)
    fresh = start + jnp.arange(c) >= i * c
    return fn(carry, fresh, *chunk)

  carry, ys = lax.scan(body, init, jnp.arange(num_chunks))
  tail = n - (num_chunks - 1) * c  # positions of the last chunk not covered before

  def assemble(y):
    head = y[:-1].reshape((-1,) + y.shape[2:])
    return jnp.concatenate([head, y[-1, c - tail:]], axis=0)

  return carry, jax.tree.map(assemble, ys)


def map_position_chunks(fn, xs, chunk_size):
  """Applies `fn(*chunks) -> pytree of [C, ...]` chunk by chunk; returns what `fn(*xs)` would."""
  _, ys = scan_position_chunks(lambda carry, fresh, *chunk: (carry, fn(*chunk)), xs, chunk_size)
  return ys


def flatten_positions(*arrays):
  """[..., V] arrays -> [N, V] (None passes through)."""
  return tuple(None if a is None else a.reshape((-1,) + a.shape[-1:]) for a in arrays)


def mask_weights(mask, positions_shape):
  """The mask as float32 weights (all ones when None)."""
  if mask is None:
    return jnp.ones(positions_shape, jnp.float32)
  return mask.astype(jnp.float32)


def reduce_positions(values, mask, reduction, num_tokens=None):
  """Masked reduction of per-position values.

  "mean" divides the masked sum by `num_tokens` if given (pass the global count when accumulating
  gradients over micro-batches), else by the number (total weight) of unmasked positions in the whole
  array, so the result is the global token mean under any sharding. An all-masked input gives 0.
  "none" returns the values with masked positions set to 0 (and scaled by fractional mask weights).
  """
  weights = mask_weights(mask, values.shape)
  # `where` (not a product) so that NaN/inf at masked positions, e.g. fully -inf padding logits, vanish.
  weighted = jnp.where(weights != 0, values * weights, 0.0)
  if reduction == "none":
    return weighted
  total = jnp.sum(weighted)
  if reduction == "sum":
    return total
  denominator = jnp.sum(weights) if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
  safe = jnp.where(denominator > 0, denominator, 1.0)
  return jnp.where(denominator > 0, total / safe, 0.0)
