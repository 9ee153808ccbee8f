"""A model over whole sequences (no KV cache): the one forward the train step, the GRPO step, the scorers
and the hidden-state cache share, so their positions and masking cannot drift apart.

A row is a prompt (right-padded: real tokens, then padding, then the response) or any token sequence with
its attention mask; the mask says which slots are real, and RoPE positions count only real tokens, so a
padded prompt continues into its response without a gap (what the sampler's prefill and decode do too).
"""

import jax
import jax.numpy as jnp


def positions(mask):
  """int32 [B, L] RoPE positions: the count of real tokens before each one (padding gets 0)."""
  mask = mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0) * mask


def forward(model, tokens, mask, *, hidden=True):
  """The model on (tokens [B, L], mask [B, L]): final hidden states [B, L, D] (hidden=True: the output
  head left to the caller, e.g. a fused or chunked loss) or float32 logits [B, L, V]."""
  out, _ = model(tokens, positions(mask), None, mask, return_hidden=hidden)
  return out


def predictors(model, tokens, mask):
  """(hidden state that predicts each token [B, L, D], whether it has one [B, L]) and the output head.

  Token t is predicted by the hidden state of the previous REAL token (t - 1 in a contiguous row; the
  last prompt token across the padding gap of a right-padded prompt), found by a running max; padding and
  each row's first real token have none.
  """
  hidden = forward(model, tokens, mask)
  b, length, _ = hidden.shape
  columns = jnp.where(mask.astype(bool), jnp.arange(length)[None], -1)
  previous = jnp.concatenate([jnp.full((b, 1), -1), jax.lax.cummax(columns, axis=1)[:, :-1]], axis=1)
  predictor = jnp.take_along_axis(hidden, jnp.maximum(previous, 0)[..., None], axis=1)
  return predictor, mask.astype(bool) & (previous >= 0), model.output_head()
