"""kldistill_jax.data: tokenizers, the arithmetic task, file and tfds sources, templates, grain pipelines."""

import collections
import json
import pathlib
import pickle
import re
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kldistill_jax.data import arithmetic
from kldistill_jax.data import (ArithmeticTask, CharTokenizer, HFTokenizer, boxed_answer, encode_example,
                                eval_batches, extract_answer, format_prompt, is_correct,
                                is_valid_solution, load_tokenizer, make_dataset, read_jsonl, solutions,
                                tfds_source)
from kldistill_jax.data.tokenizers import CHAR_ALPHABET

DATA = pathlib.Path(__file__).parent / "data"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def char():
  return CharTokenizer()


def _build_hf_tokenizer(path, texts, *, pad_token=None):
  """A byte-level BPE tokenizer trained on `texts`, saved like a checkpoint's tokenizer files."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                              pad_token=pad_token, chat_template=CHAT_TEMPLATE)
  fast.save_pretrained(path)
  # Chat models end turns with another token; generation_config.json lists both.
  (pathlib.Path(path) / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
  return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  texts = [line for line in (DATA / "gsm8k_sample.jsonl").read_text().splitlines()]
  return _build_hf_tokenizer(tmp_path_factory.mktemp("hf_tokenizer"), texts)


# ------------------------------------------------------------------------------------------ tokenizers

def test_char_tokenizer_round_trip_and_special_ids(char):
  assert char.vocab_size % 8 == 0 and char.vocab_size >= len(CHAR_ALPHABET) + 2
  assert (char.pad_id, char.eos_id, char.eos_ids, char.name) == (0, 1, (1,), "char-v1")
  text = "Question: 3+5+2=\nAnswer:\n3+2=5,5+5=10#10 -7.?"
  ids = char.encode(text)
  assert min(ids) >= 2 and max(ids) < char.vocab_size and char.decode(ids) == text
  # Padding anywhere is dropped, decoding stops at the first EOS, unused ids stay visible.
  assert char.decode([0, 0] + char.encode("1+2") + [1] + char.encode("9")) == "1+2"
  assert char.decode([char.vocab_size - 1]) == "\ufffd"


def test_char_tokenizer_names_unknown_character(char):
  with pytest.raises(ValueError, match=r"character 'x' at position 2"):
    char.encode("3+x=")
  with pytest.raises(ValueError, match="no chat template"):
    format_prompt("3+5=", "chat", char)


def test_char_alphabet_covers_the_task_under_every_char_template(char):
  task = ArithmeticTask(300, difficulties=(2, 3, 4, 5, 6, 7, 8, 9))
  for i in range(len(task)):
    record = task[i]
    for template in ("raw", "plain"):
      prompt = format_prompt(record["prompt"], template, char)
      assert char.decode(char.encode(prompt)) == prompt
    assert char.decode(char.encode(record["response"])) == record["response"]


def test_hf_tokenizer_interface(hf_dir, tmp_path):
  tok = load_tokenizer(str(hf_dir))
  assert isinstance(tok, HFTokenizer) and isinstance(load_tokenizer("char"), CharTokenizer)
  assert tok.vocab_size == len(tok.tokenizer) == 300
  assert tok.eos_id == 0 and tok.eos_ids == (0, 2)
  assert tok.pad_id == tok.eos_id  # no pad token: falls back to EOS
  text = "Maya reads 15 pages of her book."
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode(tok.encode(text) + [2] + tok.encode(" more")) == text  # stops at any EOS
  chat = tok.apply_chat_template([{"role": "user", "content": "3+5=?"}])
  assert chat == "<|im_start|>user\n3+5=?<|im_end|>\n<|im_start|>assistant\n"
  assert format_prompt("3+5=?", "chat", tok) == chat
  assert tok.encode(chat)[0] == 1  # special tokens in the text are parsed, none are added

  # The name identifies the vocabulary: same files -> same name, another vocabulary -> another name.
  assert HFTokenizer(hf_dir).name == tok.name and "300" in tok.name
  other = HFTokenizer(_build_hf_tokenizer(tmp_path / "other", ["completely different words here"]))
  assert other.name != tok.name


def test_hf_tokenizer_with_pad_token(tmp_path):
  tok = HFTokenizer(_build_hf_tokenizer(tmp_path, ["a b c"], pad_token="<|im_start|>"))
  assert tok.pad_id == 1 and tok.eos_id == 0


def test_hf_tokenizer_missing_directory_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
    load_tokenizer(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------- arithmetic task

def test_generated_responses_are_valid_and_correct():
  task = ArithmeticTask(400, difficulties=(2, 3, 4, 5, 6))
  for i in range(len(task)):
    record = task[i]
    terms = arithmetic.parse_prompt(record["prompt"])
    assert len(terms) == record["difficulty"] and all(1 <= t <= 9 for t in terms)
    assert record["response"] in solutions(record["prompt"])
    assert is_valid_solution(record["prompt"], record["response"])
    assert record["answer"] == str(sum(terms)) == extract_answer(record["response"])
    assert is_correct(record["response"], record["answer"])


def test_several_valid_orders_and_the_generator_produces_them():
  assert len(solutions("1+2+3=")) == 6 and len(solutions("2+2+5=")) == 3
  assert all(is_valid_solution("1+2+3=", s) for s in solutions("1+2+3="))
  task = ArithmeticTask(2000, difficulties=(2,))
  seen, counts = collections.defaultdict(set), collections.Counter()
  for i in range(len(task)):
    seen[task[i]["prompt"]].add(task[i]["response"])
    counts[task[i]["prompt"]] += 1
  # Every problem with two distinct terms that recurs (about 30 times) shows both of its orders.
  frequent = [p for p in seen if len(solutions(p)) == 2 and counts[p] >= 10]
  assert len(frequent) > 20
  assert all(seen[p] == solutions(p) for p in frequent)
  # Larger problems: a fixed prompt appears rarely, but the first step varies across the data.
  task = ArithmeticTask(300, difficulties=(4,))
  first_is_prompt_order = [task[i]["response"].startswith(task[i]["prompt"][:3] + "=")
                           for i in range(len(task))]
  assert 0.02 < np.mean(first_is_prompt_order) < 0.3  # 2 of 12 ordered first pairs ~ 1/6


@pytest.mark.parametrize("response", [
    "1+2=4,4+3=7#7",      # wrong sum
    "1+2=3,3+3=6#7",      # wrong final answer
    "1+2=3,3+2=5#5",      # a term used twice, another never
    "1+2=3#3",            # a term missing
    "1+2=3,4+3=7#7",      # running sum not carried
    "1+2=3,3+3=6",        # no answer
    "1+2=3,,3+3=6#6",     # malformed step
    "1+2=3,3+3=6#6#6",    # trailing garbage
])
def test_invalid_solutions_are_rejected(response):
  assert is_valid_solution("1+2+3=", "1+2=3,3+3=6#6")
  assert not is_valid_solution("1+2+3=", response)


def test_response_length_grows_with_difficulty():
  task = ArithmeticTask(600, difficulties=(2, 3, 4, 5, 6))
  lengths = collections.defaultdict(list)
  for i in range(len(task)):
    lengths[task[i]["difficulty"]].append(len(task[i]["response"]))
  means = [np.mean(lengths[d]) for d in sorted(lengths)]
  assert sorted(lengths) == [2, 3, 4, 5, 6] and all(np.diff(means) > 3)


def test_task_is_deterministic_and_seeded():
  a, b, c = ArithmeticTask(50, seed=1), ArithmeticTask(50, seed=1), ArithmeticTask(50, seed=2)
  assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
  assert [a[i] for i in range(50)] != [c[i] for i in range(50)]
  assert a[7] == ArithmeticTask(1000, seed=1)[7]  # a record does not depend on the task size
  with pytest.raises(IndexError):
    a[50]  # pylint: disable=pointless-statement


def test_splits_never_share_a_problem():
  def problems(split, seed):
    task = ArithmeticTask(500, difficulties=(2, 3), seed=seed, split=split)
    return {tuple(sorted(arithmetic.parse_prompt(task[i]["prompt"]))) for i in range(len(task))}
  train, validation, test = problems("train", 0), problems("validation", 1), problems("test", 2)
  assert not train & validation and not train & test and not validation & test
  assert len(test) > 5
  held_out = ArithmeticTask(20, difficulties=(7,), split="test")  # held out by difficulty and split
  assert {held_out[i]["difficulty"] for i in range(20)} == {7}
  with pytest.raises(ValueError, match="unknown split"):
    ArithmeticTask(5, split="dev")


@pytest.mark.parametrize("text, expected", [
    ("1+2=3#3", "3"), ("... #### 72", "72"), ("#-4 apples", "-4"), ("#12.5", "12"), ("#1#2", "2"),
    ("no answer", None), ("#", None), ("#x1", None),
])
def test_extract_answer(text, expected):
  assert extract_answer(text) == expected


def test_is_correct_is_an_exact_integer_match():
  assert is_correct("3+4=7#7", "7") and is_correct("#07", "7") and not is_correct("#8", "7")
  assert not is_correct("no hash", "7") and not is_correct("#1", "\\frac{1}{2}")


# ------------------------------------------------------------------------------------------- sources

def test_read_gsm8k_sample():
  records = read_jsonl(DATA / "gsm8k_sample.jsonl", "gsm8k")
  assert len(records) == 6 and [r["answer"] for r in records] == ["12", "16", "27", "6", "45", "7"]
  assert records[0]["prompt"].startswith("A baker") and records[0]["response"].endswith("#### 12")
  assert all(is_correct(r["response"], r["answer"]) for r in records)


def test_read_math_sample_with_and_without_answer_keys():
  records = read_jsonl(DATA / "math_sample.jsonl", "math")
  assert [r["answer"] for r in records] == ["\\frac{5}{6}", "-5", "9", "5\\sqrt{2}", "-4", "\\frac{3}{4}"]
  rows = [json.loads(line) for line in (DATA / "math_sample.jsonl").read_text().splitlines()]
  assert {"answer" in row for row in rows} == {True, False}
  for row, record in zip(rows, records):  # the given answers agree with the boxed ones
    assert boxed_answer(row["solution"]) == record["answer"]
  assert boxed_answer("\\boxed{1} then \\boxed{\\frac{a^{2}}{b}}") == "\\frac{a^{2}}{b}"


GOOD_GSM8K = json.dumps({"question": "q", "answer": "a\n#### 3"})


@pytest.mark.parametrize("fmt, bad_line, message", [
    ("gsm8k", "{not json", "Expecting property name"),
    ("gsm8k", json.dumps({"question": "q"}), "missing key 'answer'"),
    ("gsm8k", json.dumps({"question": 3, "answer": "#### 3"}), "'question' must be a string"),
    ("gsm8k", json.dumps({"question": "q", "answer": "just 3"}), "no '#### <answer>'"),
    ("gsm8k", json.dumps(["q", "a"]), "expected a JSON object"),
    ("gsm8k", "", "blank line"),
    ("math", json.dumps({"problem": "p", "solution": "it is 3"}), "no \\\\boxed"),
    ("math", json.dumps({"problem": "p", "solution": "\\boxed{3"}), "unbalanced"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, fmt, bad_line, message):
  good = GOOD_GSM8K if fmt == "gsm8k" else json.dumps({"problem": "p", "solution": "\\boxed{3}"})
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join([good, good, bad_line, good]) + "\n")
  with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {fmt} record: .*{message}"):
    read_jsonl(path, fmt)


def test_jsonl_trailing_blank_lines_are_fine_but_empty_files_are_not(tmp_path):
  path = tmp_path / "ok.jsonl"
  path.write_text(GOOD_GSM8K + "\n\n  \n")
  assert len(read_jsonl(path, "gsm8k")) == 1
  path.write_text("\n")
  with pytest.raises(ValueError, match="no records"):
    read_jsonl(path, "gsm8k")
  with pytest.raises(ValueError, match="cannot read"):
    read_jsonl(tmp_path / "missing.jsonl", "gsm8k")
  with pytest.raises(ValueError, match="unknown data format"):
    read_jsonl(path, "csv")


def test_tfds_array_record_source_without_tensorflow(tfds_dir, char):
  source = tfds_source("kldistill_tiny_gsm8k", "train", str(tfds_dir), "question", "answer")
  assert len(source) == 4
  expected = {r["prompt"]: r for r in read_jsonl(DATA / "gsm8k_sample.jsonl", "gsm8k")}
  for i in range(len(source)):
    record = source[i]
    assert isinstance(record["prompt"], str) and record == expected[record["prompt"]]
  keyed = tfds_source("kldistill_tiny_gsm8k", "test", str(tfds_dir), "question", "answer",
                      answer_key="answer")
  assert len(keyed) == 2 and keyed[0]["answer"] == keyed[0]["response"]
  assert "tensorflow" not in sys.modules
  # grain reads it like any other source.
  tok = HFTokenizer(_build_hf_tokenizer(tfds_dir / "tok", [source[i]["response"] for i in range(4)]))
  batch = make_dataset(source, tok, template="plain", prompt_len=256, response_len=256, batch_size=2,
                       seed=0)[0]
  assert batch["prompt_tokens"].shape == (2, 256)
  with pytest.raises(ValueError, match="cannot open tfds kldistill_tiny_gsm8k\\[dev\\]"):
    tfds_source("kldistill_tiny_gsm8k", "dev", str(tfds_dir), "question", "answer")


# ----------------------------------------------------------------------------------------- templates

def test_templates(char):
  assert format_prompt("3+5=", "raw", char) == "3+5="
  assert format_prompt("3+5=", "plain", char) == "Question: 3+5=\nAnswer:\n"
  with pytest.raises(ValueError, match="data.template"):
    format_prompt("3+5=", "alpaca", char)


# ------------------------------------------------------------------------------------------ pipeline

def _check_row(tokenizer, row, record, template="raw"):
  prompt = tokenizer.encode(format_prompt(record["prompt"], template, tokenizer))
  response = tokenizer.encode(record["response"]) + [tokenizer.eos_id]
  p, r = len(prompt), len(response)
  assert list(row["prompt_tokens"][-p:]) == prompt
  assert list(row["prompt_mask"]) == [0] * (len(row["prompt_mask"]) - p) + [1] * p
  assert set(row["prompt_tokens"][:-p]) <= {tokenizer.pad_id}
  assert list(row["response_tokens"][:r]) == response
  assert set(row["response_tokens"][r:]) <= {tokenizer.pad_id}
  assert list(row["response_mask"]) == [1] * r + [0] * (len(row["response_mask"]) - r)


def test_encode_example_layout(char, hf_dir):
  record = dict(prompt="3+5+2=", response="3+2=5,5+5=10#10")
  row = encode_example(record, char, "raw", 10, 20, index=4)
  assert {k: (v.dtype, v.shape) for k, v in row.items()} == {
      "prompt_tokens": (np.int32, (10,)), "prompt_mask": (np.int32, (10,)), "index": (np.int64, ()),
      "response_tokens": (np.int32, (20,)), "response_mask": (np.int32, (20,))}
  assert row["index"] == 4
  _check_row(char, row, record)
  hf = HFTokenizer(hf_dir)
  gsm = read_jsonl(DATA / "gsm8k_sample.jsonl", "gsm8k")[0]
  row = encode_example(gsm, hf, "chat", 160, 160)
  _check_row(hf, row, gsm, "chat")
  assert hf.decode(row["response_tokens"]) == gsm["response"]


def test_too_long_records_name_the_field_and_record(char):
  record = dict(prompt="3+5+2=", response="3+2=5,5+5=10#10")
  with pytest.raises(ValueError, match=r"record 9: the prompt is 6 tokens, longer than data.prompt_len=5"):
    encode_example(record, char, "raw", 5, 20, index=9)
  with pytest.raises(ValueError, match=r"record 9: the response \+ EOS is 16 tokens, .*data.response_len=15"):
    encode_example(record, char, "raw", 6, 15, index=9)
  # Through the pipeline the error names the source index of the offending record.
  source = [dict(prompt="1+1=", response="1+1=2#2")] * 5 + [record]
  dataset = make_dataset(source, char, template="raw", prompt_len=5, response_len=20, batch_size=6,
                         seed=0)
  with pytest.raises(ValueError, match=r"record 5: the prompt .*data.prompt_len"):
    dataset[0]  # pylint: disable=pointless-statement


def _make(source, tokenizer, **kwargs):
  settings = dict(template="raw", prompt_len=16, response_len=48, batch_size=4, seed=3)
  return make_dataset(source, tokenizer, **{**settings, **kwargs})


def test_batches_hold_the_indexed_records(char):
  task = ArithmeticTask(40)
  dataset = _make(task, char)
  for step in range(3):
    batch = dataset[step]
    assert batch["prompt_tokens"].shape == (4, 16) and batch["index"].dtype == np.int64
    for row, index in enumerate(batch["index"]):
      _check_row(char, {k: v[row] for k, v in batch.items()}, task[int(index)])


def test_shuffling_is_seeded_and_changes_per_epoch(char):
  task = ArithmeticTask(24)
  order = lambda ds, n: np.concatenate([ds[i]["index"] for i in range(n)]).tolist()
  epochs = order(_make(task, char, seed=3), 12)
  first, second = epochs[:24], epochs[24:]
  assert sorted(first) == sorted(second) == list(range(24)) and first != second
  assert epochs == order(_make(task, char, seed=3), 12)
  assert first != order(_make(task, char, seed=4), 6)
  assert order(_make(task, char, shuffle=False), 6) == list(range(24))
  assert len(_make(task, char, num_epochs=2, batch_size=5)) == 9  # 48 // 5; the rest is dropped


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(char, process_count):
  task = ArithmeticTask(50)
  single = _make(task, char, batch_size=8)
  shards = [_make(task, char, batch_size=8 // process_count, process_index=i,
                  process_count=process_count) for i in range(process_count)]
  for step in range(8):  # crosses the epoch boundary (50 records)
    expected = single[step]
    for key, value in expected.items():
      np.testing.assert_array_equal(np.concatenate([s[step][key] for s in shards]), value)
  finite = [_make(task, char, batch_size=3, num_epochs=1, process_index=i, process_count=2)
            for i in range(2)]
  assert len(finite[0]) == len(finite[1]) == 8  # 16 local batches of 3 in 50 rows, 8 per process
  with pytest.raises(ValueError, match="process_index 2"):
    _make(task, char, process_index=2, process_count=2)


def test_datasets_pickle_for_grain_workers(char, hf_dir):
  gsm = read_jsonl(DATA / "gsm8k_sample.jsonl", "gsm8k")
  for source, tok, template in [(ArithmeticTask(20), char, "raw"), (gsm, HFTokenizer(hf_dir), "chat")]:
    dataset = _make(source, tok, template=template, prompt_len=200, response_len=200, batch_size=2)
    copy = pickle.loads(pickle.dumps(dataset))
    for key, value in dataset[1].items():
      np.testing.assert_array_equal(copy[1][key], value)


def test_iterator_state_resumes_exactly(char):
  dataset = _make(ArithmeticTask(30), char)
  iterator = iter(dataset)
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  resumed = iter(dataset)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_iterator_state_through_orbax(char, tmp_path):
  dataset = _make(ArithmeticTask(30), char)
  iterator = iter(dataset)
  for _ in range(3):
    next(iterator)
  manager = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2))
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator),
                                          meta=ocp.args.JsonSave({"step": 3})))
  manager.wait_until_finished()
  expected = [next(iterator) for _ in range(2)]
  manager.close()

  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  resumed = iter(dataset)
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(resumed), meta=ocp.args.JsonRestore()))
  assert restored["meta"] == {"step": 3}
  for want in expected:
    got = next(restored["data"])
    assert all(np.array_equal(got[k], want[k]) for k in want)
  manager.close()


def test_eval_batches_cover_each_record_once(char):
  task = ArithmeticTask(30, split="test")
  batches = eval_batches(task, char, template="plain", prompt_len=32, batch_size=4, limit=10)
  assert len(batches) == 3 and batches[-1]["valid"].tolist() == [1, 1, 0, 0]
  assert [i for b in batches for i, v in zip(b["index"], b["valid"]) if v] == list(range(10))
  assert batches[-1]["index"].tolist() == [8, 9, 9, 9]
  assert char.decode(batches[0]["prompt_tokens"][1]) == format_prompt(task[1]["prompt"], "plain", char)
  assert set(batches[0]) == {"prompt_tokens", "prompt_mask", "index", "valid"}
  shards = [eval_batches(task, char, template="plain", prompt_len=32, batch_size=2, limit=10,
                         process_index=i, process_count=2) for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == 3
  for k, batch in enumerate(batches):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([s[k][key] for s in shards]), batch[key])
  assert len(eval_batches(task, char, template="raw", prompt_len=32, batch_size=8)) == 4  # limit=None
