"""Position chunking and masked reductions shared by every full-vocabulary loss.

`scan_position_chunks` is what keeps peak memory at O(chunk_size * V): it walks the TIME axis of
[B, T, ...] arrays in chunks of about `chunk_size` positions (chunk_size // B time steps for all B rows)
with `lax.scan`, reading each chunk with a dynamic slice of the ORIGINAL arrays (no padded copy), and
rematerialises the chunk body in the backward pass, so no [B, T, V] intermediate is ever stored. Walking
time rather than flattened positions keeps the batch axis whole in every chunk, so a batch sharded over
devices stays sharded (each device computes only its rows).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def scan_position_chunks(fn, xs, chunk_size, init=None):
  """Scans `fn(carry, fresh, *chunks) -> (carry, pytree of [B, c, ...])` over time chunks of `xs`.

  Args:
    fn: pure function; positions are independent apart from what it accumulates in `carry`.
      `fresh` (bool [1, c]) is False for time steps an earlier chunk already covered (only the last
      chunk has any), so accumulations must ignore those; per-position outputs there are dropped.
    xs: tuple of arrays [B, T, ...] sharing B and T.
    chunk_size: about how many positions (B * c) per chunk, or None for one call on everything; a
      chunk holds at least one time step of every row.
    init: the initial carry.

  Returns:
    (final carry, the per-position pytree with leading dimensions [B, T]).
  """
  b, n = xs[0].shape[:2]
  steps = None if chunk_size is None else max(1, chunk_size // b)
  if steps is None or steps >= n:
    return fn(init, jnp.ones((1, n), bool), *xs)
  c = steps
  num_chunks = math.ceil(n / c)

  # The last chunk is shifted back to end exactly at T (its start is clamped), so chunks never read past
  # the end or need a padded copy of the inputs; its overlap with the previous chunk is not fresh.
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(carry, i):
    start = jnp.minimum(i * c, n - c)
    chunk = tuple(lax.dynamic_slice_in_dim(x, start, c, axis=1) for x in xs)
    fresh = (start + jnp.arange(c) >= i * c)[None]
    return fn(carry, fresh, *chunk)

  carry, ys = lax.scan(body, init, jnp.arange(num_chunks))
  return carry, jax.tree.map(functools.partial(_assemble, n=n), ys)


def _assemble(y, n):
  """Per-chunk outputs [num_chunks, B, c, ...] -> [B, T = n, ...]: the last chunk, shifted back to end at
  T, contributes only its time steps not covered before."""
  num_chunks, b, c = y.shape[:3]
  tail = n - (num_chunks - 1) * c
  head = jnp.moveaxis(y[:-1], 0, 1).reshape((b, -1) + y.shape[3:])
  return jnp.concatenate([head, y[-1, :, c - tail:]], axis=1)


def map_position_chunks(fn, xs, chunk_size):
  """Applies `fn(*chunks) -> pytree of [B, c, ...]` chunk by chunk; returns what `fn(*xs)` would."""
  _, ys = scan_position_chunks(lambda carry, fresh, *chunk: (carry, fn(*chunk)), xs, chunk_size)
  return ys


def as_batch_time(x, trailing):
  """Views x [..., T, *trailing dims] as [B, T, *trailing] (B = product of the leading dims; a leading
  sharded axis stays sharded). None passes through."""
  if x is None:
    return None
  positions = x.shape[:x.ndim - trailing]
  b = math.prod(positions[:-1]) if len(positions) > 1 else 1
  t = positions[-1] if positions else 1
  return x.reshape((b, t) + x.shape[x.ndim - trailing:])


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
