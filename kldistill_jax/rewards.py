"""Answer extraction and verification for reasoning datasets (GSM8K '#### N', MATH '\\boxed{}', the
built-in task's '#N').

    rewards.is_correct("... so she has #### 1,000", "1000")     -> True
    rewards.is_correct("The answer is \\boxed{\\dfrac{1}{2}}.", "0.5")  -> True
    rewards.grade(text, answer, finished=True)  -> "correct" | "wrong" | "truncated" | "no_answer" | "timeout"
    rewards.grade("6*7 = 42, but wait", "42", finished=False)  -> "truncated" (no EOS within the budget)

Extraction tries, in order: the last \\boxed{...}, the text after the last '####', the built-in task's
'#N', the last number. Equivalence: exact match of the normalised strings, else equal exact rationals
(integers, decimals, a/b, \\frac{a}{b}), else math-verify (symbolic) in a worker process with a bounded
time per answer. The worker is a separate process because math-verify's own timeouts use signals
(main thread only) and a stuck sympy call cannot be interrupted in a thread, only killed in a process; it
is a fresh interpreter (`_verify_worker.py`), so a script without a main guard can grade too.
A completion that did not finish (no EOS within its budget) is graded 'truncated', never correct: its last
number is wherever the budget cut the text. Everything here is safe to call from several threads at once.
"""

import atexit
import fractions
import json
import logging
import pathlib
import queue
import re
import subprocess
import sys
import threading

from kldistill_jax.data import arithmetic, sources

VERIFY_TIMEOUT_S = 5.0  # per answer, for the symbolic check only
_STARTUP_TIMEOUT_S = 120.0  # starting the worker imports sympy: slow, and not the answer's fault
_WORKER = str(pathlib.Path(__file__).with_name("_verify_worker.py"))

_LOG = logging.getLogger(__name__)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,])")
_LATEX_THOUSANDS = re.compile(r"(\d)\{,\}(\d{3})")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_WRAPPERS = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\$", "$", "^\\circ", "^{\\circ}", "\\%", "%")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$|^(-?)\\[dt]?frac(\d)(\d)$")
_RATIO = re.compile(r"^(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)$")
_DECIMAL = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
# A number then unit words ("18 dollars", "3 apples each"); two letters at least so "3 x" stays algebra.
_NUMBER_WITH_UNITS = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s+[a-zA-Z]{2,}[a-zA-Z\s.]*$")


def extract_answer(text: str) -> str | None:
  """The model's final answer in `text` (unnormalised), or None when it gives none."""
  for extract in (sources.boxed_answer, sources.gsm8k_answer):
    try:
      return extract(text)
    except ValueError:
      pass
  builtin = arithmetic.extract_answer(text)
  if builtin is not None:
    return builtin
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


