"""Every record is length-checked before any compute (data.too_long): errors name file:line, "skip" drops the
records that do not fit (logged per file) and the pipeline then indexes the kept records only."""

import json
import logging
import re

import numpy as np
import pytest

from kldistill_jax import data
from kldistill_jax.data import CharTokenizer, HFTokenizer, check_lengths, make_dataset, read_jsonl
from kldistill_jax.data import validate
from kldistill_jax.train import runner, setup
from test_bad_input import tiny_config
from test_data import DATA, encode_example, hf_dir  # pylint: disable=unused-import  (a fixture)

# prompt_len 12, response_len 36 (the arithmetic preset). Line 3's prompt has 22 characters = tokens.
ROWS = [{"question": "1+2=", "answer": "1+2=3#### 3"},
        {"question": "4+4=", "answer": "4+4=8#### 8"},
        {"question": "1+2+3+4+5+6+7+8+9+1+2=", "answer": "#### 48"},
        {"question": "2+5=", "answer": "2+5=7#### 7"},
        {"question": "3+3=", "answer": "3+3=6#### 6"}]


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return path


def gsm8k_config(train, held_out=None, **overrides):
  return tiny_config(**{"data.source": "gsm8k", "data.train_path": str(train),
                        "data.eval_path": str(held_out or train), **overrides})


@pytest.fixture(name="char")
def char_tokenizer():
  return CharTokenizer()


def test_too_long_record_names_file_and_line(tmp_path, char):
  path = write_jsonl(tmp_path / "train.jsonl", ROWS)
  expected = f"{path}:3: prompt has 22 tokens > data.prompt_len=12"
  with pytest.raises(ValueError, match=re.escape(expected)) as error:
    setup.make_source(gsm8k_config(path), "train", char)
  assert str(error.value).startswith("1 of 5 training records are too long; nothing is truncated: raise "
                                     "data.prompt_len / data.response_len, or set data.too_long='skip'")
  assert setup.make_source(gsm8k_config(path), "train") == read_jsonl(path, "gsm8k")  # unchecked without one


