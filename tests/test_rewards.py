"""Answer extraction and verification on tricky answers; truncated texts; thread safety; the time bound
per answer; grading from a plain script (the worker does not re-import the caller's __main__)."""

import concurrent.futures
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

from kldistill_jax import rewards

# (model text, reference answer, expected verdict)
CASES = [
    # formats
    ("so she has #### 1,000", "1000", True),
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72", True),
    ("The answer is \\boxed{42}.", "42", True),
    ("3+2=5,5+5=10#10", "10", True),  # the built-in task
    ("3+2=5,5+5=10#11", "10", False),
    ("First 3 apples, then 4 more, so 7 apples.", "7", True),  # last number fallback
    ("no answer at all", "7", False),
    ("\\boxed{\\frac{a}{\\sqrt{b}}} then \\boxed{\\frac{1}{2}}", "0.5", True),  # the last box, nested
    # thousands separators
    ("The total is 1,234,567.", "1234567", True),
    ("#### 1,000", "1,000", True),
    ("\\boxed{1{,}000}", "1000", True),
    ("\\boxed{10,000}", "1000", False),
    # units and words
    ("#### $18", "18", True),
    ("\\boxed{\\$18}", "18", True),
    ("#### 18 dollars", "18", True),
    ("\\boxed{18\\text{ dollars}}", "18", True),
    ("#### 18%", "18", True),
    ("\\boxed{18\\%}", "18", True),
    ("#### 18 dollars", "19", False),
    ("\\boxed{90^\\circ}", "90", True),
    # fractions and LaTeX
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{\\dfrac{1}{2}}", "1/2", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\tfrac12}", "0.5", True),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{3}}", "0.33", False),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", True),
    ("\\boxed{-\\frac{3}{4}}", "0.75", False),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True),  # symbolic: math-verify
    ("\\boxed{2\\pi}", "\\pi", False),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    # negatives and trailing periods
    ("The temperature fell to -5.", "-5", True),
    ("#### -5", "5", False),
    ("#\u2212 5", "-5", False),  # no integer after the built-in '#': falls back to the last number 5
    ("\\boxed{\u22125}", "-5", True),
    ("The answer is 12.", "12", True),
    ("The answer is 12.50", "12.5", True),
    ("\\boxed{7.}", "7", True),
]


@pytest.mark.parametrize("text, answer, expected", CASES)
def test_is_correct_on_tricky_answers(text, answer, expected):
  assert rewards.is_correct(text, answer) is expected


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{\\frac{1}{\\sqrt{2}}} is it", "\\frac{1}{\\sqrt{2}}"),
    ("#### 1,000", "1000"),
    ("3+2=5#5", "5"),
    ("Total: 1,234 and then 17.5", "17.5"),
    ("nothing", None),
])
def test_extract_answer(text, expected):
  assert rewards.extract_answer(text) == expected


def test_grade_says_why():
  assert rewards.grade("nothing here", "3") == "no_answer"
  assert rewards.grade("#### 3", "3") == "correct"
  assert rewards.grade("#### 4", "3") == "wrong"


def test_a_truncated_completion_is_never_correct():
  cut = "<think>Let me compute. 6*7 = 42, but wait, I should double-check the"  # issue 11: no EOS
  assert rewards.grade(cut, "42") == "correct"  # the text alone cannot tell: its last number is 42
  assert rewards.grade(cut, "42", finished=False) == "truncated"
  assert not rewards.is_correct(cut, "42", finished=False)
  assert not rewards.is_correct("\\boxed{42}", "42", finished=False)  # even a complete-looking answer
  assert rewards.is_correct("\\boxed{42}", "42", finished=True)


def test_grade_from_a_script_without_main_guard(tmp_path):
  """The symbolic check's worker must not re-run the caller's script (multiprocessing "spawn" did, and
  crashed in its bootstrap)."""
  assert rewards.as_number(rewards.normalise("\\sqrt{4}")) is None  # so the case below reaches math-verify
  script = tmp_path / "plain.py"
  script.write_text(textwrap.dedent("""\
      from kldistill_jax import rewards
      print("RAN")  # printed once per run of this file: twice if the worker re-ran it
      print(rewards.grade("\\\\boxed{\\\\sqrt{4}}", "2"), rewards.grade("\\\\boxed{\\\\sqrt{5}}", "2"))
  """))
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split() == ["RAN", "correct", "wrong"], run.stdout + run.stderr[-3000:]


def test_same_verdicts_from_four_threads():
  expected = [rewards.is_correct(t, a) for t, a, _ in CASES]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    runs = [pool.submit(lambda: [rewards.is_correct(t, a) for t, a, _ in CASES]) for _ in range(4)]
    assert all(run.result(timeout=60) == expected for run in runs)


def test_pathological_answer_times_out_within_the_bound(caplog):
  rewards.is_correct("\\boxed{\\sqrt{2}}", "\\sqrt{2}+0")  # worker started: its startup is not timed
  slow = "\\boxed{" + "+".join(f"(x+{i})^{{{50 + i}}}" for i in range(40)) + "}"
  start = time.perf_counter()
  verdict = rewards.grade(slow, "(x+1)^{99}", timeout=0.5)
  elapsed = time.perf_counter() - start
  assert elapsed < 3.0 and verdict == "timeout"  # unbounded, this one takes seconds
  assert "timed out" in caplog.text
  assert rewards.is_correct("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}")  # a fresh worker
  rewards.close()  # no worker process outlives the tests
