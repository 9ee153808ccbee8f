"""grain pipelines: records -> fixed-shape token batches, for training and for evaluation.

A training batch (b = the per-process batch size, P = data.prompt_len, R = data.response_len):
  prompt_tokens    int32 [b, P]  the templated prompt, LEFT-padded with pad_id
  prompt_mask      int32 [b, P]  1 on real prompt tokens
  response_tokens  int32 [b, R]  the reference response + EOS, RIGHT-padded with pad_id
  response_mask    int32 [b, R]  1 on response tokens and the EOS
  index            int64 [b]     position of the record in the source (to look up its answer)
Left-padded prompts followed by right-padded responses keep every row contiguous, as `objectives` needs.
Nothing is ever truncated: a record that does not fit raises ValueError naming the config field. Encoding is
lazy (at the step that reaches the record): run `validate.check_lengths` on the source first, as the runner
does, to fail (or skip) before any compute.

Multi-process: the record stream (shuffled per epoch, repeated) is cut into global batches of
b * process_count rows; process i gets rows [i * b, (i + 1) * b) of each one. Concatenating the
processes' batches in process order therefore gives the same global batch for any process_count.
"""

import functools

import grain
import numpy as np

from kldistill_jax.data.templates import format_record
from kldistill_jax.errors import UserError


def _too_long(index, what, length, field, limit):
  return UserError(f"record {index}: {what} is {length} tokens, longer than {field}={limit} "
                   f"(raise {field}; nothing is truncated)")


def encode_prompt(record, tokenizer, template, prompt_len, index=-1) -> dict:
  """prompt_tokens / prompt_mask [P] (left-padded) and index of one record."""
  ids = tokenizer.encode(format_record(record, template, tokenizer))
  if not ids:
    raise UserError(f"record {index}: empty prompt (the last prompt token predicts the response)")
  if len(ids) > prompt_len:
    raise _too_long(index, "the prompt", len(ids), "data.prompt_len", prompt_len)
  tokens = np.full(prompt_len, tokenizer.pad_id, np.int32)
  tokens[prompt_len - len(ids):] = ids
  mask = np.zeros(prompt_len, np.int32)
  mask[prompt_len - len(ids):] = 1
  return dict(prompt_tokens=tokens, prompt_mask=mask, index=np.int64(index))


def encode_example(record, tokenizer, template, prompt_len, response_len, index=-1) -> dict:
  """One training row: `encode_prompt` plus response_tokens / response_mask [R] (response + EOS)."""
  example = encode_prompt(record, tokenizer, template, prompt_len, index)
  ids = tokenizer.encode(record["response"]) + [tokenizer.eos_id]
  if len(ids) > response_len:
    raise _too_long(index, "the response + EOS", len(ids), "data.response_len", response_len)
  tokens = np.full(response_len, tokenizer.pad_id, np.int32)
  tokens[:len(ids)] = ids
  mask = np.zeros(response_len, np.int32)
  mask[:len(ids)] = 1
  return dict(example, response_tokens=tokens, response_mask=mask)


def _encode_at(index, record, *, num_records, **kwargs):
  # Behind a shuffle + repeat, grain hands map_with_index the index within the repeated stream.
  return encode_example(record, index=index % num_records, **kwargs)


def _check_processes(batch_size, process_index, process_count):
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")


def make_dataset(source, tokenizer, *, template, prompt_len, response_len, batch_size, seed,
                 shuffle=True, num_epochs=None, process_index=0, process_count=1) -> grain.MapDataset:
  """Training batches of this process (`batch_size` rows each); see the module docstring.

  Shuffling is deterministic in `seed` and differs per epoch; `num_epochs=None` repeats forever
  (batches then run across epoch boundaries), otherwise the last incomplete global batch is dropped.
  `iter(dataset)` gives an iterator with `get_state()` / `set_state()` that
  `grain.checkpoint.CheckpointSave` / `CheckpointRestore` store in an orbax checkpoint.
  """
  _check_processes(batch_size, process_index, process_count)
  if len(source) == 0:
    raise UserError("the data source is empty")
  encode = functools.partial(_encode_at, num_records=len(source), tokenizer=tokenizer,
                             template=template, prompt_len=prompt_len, response_len=response_len)
  dataset = grain.MapDataset.source(source).map_with_index(encode)
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset.repeat(num_epochs).batch(batch_size, drop_remainder=True)
  # Local batch j holds global batch j // process_count, rows of process j % process_count.
  usable = len(dataset) // process_count * process_count
  if usable == 0:
    raise UserError(f"{len(source)} records x {num_epochs} epochs make no global batch of "
                    f"{batch_size} x {process_count} processes")
  return dataset[process_index:usable:process_count]


def eval_batches(source, tokenizer, *, template, prompt_len, batch_size, limit=None, process_index=0,
                 process_count=1) -> list[dict]:
  """The first `limit` records (all if None), in order, as this process's prompt batches.

  Batches hold prompt_tokens, prompt_mask, index and `valid` int32 [b]: the last global batch is
  filled up with copies of the last record marked valid=0, so callers neither drop nor double count.
  Rows are split across processes as in `make_dataset`.
  """
  _check_processes(batch_size, process_index, process_count)
  count = len(source) if limit is None else min(limit, len(source))
  if count < 1:
    raise UserError(f"no records to evaluate ({len(source)} in the source, limit={limit})")
  global_batch = batch_size * process_count
  batches = []
  for first in range(0, count, global_batch):  # every process gets the same number of batches
    start = first + process_index * batch_size
    positions = range(start, start + batch_size)
    rows = [encode_prompt(source[min(i, count - 1)], tokenizer, template, prompt_len, min(i, count - 1))
            for i in positions]
    batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    batch["valid"] = np.array([i < count for i in positions], np.int32)
    batches.append(batch)
  return batches
