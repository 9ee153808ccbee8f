"""The built-in synthetic, verifiable math task: add single-digit terms one step at a time, in any order.

    prompt    "3+5+2="
    response  "3+2=5,5+5=10#10"   (one of the 3! orders; the pipeline appends the tokenizer's EOS)
    answer    "10"

A problem has `difficulty` terms (each 1..9), so the chain of thought has difficulty - 1 steps; its length
grows with difficulty. Each step adds one unused term to the running sum (the first adds two terms);
every order of the terms is a valid solution, so a teacher trained on random orders has real entropy
over them while the answer stays exactly checkable.

Splits partition the problem space: a problem (its multiset of terms, so "3+5=" and "5+3=" go
together) belongs to the split its stable hash falls in, whatever the seed, so splits never share a
problem; a held-out split by difficulty is `ArithmeticTask(n, difficulties=(6,), split="test")`.
"""

import collections
import itertools
import re
import zlib

import numpy as np

from kldistill_jax.errors import UserError

# Hash buckets (crc32 of the sorted terms mod 10) of each split.
SPLITS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}
_PROMPT = re.compile(r"^(\d+(?:\+\d+)+)=$")
_STEP = re.compile(r"^(\d+)\+(\d+)=(\d+)$")
_INTEGER = re.compile(r"^[+-]?\d+(?:,\d{3}(?!\d))*")  # thousands commas, as in "#### 1,000"


def _split_of(terms) -> str:
  bucket = zlib.crc32(",".join(map(str, sorted(terms))).encode()) % 10
  return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def problem_prompt(terms) -> str:
  return "+".join(map(str, terms)) + "="


def parse_prompt(prompt: str) -> list[int]:
  match = _PROMPT.match(prompt)
  if not match:
    raise UserError(f"not an arithmetic prompt (expected e.g. '3+5+2='): {prompt!r}")
  return [int(t) for t in match.group(1).split("+")]


def format_solution(ordered_terms) -> str:
  """The response that adds `ordered_terms` left to right."""
  total, steps = ordered_terms[0], []
  for term in ordered_terms[1:]:
    steps.append(f"{total}+{term}={total + term}")
    total += term
  return ",".join(steps) + f"#{total}"


def solutions(prompt: str) -> set[str]:
  """Every valid response to `prompt` (one per distinct order of its terms: up to d! of them)."""
  return {format_solution(order) for order in itertools.permutations(parse_prompt(prompt))}


def is_valid_solution(prompt: str, response: str) -> bool:
  """Whether every step is right, uses each term exactly once, and the answer is the final sum."""
  terms = collections.Counter(parse_prompt(prompt))
  body, _, answer = response.partition("#")
  steps = [_STEP.match(step) for step in body.split(",")]
  if not answer or not all(steps):
    return False
  total = None
  for step in steps:
    left, term, result = (int(g) for g in step.groups())
    if total is None:  # the first step adds two terms
      terms[left] -= 1
    elif left != total:
      return False
    terms[term] -= 1
    if result != left + term:
      return False
    total = result
  return all(count == 0 for count in terms.values()) and answer == str(total)


def extract_answer(text: str) -> str | None:
  """The integer that starts after the last '#' ("#### 1,000 apples" -> "1000"), or None."""
  _, hash_, tail = text.rpartition("#")
  match = _INTEGER.match(tail.strip()) if hash_ else None
  return match.group(0).replace(",", "") if match else None


def is_correct(text: str, answer: str) -> bool:
  """Exact integer match of the extracted answer."""
  extracted = extract_answer(text)
  try:
    return extracted is not None and int(extracted) == int(answer)
  except ValueError:  # a reference answer that is not an integer never matches
    return False


class ArithmeticTask:
  """`num_examples` problems, a random-access source for grain; record i depends only on (seed, split, i).

  Records: dict(prompt, response (one random valid order), answer, difficulty).
  """

  def __init__(self, num_examples: int, difficulties=(2, 3, 4, 5), seed: int = 0, split: str = "train"):
    if split not in SPLITS:
      raise UserError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if not difficulties or any(not 2 <= d <= 9 for d in difficulties):
      raise UserError(f"difficulties must be term counts in 2..9, got {difficulties!r}")
    self.num_examples = int(num_examples)
    self.difficulties = tuple(int(d) for d in difficulties)
    self.seed = int(seed)
    self.split = split
    self._split_key = zlib.crc32(split.encode())

  def __len__(self) -> int:
    return self.num_examples

  def longest(self) -> dict:
    """A record at least as long as any of this task's, prompt and response (in characters): all nines at
    the largest difficulty (every sum then has the most digits). Not necessarily of this split."""
    terms = [9] * max(self.difficulties)
    return dict(prompt=problem_prompt(terms), response=format_solution(terms), answer=str(sum(terms)),
                difficulty=len(terms))

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    rng = np.random.default_rng([self.seed, self._split_key, int(index)])
    difficulty = int(rng.choice(self.difficulties))
    while True:  # rejection: about 1 / (the split's share of hash buckets) draws on average
      terms = [int(t) for t in rng.integers(1, 10, size=difficulty)]
      if _split_of(terms) == self.split:
        break
    order = [terms[i] for i in rng.permutation(difficulty)]
    return dict(prompt=problem_prompt(terms), response=format_solution(order), answer=str(sum(terms)),
                difficulty=difficulty)
