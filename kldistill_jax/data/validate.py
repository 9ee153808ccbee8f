"""Every record checked against the pipelines' fixed lengths before any compute (`data.too_long`).

The grain pipelines encode lazily, so a record that does not fit would otherwise stop a run at the step that
reaches it, hours in. `check_lengths` tokenizes every record once, as the pipelines will (the template around
the prompt; the reference response + EOS), and either raises one error that names the records that do not
fit ("path:line: prompt has N tokens > data.prompt_len=M") or drops them and logs how many, per file.
Nothing is ever truncated.

Which lengths apply:
  training records (`make_dataset`)  prompt <= data.prompt_len and response + EOS <= data.response_len:
                                     every training batch carries the reference response whatever the
                                     objective (dataset prefixes and the fit-to-data stages train on it;
                                     sampled prefixes carry it unused), so it must fit too
  held-out records (`eval_batches`)  prompt <= data.prompt_len only (response_len=None)
"""

import collections

import numpy as np
from absl import logging

from kldistill_jax.data.arithmetic import ArithmeticTask
from kldistill_jax.data.sources import Records
from kldistill_jax.data.templates import format_record
from kldistill_jax.errors import UserError

TOO_LONG = ("error", "skip")
_CHUNK = 1024  # records tokenized per call: one pass in bounded memory
_SHOWN = 5  # offending records named in the error


def origin(source, index: int) -> str:
  """Where record `index` of `source` came from: "path:line" for records read from files."""
  return source.origin(index) if hasattr(source, "origin") else f"record {index}"


class Subset:
  """The records of `source` at `indices` (kept in order), random access; origins stay the original ones."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.indices[index])]

  def origin(self, index: int) -> str:
    return origin(self.source, int(self.indices[index]))


def _token_counts(texts, tokenizer, origins):
  try:
    ids = tokenizer.encode_batch(texts)
  except ValueError:  # a text the tokenizer cannot encode (the char alphabet): find and name it
    for text, where in zip(texts, origins):
      try:
        tokenizer.encode(text)
      except ValueError as e:
        raise UserError(f"{where}: {e}") from e
    raise
  return np.fromiter(map(len, ids), np.int64, len(texts))


def _prompt_text(record, template, tokenizer, where):
  try:
    return format_record(record, template, tokenizer)
  except ValueError as e:  # a conversation the template cannot render: name the record
    raise UserError(f"{where}: {e}") from e


def _measure(records, origins, tokenizer, template, with_response):
  """(prompt tokens [n], response + EOS tokens [n] or None) of `records`."""
  prompts = _token_counts([_prompt_text(r, template, tokenizer, where) for r, where in zip(records, origins)],
                          tokenizer, origins)
  for i in np.flatnonzero(prompts == 0):  # malformed, not too long: never skipped
    raise UserError(f"{origins[i]}: empty prompt (the last prompt token predicts the response)")
  if not with_response:
    return prompts, None
  return prompts, _token_counts([r["response"] for r in records], tokenizer, origins) + 1


def _too_long(prompt, response, prompt_len, response_len):
  """What does not fit in one record, or "" when it fits."""
  reasons = []
  if prompt > prompt_len:
    reasons.append(f"prompt has {prompt} tokens > data.prompt_len={prompt_len}")
  if response is not None and response > response_len:
    reasons.append(f"response + EOS has {response} tokens > data.response_len={response_len}")
  return ", ".join(reasons)


def _check_task(task, tokenizer, template, prompt_len, response_len):
  # The generated task is checked through its longest possible record (exact for the char tokenizer it is
  # made for: one token per character), not num_examples records; it cannot be "skipped" record by record.
  record = task.longest()
  where = f"the built-in task's longest problem {record['prompt']!r} (difficulty {record['difficulty']})"
  prompts, responses = _measure([record], [where], tokenizer, template, response_len is not None)
  reason = _too_long(prompts[0], None if responses is None else responses[0], prompt_len, response_len)
  if reason:
    raise UserError(f"{where}: {reason}: raise the length or lower the difficulties (nothing is "
                    "truncated; data.too_long='skip' does not apply to the generated task)")
  return task


def _file_of(source, where):
  return where.rpartition(":")[0] if isinstance(source, Records) else getattr(source, "description", "source")


def check_lengths(source, tokenizer, *, template, prompt_len, response_len=None, too_long="error",
                  what="training records"):
  """`source` when every record fits, else (too_long="skip") the records that fit, in order, as a new
  random-access source; too_long="error" raises ValueError naming the count and the first offenders.

  `response_len=None` checks prompts only (held-out records). The built-in task is checked through its
  longest record. An empty prompt or text the tokenizer cannot encode is an error in either mode.
  """
  if too_long not in TOO_LONG:
    raise UserError(f"data.too_long must be one of {', '.join(map(repr, TOO_LONG))}, got {too_long!r}")
  if isinstance(source, ArithmeticTask):
    return _check_task(source, tokenizer, template, prompt_len, response_len)
  count = len(source)
  dropped, shown = [], []
  for start in range(0, count, _CHUNK):
    indices = range(start, min(start + _CHUNK, count))
    origins = [origin(source, i) for i in indices]
    prompts, responses = _measure([source[i] for i in indices], origins, tokenizer, template,
                                  response_len is not None)
    over = prompts > prompt_len
    if responses is not None:
      over |= responses > response_len
    for j in np.flatnonzero(over):
      dropped.append(start + j)
      if len(shown) < _SHOWN:
        reason = _too_long(prompts[j], None if responses is None else responses[j], prompt_len, response_len)
        shown.append(f"{origins[j]}: {reason}")
  if not dropped:
    return source
  fields = "data.prompt_len" + ("" if response_len is None else " / data.response_len")
  if too_long == "error" or len(dropped) == count:
    advice = (f"all {count} {what} are too long (data.too_long='skip' leaves none); nothing is truncated: "
              f"raise {fields}" if too_long == "skip" else
              f"{len(dropped)} of {count} {what} are too long; nothing is truncated: raise {fields}, or set "
              "data.too_long='skip' to drop them")
    which = "" if len(shown) == len(dropped) else f" (the first {len(shown)})"
    raise UserError(f"{advice}{which}:\n  " + "\n  ".join(shown))
  totals = collections.Counter(_file_of(source, origin(source, i)) for i in range(count))
  skipped = collections.Counter(_file_of(source, origin(source, i)) for i in dropped)
  for file, n in skipped.items():
    logging.warning("data.too_long='skip': dropped %d of %d %s of %s (longer than %s)", n, totals[file], what,
                    file, fields)
  kept = np.setdiff1d(np.arange(count), dropped)
  if isinstance(source, Records):
    return Records([source[i] for i in kept], [source.origins[i] for i in kept])
  return Subset(source, kept)