def test_run_fails_on_a_long_record_before_any_model_is_built(tmp_path, monkeypatch):
  path = write_jsonl(tmp_path / "train.jsonl", ROWS)

  def no_model(*args, **kwargs):
    raise AssertionError("a model was built before the data was checked")

  monkeypatch.setattr(setup, "load_model", no_model)
  with pytest.raises(ValueError, match=re.escape(f"{path}:3: prompt has 22 tokens > data.prompt_len=12")):
    runner.run_distill(gsm8k_config(path), tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_long_response_counts_for_training_but_not_for_held_out_records(tmp_path, char):
  rows = [dict(ROWS[0]), {"question": "9+9=", "answer": "9+9=18, 9+9=18, 9+9=18, 9+9=18, #### 18"}]
  path = write_jsonl(tmp_path / "data.jsonl", rows)
  config = gsm8k_config(path)
  with pytest.raises(ValueError, match=re.escape(f"{path}:2: response + EOS has 40 tokens > "
                                                 "data.response_len=36")):
    setup.make_source(config, "train", char)
  assert len(setup.eval_records(config, char)) == 2  # evaluation encodes prompts only


def test_skip_drops_the_long_records_logs_them_and_the_dataset_has_the_rest(tmp_path, char, caplog):
  path = write_jsonl(tmp_path / "train.jsonl", ROWS)
  config = gsm8k_config(path, **{"data.too_long": "skip"})
  with caplog.at_level(logging.WARNING):
    source = setup.make_source(config, "train", char)
  assert f"dropped 1 of 5 training records of {path}" in caplog.text
  kept = [row for i, row in enumerate(ROWS) if i != 2]
  assert [r["prompt"] for r in source] == [row["question"] for row in kept]
  assert source.origins == [f"{path}:{line}" for line in (1, 2, 4, 5)]
  dataset = make_dataset(source, char, template="raw", prompt_len=12, response_len=36, batch_size=4, seed=0,
                         shuffle=False, num_epochs=1)
  assert len(dataset) == 1
  batch = dataset[0]
  assert batch["index"].tolist() == [0, 1, 2, 3]  # indices over the kept records
  assert [char.decode(row[row > 0]) for row in batch["prompt_tokens"]] == [row["question"] for row in kept]
  # Shuffled and repeated, every epoch is exactly the kept records.
  shuffled = make_dataset(source, char, template="raw", prompt_len=12, response_len=36, batch_size=4, seed=0)
  assert sorted(shuffled[0]["index"].tolist()) == [0, 1, 2, 3]


def test_error_counts_every_offender_and_names_the_first_five(tmp_path, char):
  rows = [ROWS[2]] * 8 + [ROWS[0]] * 2
  path = write_jsonl(tmp_path / "train.jsonl", rows)
  with pytest.raises(ValueError) as error:
    setup.make_source(gsm8k_config(path), "train", char)
  message = str(error.value)
  assert message.startswith("8 of 10 training records are too long")
  assert re.findall(r":(\d+): prompt has", message) == ["1", "2", "3", "4", "5"]
  with pytest.raises(ValueError, match="all 10 training records are too long"):
    setup.make_source(gsm8k_config(write_jsonl(tmp_path / "all.jsonl", [ROWS[2]] * 10),
                                   **{"data.too_long": "skip"}), "train", char)


def test_benchmark_records_name_their_file_and_line(tmp_path, char, caplog):
  short = write_jsonl(tmp_path / "short.jsonl", [{"problem": "1+1=", "answer": 2}])
  amc = write_jsonl(tmp_path / "amc.jsonl", [{"problem": "2+2=", "answer": 4},
                                             {"problem": "1+2+3+4+5+6+7=", "answer": 28}])
  benchmarks = (f"a=amc:{short}", f"b=amc:{amc}")
  with pytest.raises(ValueError, match=re.escape(f"1 of 3 held-out records are too long; nothing is truncated: "
                                                 f"raise data.prompt_len, or")) as error:
    setup.eval_records(tiny_config(**{"eval.benchmarks": benchmarks}), char)
  assert f"{amc}:2: prompt has 14 tokens > data.prompt_len=12" in str(error.value)
  with caplog.at_level(logging.WARNING):
    records = setup.eval_records(tiny_config(**{"eval.benchmarks": benchmarks, "data.too_long": "skip"}), char)
  assert [(r["benchmark"], r["answer"]) for r in records] == [("a", "2"), ("b", "4")]
  assert f"dropped 1 of 2 held-out records of {amc}" in caplog.text and str(short) not in caplog.text


def test_unencodable_and_empty_prompts_name_the_line_in_either_mode(tmp_path, char):
  bad_char = write_jsonl(tmp_path / "x.jsonl", [ROWS[0], {"question": "1+x=", "answer": "#### 1"}])
  for mode in validate.TOO_LONG:
    with pytest.raises(ValueError, match=re.escape(f"{bad_char}:2: character 'x' at position 2")):
      setup.make_source(gsm8k_config(bad_char, **{"data.too_long": mode}), "train", char)
  empty = write_jsonl(tmp_path / "empty.jsonl", [ROWS[0], ROWS[1], {"question": "", "answer": "#### 1"}])
  with pytest.raises(ValueError, match=re.escape(f"{empty}:3: empty prompt")):
    setup.make_source(gsm8k_config(empty, **{"data.too_long": "skip"}), "train", char)
  with pytest.raises(ValueError, match=r"data\.too_long must be one of 'error', 'skip', got 'truncate'"):
    setup.make_source(gsm8k_config(empty, **{"data.too_long": "truncate"}), "train", char)


def test_built_in_task_is_checked_through_its_longest_problem(tmp_path, char):
  assert isinstance(setup.make_source(tiny_config(), "train", char), data.ArithmeticTask)
  # 6 terms: the prompt '9+9+9+9+9+9=' fits in 12; '9+9=18,18+9=27,...#54' + EOS is 42 tokens.
  with pytest.raises(ValueError, match=re.escape("the built-in task's longest problem '9+9+9+9+9+9=' "
                                                 "(difficulty 6): response + EOS has 42 tokens > "
                                                 "data.response_len=36")):
    setup.make_source(tiny_config(**{"data.difficulties": (2, 6), "data.too_long": "skip"}), "train", char)
  # Held-out problems are prompts only: 7 terms (14 tokens) do not fit data.prompt_len=12.
  with pytest.raises(ValueError, match="prompt has 14 tokens > data.prompt_len=12"):
    setup.eval_records(tiny_config(**{"eval.difficulties": (7,)}), char)
  task = data.ArithmeticTask(2000, difficulties=(2, 5, 9), seed=1)
  longest = task.longest()
  assert all(len(task[i]["prompt"]) <= len(longest["prompt"]) and
             len(task[i]["response"]) <= len(longest["response"]) for i in range(len(task)))


def test_check_agrees_with_the_pipeline_under_a_chat_template(hf_dir):
  # The check measures exactly what encode_example encodes (template, BPE, EOS): at each limit, the records
  # it keeps are the ones the pipeline accepts.
  tokenizer = HFTokenizer(hf_dir)
  records = read_jsonl(DATA / "gsm8k_sample.jsonl", "gsm8k")
  for prompt_len, response_len in ((96, 200), (100, 200), (200, 84), (200, 100), (107, 90)):
    fits = []
    for i, record in enumerate(records):
      try:
        encode_example(record, tokenizer, "chat", prompt_len, response_len, index=i)
        fits.append(record)
      except ValueError:
        pass
    kept = check_lengths(records, tokenizer, template="chat", prompt_len=prompt_len, response_len=response_len,
                         too_long="skip")
    assert list(kept) == fits, (prompt_len, response_len)
    assert 0 < len(fits) < len(records), "limits chosen to drop some records and keep some"


def test_tfds_and_plain_sources_are_checked_and_subset(tfds_dir, hf_dir):
  tokenizer = HFTokenizer(hf_dir)
  source = data.tfds_source("kldistill_tiny_gsm8k", "train", str(tfds_dir), "question", "answer")
  lengths = [len(tokenizer.encode(data.format_prompt(source[i]["prompt"], "plain", tokenizer)))
             for i in range(len(source))]
  longest = int(np.argmax(lengths))
  settings = dict(template="plain", prompt_len=max(lengths) - 1, response_len=1000)
  with pytest.raises(ValueError, match=re.escape(f"tfds kldistill_tiny_gsm8k[train] in {tfds_dir}, record "
                                                 f"{longest}: prompt has {max(lengths)} tokens")):
    check_lengths(source, tokenizer, **settings)
  kept = check_lengths(source, tokenizer, too_long="skip", **settings)
  assert isinstance(kept, validate.Subset) and len(kept) == 3
  assert [kept[i] for i in range(3)] == [source[i] for i in range(4) if i != longest]
  batch = make_dataset(kept, tokenizer, batch_size=3, seed=0, shuffle=False, num_epochs=1, **settings)[0]
  assert batch["index"].tolist() == [0, 1, 2]
  plain = [source[i] for i in range(4)]
  with pytest.raises(ValueError, match=rf"record {longest}: prompt has"):
    check_lengths(plain, tokenizer, **settings)
  assert check_lengths(plain, tokenizer, template="plain", prompt_len=max(lengths), response_len=1000) is plain
