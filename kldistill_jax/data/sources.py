"""Reasoning datasets from files: JSONL (GSM8K / MATH / AIME / AMC layouts) and tfds array_record, as
records; benchmark files named by "name=format:path" specs.

A record is dict(prompt=str, response=str (the reference solution), answer=str). Sources are random
access (`len`, `[i]`), which is what `grain.MapDataset.source` needs. Records read from files come as
`Records`: a list that also knows each record's "path:line", so errors about a record name its line.
"""

import decimal
import json
import math
import pathlib
import re

from kldistill_jax.errors import UserError

FORMATS = ("gsm8k", "math", "aime", "amc", "chat")
ROLES = ("system", "user", "assistant")


def gsm8k_answer(solution: str) -> str:
  """The final answer of a GSM8K solution: what follows its last '####' (thousands commas removed)."""
  _, marker, answer = solution.rpartition("####")
  answer = answer.strip().replace(",", "")
  if not marker or not answer:
    raise UserError("no '#### <answer>' in the solution")
  return answer


def boxed_answer(solution: str) -> str:
  """The contents of the last \\boxed{...} in `solution` (nested braces allowed)."""
  start = solution.rfind("\\boxed{")
  if start < 0:
    raise UserError("no \\boxed{...} answer in the solution")
  depth = 0
  for end in range(start + len("\\boxed"), len(solution)):
    depth += {"{": 1, "}": -1}.get(solution[end], 0)
    if depth == 0:
      return solution[start + len("\\boxed{"):end].strip()
  raise UserError("unbalanced braces in the last \\boxed{...}")


def _field(row, key):
  if key not in row:
    raise UserError(f"missing key {key!r}")
  if not isinstance(row[key], str):
    raise UserError(f"{key!r} must be a string, got {type(row[key]).__name__}")
  return row[key]


def _gsm8k_record(row):
  solution = _field(row, "answer")
  return dict(prompt=_field(row, "question"), response=solution, answer=gsm8k_answer(solution))


def _math_record(row):
  solution = _field(row, "solution")
  answer = _field(row, "answer") if "answer" in row else boxed_answer(solution)
  return dict(prompt=_field(row, "problem"), response=solution, answer=answer)


def _key(row, *keys):
  """The first of `keys` in `row` (public AIME / AMC files differ in capitalisation)."""
  for key in keys:
    if key in row:
      return key
  raise UserError(f"missing key {keys[0]!r}")


def number_answer(value) -> str:
  """A JSON answer (int, float or str) as a string: integral floats lose their '.0' (142.0 -> '142'),
  other floats are plain decimals (0.5 -> '0.5', 1e-07 -> '0.0000001'), strings are stripped."""
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    raise UserError(f"the answer must be a number or a string, got {type(value).__name__}")
  if isinstance(value, str):
    answer = value.strip()
  elif isinstance(value, int):
    answer = str(value)
  elif not math.isfinite(value):
    raise UserError(f"the answer must be finite, got {value}")
  elif value.is_integer():
    answer = str(int(value))
  else:
    answer = format(decimal.Decimal(repr(value)), "f")  # repr: the shortest round-tripping digits
  if not answer:
    raise UserError("empty answer")
  return answer


def _competition_record(row, integer_answer):
  answer = number_answer(row[_key(row, "answer", "Answer")])
  if integer_answer and not re.fullmatch(r"-?[0-9]+", answer):
    raise UserError(f"an AIME answer is an integer, got {answer!r}")
  solution = row.get("solution", row.get("Solution"))
  if solution is not None and not isinstance(solution, str):
    raise UserError(f"'solution' must be a string, got {type(solution).__name__}")
  return dict(prompt=_field(row, _key(row, "problem", "Problem")), response=solution or "", answer=answer)


def _turn(message, number):
  if not isinstance(message, dict):
    raise UserError(f"message {number} must be an object with 'role' and 'content', got "
                    f"{type(message).__name__}")
  try:
    role, content = _field(message, "role"), _field(message, "content")
  except ValueError as e:
    raise UserError(f"message {number}: {e}") from e
  if role not in ROLES:
    raise UserError(f"message {number}: role {role!r} is not one of {', '.join(ROLES)}")
  return {"role": role, "content": content}


def _chat_record(row):
  """`messages` ([{"role", "content"}, ...]): the last turn is the assistant's reference response, the
  turns before it the prompt conversation (an optional system turn first, then user and assistant turns
  alternating, ending with a user turn). `answer` (optional): the reference answer for evaluation and
  rewards, else the reference's '#### N' or last \boxed{}, else None (training only)."""
  messages = row.get("messages")
  if not isinstance(messages, list) or not messages:
    raise UserError("missing key 'messages'" if messages is None else
                    f"'messages' must be a non-empty list of turns, got {messages!r:.80}")
  turns = [_turn(m, i) for i, m in enumerate(messages, start=1)]
  if turns[-1]["role"] != "assistant":
    raise UserError(f"the last message is the reference response and must be the assistant's, got "
                    f"{turns[-1]['role']!r}")
  prompt = turns[:-1]
  if prompt and prompt[0]["role"] == "system":
    prompt_turns = prompt[1:]
  else:
    prompt_turns = prompt
  expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(prompt_turns))]
  roles = [t["role"] for t in prompt_turns]
  if not prompt_turns or roles != expected or roles[-1] != "user":
    raise UserError(f"the turns before the reference must be an optional system turn, then user and "
                    f"assistant turns alternating and ending with the user's; got {', '.join(t['role'] for t in turns)}")
  response = turns[-1]["content"]
  if "answer" in row:
    answer = number_answer(row["answer"])
  else:
    try:
      answer = _reference_answer(response)
    except ValueError:
      answer = None
  return dict(prompt=prompt_turns[-1]["content"], messages=tuple(prompt), response=response, answer=answer)


