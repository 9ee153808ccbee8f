"""Log-probs of given tokens (and the predictive entropies) from hidden states and an output head, in
position chunks: what the sampled estimators, GRPO and teacher scoring need, without [B, T, V] logits.

    logprobs, entropy = token_logprobs(hidden_BTD, head_DV, targets_BT, chunk_size=4096)

Position t of `hidden` predicts `targets[:, t]` (the caller aligns them). Each chunk's logits are
hidden @ head in the hidden states' dtype with float32 accumulation (what the model's own logits are),
divided by `temperature`; under `jax.grad` the chunk is recomputed in the backward pass
(`chunking.scan_position_chunks`), so memory stays O(chunk_size * V) both ways.
"""

import jax
import jax.numpy as jnp

from kldistill_jax.losses.chunking import map_position_chunks
from kldistill_jax.losses.divergences import entropy_from_log_probs


def head_logits(hidden, head):
  """float32 logits hidden @ head, the matmul in the hidden states' dtype (as the model computes them)."""
  return jnp.dot(hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)


def head_log_probs(hidden, head, temperature=1.0):
  """float32 log-softmax of (hidden @ head) / temperature over the last axis."""
  return jax.nn.log_softmax(head_logits(hidden, head) / temperature, axis=-1)


def token_logprobs(hidden, head, targets, *, temperature=1.0, chunk_size=None, entropy=True):
  """(log p(targets) [B, T] float32, entropy of each predictive distribution [B, T] or None).

  Args:
    hidden: [B, T, D] final hidden states; head: [D, V] output head; targets: int [B, T].
    temperature: divides the logits (scalar, may be traced).
    chunk_size: about how many positions per chunk (None: all at once, [B, T, V] materialised).
    entropy: also return the entropies (else None; one reduction less per chunk).
  """
  def chunk_fn(hidden_BCD, targets_BC):
    logp = head_log_probs(hidden_BCD, head, temperature)
    picked = jnp.take_along_axis(logp, targets_BC[..., None], axis=-1)[..., 0]
    return (picked, entropy_from_log_probs(logp)) if entropy else (picked,)

  out = map_position_chunks(chunk_fn, (hidden, targets), chunk_size)
  return out if entropy else (out[0], None)
