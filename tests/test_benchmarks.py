"""Benchmark files for evaluation: the GSM8K / MATH / AIME / AMC JSONL layouts, "name=format:path" specs,
config.eval.benchmarks, and one evaluation of a random model reported per benchmark."""

import json
import re

import jax
import pytest

import config_files
from kldistill_jax import data, evaluation, rewards
from kldistill_jax.data import read_benchmark, read_jsonl, sources
from kldistill_jax.train import setup


def write_jsonl(path, rows):
  path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
  return path


GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                 "May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "A farm has 1,200 hens. How many eggs in a week at one egg each per day?",
     "answer": "1,200 * 7 = 8,400\n#### 8,400"},
]
MATH_ROWS = [
    {"problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "Adding, $\\frac{1}{4} + \\frac{1}{4} = \\boxed{\\frac{1}{2}}$."},
    {"problem": "Compute $\\sqrt{16}$.", "solution": "It is $\\boxed{4}$.", "answer": "4",
     "unique_id": "test/algebra/1.json"},
]
AIME_ROWS = [  # AI-MO/aimo-validation-aime (lower case, integer answers) and AIME 2025 files (strings)
    {"id": 60, "problem": "Find the remainder when $9 \\times 99 \\times \\cdots$ is divided by $1000$.",
     "solution": "The product is $\\equiv 109 \\pmod{1000}$, so the answer is $\\boxed{109}$.", "answer": 109,
     "url": "https://artofproblemsolving.com/wiki/index.php/2010_AIME_I_Problems/Problem_2"},
    {"id": "I-1", "problem": "Find the sum of all integer bases $b>9$ for which $17_b$ divides $97_b$.",
     "answer": "70"},
    {"ID": "2024-II-4", "Problem": "Let $x,y,z$ be positive reals ...", "Solution": "... $\\boxed{33}$",
     "Answer": "033", "year": 2024},
]
AMC_ROWS = [  # AI-MO/aimo-validation-amc: float answers
    {"id": 0, "problem": "Cities $A$ and $B$ are $45$ miles apart. How many miles from City $A$ will they "
                         "be when they meet?", "answer": 27.0, "url": "https://artofproblemsolving.com/..."},
    {"id": 1, "problem": "What is the probability of heads?", "answer": 0.5},
    {"id": 2, "problem": "Find $n$.", "answer": 142.0, "solution": "So $n=\\boxed{142}$."},
    {"id": 3, "problem": "A tiny number.", "answer": 1e-07},
    {"id": 4, "problem": "Which is larger?", "answer": " \\frac{3}{4} "},
    {"id": 5, "problem": "An integer.", "answer": -3},
]


def test_gsm8k_and_math_records(tmp_path):
  gsm8k = read_jsonl(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS), "gsm8k")
  assert gsm8k == [dict(prompt=GSM8K_ROWS[0]["question"], response=GSM8K_ROWS[0]["answer"], answer="72"),
                   dict(prompt=GSM8K_ROWS[1]["question"], response=GSM8K_ROWS[1]["answer"], answer="8400")]
  math = read_jsonl(write_jsonl(tmp_path / "math.jsonl", MATH_ROWS), "math")
  assert math == [dict(prompt="What is $\\frac{1}{4} + \\frac{1}{4}$?", response=MATH_ROWS[0]["solution"],
                       answer="\\frac{1}{2}"),
                  dict(prompt="Compute $\\sqrt{16}$.", response="It is $\\boxed{4}$.", answer="4")]


def test_aime_records(tmp_path):
  records = read_jsonl(write_jsonl(tmp_path / "aime.jsonl", AIME_ROWS), "aime")
  assert records == [dict(prompt=AIME_ROWS[0]["problem"], response=AIME_ROWS[0]["solution"], answer="109"),
                     dict(prompt=AIME_ROWS[1]["problem"], response="", answer="70"),
                     dict(prompt="Let $x,y,z$ be positive reals ...", response="... $\\boxed{33}$",
                          answer="033")]


