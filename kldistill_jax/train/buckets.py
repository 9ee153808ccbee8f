"""Length buckets: a step batch keeps only the columns some row uses, rounded up to a bucket.

Prompts are left-padded to data.prompt_len (P) and completions right-padded to their budget (N); when every
row of a batch stopped early (or every prompt is short) the step would train, and the teacher score, columns
that are padding in every row. `trim_batch` drops them: the completion part keeps the longest real
completion (EOS included) rounded up to a multiple of `bucket` (never beyond N), the prompt part the longest
real prompt rounded up the same way (never beyond P), dropped from the left. A dropped column is padding in
every row, and positions are counted from the attention mask, so the loss, metrics and gradients of the
trimmed batch are those of the full one. Few distinct widths -> few compilations of the jitted step
(`ShapeLog` says when a new one is seen).

The extents are reduced on the device over the GLOBAL batch, so every process cuts the same columns.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from kldistill_jax.errors import UserError


def check_bucket(bucket):
  if not isinstance(bucket, int) or bucket < 0:
    raise UserError(f"sampling.length_bucket must be an int >= 0 (0 = off), got {bucket!r}")


def round_up(length, bucket, limit):
  """`length` rounded up to a multiple of `bucket`, at most `limit`; bucket 0 = off: `limit`."""
  if bucket == 0:
    return limit
  return min(limit, -(-length // bucket) * bucket)


@functools.lru_cache(maxsize=None)
def _used_columns(out_sharding):
  # [L] bool: the column holds a real token in some row, reduced over the global batch and replicated, so
  # every process reads the same answer.
  return jax.jit(lambda mask_BL: jnp.any(mask_BL > 0, axis=0), out_shardings=out_sharding)


def extents(mask_BL, prompt_width):
  """(longest prompt, longest completion) of a [B, L] attention mask whose first `prompt_width` columns are
  left-padded prompts: the columns from the first used prompt column / up to the last used one."""
  placed = getattr(mask_BL, "sharding", None)
  replicated = NamedSharding(placed.mesh, PartitionSpec()) if isinstance(placed, NamedSharding) else None
  used = np.asarray(jax.device_get(_used_columns(replicated)(mask_BL)))
  prompt, completion = used[:prompt_width], used[prompt_width:]
  longest_prompt = prompt_width - int(np.argmax(prompt)) if prompt.any() else 0
  longest_completion = len(completion) - int(np.argmax(completion[::-1])) if completion.any() else 0
  return longest_prompt, longest_completion


def _slice(x, start, stop):
  # Keep the array's sharding: the jitted step names its input shardings.
  sliced = x[:, start:stop]
  return sliced if isinstance(x, np.ndarray) else jax.device_put(sliced, x.sharding)


def trim_columns(batch, start, stop, length):
  """Columns [start, stop) of every entry whose axis 1 is the sequence axis (of size `length`)."""
  return {k: _slice(v, start, stop) if np.ndim(v) >= 2 and v.shape[1] == length else v
          for k, v in batch.items()}


def trim_batch(batch, prompt_width, bucket):
  """The step batch (tokens [B, P + N] and its companions, see `train.step`) without the columns that are
  padding in every row, each part rounded up to `bucket`; bucket 0 returns `batch` as is."""
  length = batch["tokens"].shape[1]
  if bucket == 0 or bucket >= max(prompt_width, length - prompt_width):
    return batch  # nothing to cut (a real row is never empty): skip the device round trip
  longest_prompt, longest_completion = extents(batch["attention_mask"], prompt_width)
  keep_prompt = round_up(longest_prompt, bucket, prompt_width)
  keep_completion = round_up(longest_completion, bucket, length - prompt_width)
  if keep_prompt == prompt_width and keep_completion == length - prompt_width:
    return batch
  return trim_columns(batch, prompt_width - keep_prompt, prompt_width + keep_completion, length)


def trim_prompts(data_batch, bucket):
  """A data batch with its left-padded prompt_tokens / prompt_mask [B, P] cut to the longest real prompt
  rounded up to `bucket` (the sampler then runs on the shorter prompts too); other entries as they are."""
  width = data_batch["prompt_mask"].shape[1]
  if bucket == 0 or bucket >= width:
    return data_batch
  keep = round_up(extents(data_batch["prompt_mask"], width)[0], bucket, width)
  if keep == width:
    return data_batch
  prompts = trim_columns({k: data_batch[k] for k in ("prompt_tokens", "prompt_mask")}, width - keep, width,
                         width)
  return {**data_batch, **prompts}


class ShapeLog:
  """Says once per new batch shape that the jitted `name` compiles for it (each shape is one compilation)."""

  def __init__(self, name):
    self.name, self.seen = name, set()

  def __call__(self, batch):
    shape = tuple(batch["tokens"].shape)
    if shape not in self.seen:
      self.seen.add(shape)
      # WARNING: a compilation takes seconds to minutes at scale; a user should see why a step was slow.
      logging.warning("%s: compiling for batch shape [%s] (%d shape%s so far)", self.name,
                      ", ".join(map(str, shape)), len(self.seen), "" if len(self.seen) == 1 else "s")
    return batch