_PARSERS = {"gsm8k": _gsm8k_record, "math": _math_record, "chat": _chat_record,
            "aime": lambda row: _competition_record(row, integer_answer=True),
            "amc": lambda row: _competition_record(row, integer_answer=False)}


class Records(list):
  """Record dicts (a plain list: equal to one, random access for grain) plus `origins`: where each record
  came from, as "path:line" (1-based). Built whole, never appended to."""

  def __init__(self, records=(), origins=()):
    super().__init__(records)
    self.origins = list(origins)
    if len(self.origins) != len(self):
      raise ValueError(f"{len(self)} records but {len(self.origins)} origins")

  def origin(self, index: int) -> str:
    return self.origins[index]


def read_jsonl(path, format: str) -> Records:  # pylint: disable=redefined-builtin
  """Records of a JSONL file in the GSM8K (`question`, `answer` ending '#### N'), MATH (`problem`,
  `solution`, optional `answer`, else the last \\boxed{}), AIME, AMC or chat (`messages`, see
  `_chat_record`) layout.

  AIME and AMC files (as AI-MO/aimo-validation-aime / -amc) are evaluation-only: `problem` (or `Problem`)
  and `answer` (or `Answer`: an integer for AIME, a number or string for AMC; see `number_answer`); the
  response is the optional `solution`, else "". Other keys (`id`, `year`, ...) are ignored.

  Any bad line raises ValueError naming the file and its 1-based line number. Blank lines are errors,
  except at the very end of the file (an editor's trailing newlines).
  """
  if format not in _PARSERS:
    raise UserError(f"unknown data format {format!r} (expected one of {', '.join(FORMATS)})")
  path = pathlib.Path(path)
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"cannot read {path}: {e}") from e
  while lines and not lines[-1].strip():
    lines.pop()
  if not lines:
    raise UserError(f"{path}: no records")
  records, origins = [], []
  for number, line in enumerate(lines, start=1):
    try:
      if not line.strip():
        raise UserError("blank line")
      row = json.loads(line)
      if not isinstance(row, dict):
        raise UserError(f"expected a JSON object, got {type(row).__name__}")
      records.append(_PARSERS[format](row))
    except ValueError as e:  # json.JSONDecodeError is a ValueError
      raise UserError(f"{path}:{number}: {format} record: {e}") from e
    origins.append(f"{path}:{number}")
  return Records(records, origins)


def require_answers(records, what):
  """Raises naming the first records (path:line) that have no reference answer (chat records without an
  `answer` key or an extractable one): `what` (evaluation, rewards) grades against it."""
  missing = [i for i in range(len(records)) if records[i].get("answer") is None]
  if missing:
    where = [records.origin(i) if hasattr(records, "origin") else f"record {i}" for i in missing[:5]]
    raise UserError(f"{len(missing)} of {len(records)} records have no answer, which {what} needs (add an "
                    "'answer' key, or end the reference with '#### N' or \\boxed{...}): " + ", ".join(where))


def read_benchmark(spec: str) -> list[dict]:
  """Records of the benchmark file named by `spec`, "name=format:path" (e.g. "aime24=aime:/data/a.jsonl"),
  each with `benchmark=name` (evaluation reports each benchmark as its own group)."""
  expected = '"name=format:path" with format one of ' + ", ".join(FORMATS)
  if not isinstance(spec, str):
    raise UserError(f"benchmark spec {spec!r} is not a string: expected {expected}")
  name, eq, rest = spec.partition("=")
  fmt, colon, path = rest.partition(":")
  if not eq or not colon or not path:
    raise UserError(f"malformed benchmark spec {spec!r}: expected {expected}")
  if not name.strip():
    raise UserError(f"benchmark spec {spec!r} has an empty name: expected {expected}")
  if fmt not in FORMATS:
    raise UserError(f"benchmark spec {spec!r}: unknown format {fmt!r}: expected {expected}")
  records = read_jsonl(path, fmt)
  return Records([dict(record, benchmark=name) for record in records], records.origins)


class TfdsSource:
  """Records of a prepared tfds dataset read through array_record (no TensorFlow needed)."""

  def __init__(self, name, split, data_dir, prompt_key, response_key, answer_key=None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, few users)
    self.description = f"tfds {name}[{split}] in {data_dir}"
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # tfds raises several types (not found, unknown split, not array_record)
      raise UserError(f"cannot open {self.description}: {e}") from e
    self._keys = (prompt_key, response_key, answer_key)

  def __len__(self) -> int:
    return len(self._source)

  def origin(self, index: int) -> str:
    return f"{self.description}, record {index}"

  def __getitem__(self, index: int) -> dict:
    row = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in self._source[index].items()}
    prompt_key, response_key, answer_key = self._keys
    try:
      response = _field(row, response_key)
      record = dict(prompt=_field(row, prompt_key), response=response)
      record["answer"] = _field(row, answer_key) if answer_key else _reference_answer(response)
    except ValueError as e:
      raise UserError(f"{self.origin(index)}: {e}") from e
    return record


def _reference_answer(solution):
  try:
    return gsm8k_answer(solution)
  except ValueError:
    return boxed_answer(solution)


def tfds_source(name, split, data_dir, prompt_key, response_key, answer_key=None) -> TfdsSource:
  """A random-access source over `tfds.data_source(name, split, data_dir)` (array_record files).

  Features are decoded from bytes to str; with `answer_key=None` the answer is extracted from the
  response ('#### N' as in GSM8K, else the last \\boxed{}).
  """
  return TfdsSource(name, split, data_dir, prompt_key, response_key, answer_key)