def test_amc_records(tmp_path):
  records = read_jsonl(write_jsonl(tmp_path / "amc.jsonl", AMC_ROWS), "amc")
  assert [r["answer"] for r in records] == ["27", "0.5", "142", "0.0000001", "\\frac{3}{4}", "-3"]
  assert [r["prompt"] for r in records] == [row["problem"] for row in AMC_ROWS]
  assert [r["response"] for r in records] == ["", "", "So $n=\\boxed{142}$.", "", "", ""]
  assert all(set(r) == {"prompt", "response", "answer"} for r in records)
  assert rewards.is_correct("so \\boxed{142}", records[2]["answer"])  # graded as numbers, not '142.0'


@pytest.mark.parametrize("value, expected", [(142.0, "142"), (0.5, "0.5"), (-2.25, "-2.25"), (0.1, "0.1"),
                                             (1e20, "1" + "0" * 20), (7, "7"), (" 1 ", "1"), ("1/3", "1/3")])
def test_number_answer(value, expected):
  assert sources.number_answer(value) == expected


GOOD = {"gsm8k": {"question": "q", "answer": "a\n#### 3"}, "math": {"problem": "p", "solution": "\\boxed{3}"},
        "aime": {"problem": "p", "answer": 3}, "amc": {"problem": "p", "answer": 0.5}}


@pytest.mark.parametrize("fmt, bad_line, message", [
    ("aime", json.dumps({"problem": "p", "answer": True}), "answer must be a number or a string, got bool"),
    ("amc", json.dumps({"problem": "p", "answer": False}), "answer must be a number or a string, got bool"),
    ("amc", json.dumps({"problem": "p", "answer": None}), "got NoneType"),
    ("amc", json.dumps({"problem": "p", "answer": [1]}), "got list"),
    ("aime", json.dumps({"problem": "p"}), "missing key 'answer'"),
    ("amc", json.dumps({"answer": 3}), "missing key 'problem'"),
    ("aime", json.dumps({"problem": 7, "answer": 3}), "'problem' must be a string, got int"),
    ("aime", json.dumps({"problem": "p", "answer": 3, "solution": 5}), "'solution' must be a string"),
    ("aime", json.dumps({"problem": "p", "answer": 2.5}), "an AIME answer is an integer, got '2.5'"),
    ("aime", json.dumps({"problem": "p", "answer": "x=3"}), "an AIME answer is an integer, got 'x=3'"),
    ("amc", json.dumps({"problem": "p", "answer": "  "}), "empty answer"),
    ("amc", '{"problem": "p", "answer": NaN}', "the answer must be finite"),
    ("aime", json.dumps(["p", 3]), "expected a JSON object, got list"),
    ("amc", json.dumps("p"), "expected a JSON object, got str"),
    ("aime", "{not json", "Expecting property name"),
    ("amc", "", "blank line"),
])
def test_bad_line_names_file_and_line(tmp_path, fmt, bad_line, message):
  good = json.dumps(GOOD[fmt])
  path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad_line, good])
  with pytest.raises(ValueError) as error:
    read_jsonl(path, fmt)
  assert str(error.value).startswith(f"{path}:3: {fmt} record: ")
  assert message in str(error.value)


def test_unknown_format_lists_every_format(tmp_path):
  path = write_jsonl(tmp_path / "ok.jsonl", [GOOD["aime"]])
  with pytest.raises(
      ValueError, match=r"unknown data format 'aime25' \(expected one of gsm8k, math, aime, amc, chat\)"):
    read_jsonl(path, "aime25")
  assert data.read_benchmark is read_benchmark


def test_read_benchmark_tags_each_record(tmp_path):
  path = write_jsonl(tmp_path / "amc23.jsonl", AMC_ROWS[:2])
  assert read_benchmark(f"amc23=amc:{path}") == [
      dict(prompt=AMC_ROWS[0]["problem"], response="", answer="27", benchmark="amc23"),
      dict(prompt=AMC_ROWS[1]["problem"], response="", answer="0.5", benchmark="amc23")]
  colon = write_jsonl(tmp_path / "a:b.jsonl", AIME_ROWS[1:2])  # the path is everything after the first ':'
  assert read_benchmark(f"aime25=aime:{colon}") == [
      dict(prompt=AIME_ROWS[1]["problem"], response="", answer="70", benchmark="aime25")]