def normalise(answer: str) -> str:
  """A canonical string: no math delimiters, thousands separators, units, spacing or trailing period."""
  s = _TEXT.sub(lambda m: m.group(1), answer.strip().replace("\u2212", "-"))
  s = _LATEX_THOUSANDS.sub(r"\1\2", s)
  s = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), s)
  for wrapper in _WRAPPERS:
    s = s.replace(wrapper, "")
  s = s.strip().rstrip(".").strip()
  units = _NUMBER_WITH_UNITS.match(s)
  if units:
    s = units.group(1)
  return s.replace(" ", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def as_number(answer: str) -> fractions.Fraction | None:
  """The exact rational value of a normalised answer (integer, decimal, a/b, \\frac{a}{b}), else None."""
  try:
    if _DECIMAL.match(answer):
      return fractions.Fraction(answer)
    ratio = _RATIO.match(answer)
    if ratio:
      return fractions.Fraction(ratio.group(1)) / fractions.Fraction(ratio.group(2))
    frac = _FRAC.match(answer)
    if frac:
      sign, num, den = (frac.group(1), frac.group(2), frac.group(3)) if frac.group(2) else frac.group(4, 5, 6)
      value = fractions.Fraction(int(num), int(den))
      return -value if sign else value
  except ZeroDivisionError:
    return None
  return None


class _Verifier:
  """One math-verify worker process (`_verify_worker.py`) shared by all threads (a lock serialises requests).

  The worker is a fresh interpreter started with subprocess, not a multiprocessing child: "spawn" and
  "forkserver" re-import the caller's `__main__`, which crashes a script without a main guard, and "fork"
  copies a parent that runs JAX's threads. A reader thread moves its replies into a queue, so waiting for
  one is bounded (portably, pipes included).
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._process = None
    self._replies = None

  def _start(self):
    process = subprocess.Popen([sys.executable, "-P", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, encoding="ascii")
    replies = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, replies), daemon=True).start()
    try:
      ready = replies.get(timeout=_STARTUP_TIMEOUT_S)
    except queue.Empty:
      ready = None
    if ready != "ready":
      process.kill()
      process.wait()
      raise RuntimeError(f"the math-verify worker did not start (exit code {process.poll()}; its stderr is "
                         "above): is math-verify installed in this interpreter?")
    self._process, self._replies = process, replies

  def _stop(self):
    if self._process is not None:
      self._process.kill()
      self._process.wait()
      self._process.stdin.close()
      self._process.stdout.close()
    self._process = self._replies = None

  def verify(self, gold: str, predicted: str, timeout: float) -> bool | None:
    """math-verify's verdict, or None when it takes longer than `timeout` seconds (worker restarted)."""
    with self._lock:
      if self._process is None or self._process.poll() is not None:
        self._stop()
        self._start()
      try:
        self._process.stdin.write(json.dumps([gold, predicted]) + "\n")
        self._process.stdin.flush()
        reply = self._replies.get(timeout=timeout)
      except (BrokenPipeError, queue.Empty):
        reply = None
      if reply is None:  # stuck in sympy (only killing the process ends it), or the worker died
        self._stop()
        return None
      return json.loads(reply)

  def close(self):
    with self._lock:
      self._stop()


def _read_lines(stream, lines):
  """Reader thread: each line of `stream` (newline stripped) into `lines`, then None at end of file."""
  try:
    for line in stream:
      lines.put(line.rstrip("\n"))
  except (OSError, ValueError):  # the pipe was closed under us by _stop
    pass
  lines.put(None)


_VERIFIER = _Verifier()
atexit.register(_VERIFIER.close)


def grade(text: str, answer: str, *, finished: bool = True, timeout: float = VERIFY_TIMEOUT_S) -> str:
  """'correct', 'wrong', 'truncated' (not `finished`), 'no_answer' (nothing extracted) or 'timeout' (the
  symbolic check ran too long).

  finished: whether the completion ended with EOS within its token budget. A cut-off text is never correct,
  whatever it ends with: the last number of "6*7 = 42, but wait, I should double-check the" is not an answer.
  """
  if not finished:
    return "truncated"
  extracted = extract_answer(text)
  if extracted is None:
    return "no_answer"
  predicted, gold = normalise(extracted), normalise(answer)
  if predicted == gold:
    return "correct"
  predicted_value, gold_value = as_number(predicted), as_number(gold)
  if predicted_value is not None and gold_value is not None:  # both plain numbers: exact, no sympy
    return "correct" if predicted_value == gold_value else "wrong"
  verdict = _VERIFIER.verify(gold, predicted, timeout)
  if verdict is None:
    _LOG.warning("math-verify timed out after %.1f s or its worker died (counted wrong): answer %r vs "
                 "reference %r", timeout, predicted[:200], gold[:200])
    return "timeout"
  return "correct" if verdict else "wrong"


def is_correct(text: str, answer: str, *, finished: bool = True, timeout: float = VERIFY_TIMEOUT_S) -> bool:
  """Whether the final answer in `text` equals `answer` (a timeout, or a truncated text, counts as wrong)."""
  return grade(text, answer, finished=finished, timeout=timeout) == "correct"


def close():
  """Stops the math-verify worker (it restarts on the next symbolic check)."""
  _VERIFIER.close()
