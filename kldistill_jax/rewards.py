"""Answer extraction and verification for file datasets (GSM8K '#### N', MATH '\\boxed{}').

    rewards.is_correct("... so she has #### 1,000", "1000")  -> True

Extraction tries, in order: the text after the last '####', the last \\boxed{...}, the last number.
Equivalence: exact string match after normalisation, else math-verify (symbolic), with a bounded time.
"""

import re

from kldistill_jax.data import sources

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
  """The model's final answer in `text`, or None when it gives none."""
  for extract in (sources.gsm8k_answer, sources.boxed_answer):
    try:
      return extract(text)
    except ValueError:
      pass
  numbers = _NUMBER.findall(text)
  return numbers[-1].replace(",", "") if numbers else None


def _normalise(answer: str) -> str:
  return answer.strip().rstrip(".").replace(",", "").replace(" ", "").replace("$", "")


def is_correct(text: str, answer: str) -> bool:
  extracted = extract_answer(text)
  if extracted is None:
    return False
  if _normalise(extracted) == _normalise(answer):
    return True
  import math_verify  # pylint: disable=g-import-not-at-top  (slow import, only for non-trivial answers)
  try:  # parsing_timeout=None: math-verify's signal-based timeout breaks outside the main thread
    gold = math_verify.parse(f"${answer}$", parsing_timeout=None)
    predicted = math_verify.parse(f"${extracted}$", parsing_timeout=None)
    return bool(math_verify.verify(gold, predicted, timeout_seconds=None))
  except Exception:  # pylint: disable=broad-except  (unparseable answers are wrong, not fatal)
    return False