@pytest.mark.parametrize("spec, message", [
    ("aime24:/data/aime24.jsonl", "malformed benchmark spec 'aime24:/data/aime24.jsonl': expected "
                                  '"name=format:path" with format one of gsm8k, math, aime, amc'),
    ("aime24=/data/aime24.jsonl", "malformed benchmark spec 'aime24=/data/aime24.jsonl': expected"),
    ("aime24=aime:", "malformed benchmark spec 'aime24=aime:': expected"),
    ("=aime:/data/aime24.jsonl", "benchmark spec '=aime:/data/aime24.jsonl' has an empty name: expected"),
    (" =aime:/data/aime24.jsonl", "has an empty name"),
    ("aime24=csv:/data/aime24.jsonl", "benchmark spec 'aime24=csv:/data/aime24.jsonl': unknown format 'csv': "
                                      'expected "name=format:path"'),
    (("aime24", "aime", "/x"), "benchmark spec ('aime24', 'aime', '/x') is not a string"),
])
def test_read_benchmark_bad_spec(spec, message):
  with pytest.raises(ValueError) as error:
    read_benchmark(spec)
  assert message in str(error.value)


def test_read_benchmark_bad_file_names_the_line(tmp_path):
  path = write_jsonl(tmp_path / "aime.jsonl", [GOOD["aime"], {"problem": "p", "answer": "1.5"}])
  expected = f"{path}:2: aime record: an AIME answer is an integer, got '1.5'"
  with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
    read_benchmark(f"aime24=aime:{path}")
  with pytest.raises(ValueError, match="cannot read"):
    read_benchmark(f"aime24=aime:{tmp_path / 'missing.jsonl'}")


def benchmark_config(**overrides):
  return config_files.load("quickstart", **{"eval.batch_size": 8, "eval.max_new_tokens": 6, **overrides})


def test_eval_records_concatenate_tagged_benchmarks(tmp_path):
  aime = write_jsonl(tmp_path / "aime.jsonl", AIME_ROWS)
  amc = write_jsonl(tmp_path / "amc.jsonl", AMC_ROWS)
  gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
  config = benchmark_config(**{"eval.benchmarks": (f"aime24=aime:{aime}", f"amc23=amc:{amc}",
                                                   f"gsm8k=gsm8k:{gsm8k}")})
  records = setup.eval_records(config)
  assert records == ([dict(r, benchmark="aime24") for r in read_jsonl(aime, "aime")]
                     + [dict(r, benchmark="amc23") for r in read_jsonl(amc, "amc")]
                     + [dict(r, benchmark="gsm8k") for r in read_jsonl(gsm8k, "gsm8k")])
  assert [r["benchmark"] for r in records] == ["aime24"] * 3 + ["amc23"] * 6 + ["gsm8k"] * 2
  assert setup.answer_check(config) is rewards.is_correct  # not the built-in task's '#N' check


def test_eval_records_without_benchmarks_is_the_eval_split():
  config = benchmark_config(**{"eval.num_problems": 5})
  assert config.eval.benchmarks == ()
  records = setup.eval_records(config)
  assert [records[i] for i in range(5)] == [setup.make_source(config, "test")[i] for i in range(5)]
  assert len(records) == 5 and "benchmark" not in records[0]
  assert setup.answer_check(config) is data.is_correct


def test_eval_records_errors_name_the_field(tmp_path):
  aime = write_jsonl(tmp_path / "aime.jsonl", AIME_ROWS)
  amc = write_jsonl(tmp_path / "amc.jsonl", AMC_ROWS)
  twice = benchmark_config(**{"eval.benchmarks": (f"test=aime:{aime}", f"test=amc:{amc}")})
  with pytest.raises(ValueError, match=r"^eval\.benchmarks names 'test' twice"):
    setup.eval_records(twice)
  malformed = benchmark_config(**{"eval.benchmarks": (f"aime24=aime:{aime}", str(amc))})
  with pytest.raises(ValueError, match=r"^eval\.benchmarks: malformed benchmark spec '.*amc\.jsonl'"):
    setup.eval_records(malformed)


class Recorder:
  """A `check` that remembers the reference answers it was asked about, in call order."""

  def __init__(self, check):
    self.check, self.answers = check, []

  def __call__(self, text, answer):
    self.answers.append(answer)
    return self.check(text, answer)


def test_random_model_evaluated_per_benchmark(tmp_path):
  # Prompts the character tokenizer can encode; answers in the AIME / AMC layouts.
  aime = write_jsonl(tmp_path / "aime.jsonl", [{"problem": f"Q: {a}+{b}=?", "answer": str(a + b)}
                                               for a, b in ((1, 2), (30, 4), (7, 7))])
  amc = write_jsonl(tmp_path / "amc.jsonl", [{"problem": "Q: 1-0.5=?", "answer": 0.5},
                                             {"problem": "Q: 140+2=?", "answer": 142.0},
                                             {"problem": "Q: 9+9=?", "answer": 18},
                                             {"problem": "Q: 3.5+1=?", "answer": 4.5},
                                             {"problem": "Q: 2-5=?", "answer": -3.0}])
  config = benchmark_config(**{"eval.benchmarks": (f"aime24=aime:{aime}", f"amc23=amc:{amc}"),
                               "student.model.num_layers": 1})
  records, check = setup.eval_records(config), Recorder(setup.answer_check(config))
  mesh = setup.make_mesh(config)
  tokenizer = data.load_tokenizer(config.data.tokenizer)
  with jax.set_mesh(mesh):
    model = setup.load_model(config.student, "student", tokenizer.vocab_size, mesh, seed=0)
    results = evaluation.evaluate(model, records, tokenizer, check=check, template=config.data.template,
                                  prompt_len=config.data.prompt_len, max_new_tokens=6, temperature=0.0,
                                  batch_size=8, rng=jax.random.key(0), mesh=mesh,
                                  truncated_is_wrong=False)  # a random model never stops: grade it anyway
  assert check.answers == ["3", "34", "14", "0.5", "142", "18", "4.5", "-3"]
  groups = results["by_group"]
  assert list(groups) == ["aime24", "amc23"]
  assert {name: g["num_problems"] for name, g in groups.items()} == {"aime24": 3, "amc23": 5}
  assert results["num_problems"] == 8
  accuracy = sum(g["accuracy"] * g["num_problems"] for g in groups.values()) / 8
  assert accuracy == pytest.approx(results["accuracy"])


def test_distill_run_evaluates_on_benchmark_files(tmp_path):
  """The runner's held-out evaluation IS the benchmark files when eval.benchmarks is set: one group per file,
  graded by answer extraction (the shipped teacher answers the built-in format '3+5=8#8')."""
  from kldistill_jax.train import runner  # pylint: disable=g-import-not-at-top
  from test_bad_input import tiny_config  # pylint: disable=g-import-not-at-top
  pairs = [(3, 5), (1, 1), (9, 2), (4, 4), (7, 6), (2, 8), (5, 5), (6, 1)]
  gsm8k = write_jsonl(tmp_path / "sums.jsonl", [{"question": f"{a}+{b}=", "answer": f"{a}+{b}=#### {a + b}"}
                                                for a, b in pairs])
  amc = write_jsonl(tmp_path / "amc.jsonl", [{"problem": f"{a}+{b}=", "answer": float(a + b)} for a, b in pairs[:3]])
  config = tiny_config(**{"eval.benchmarks": (f"sums=gsm8k:{gsm8k}", f"amc=amc:{amc}"), "steps": 1})
  summary = runner.run_distill(config, tmp_path / "run")
  teacher = summary["teacher"]["by_group"]
  assert {name: g["num_problems"] for name, g in teacher.items()} == {"sums": 8, "amc": 3}
  assert teacher["sums"]["accuracy"] >= 0.75 and teacher["amc"]["accuracy"] >= 2 / 3
  assert set(summary["student after"]["by_group"]) == {"sums", "amc"}
