"""The built-in byte tokenizer: exact UTF-8 round trips, the same ids and chat template as its Hugging Face
export, and a real text dataset (GSM8K format) end to end with inline models (configs/gsm8k.py:smoke)."""

import json

import numpy as np
import pytest

import config_files
from kldistill_jax import data
from kldistill_jax.errors import UserError
from kldistill_jax.models import hf
from kldistill_jax.train import runner

ROOT = config_files.ROOT
TEXTS = ["Hello, world!\n  tabs\tand\r\nCRLF", "ünïcödé 数学 🤖 \u0000 \u2028", " leading space", "#### 1,000",
         "</answer>", ""]


@pytest.fixture(scope="module")
def byte():
  return data.load_tokenizer("byte")


@pytest.fixture(scope="module")
def exported(byte, tmp_path_factory):
  """The tokenizer files as an export writes them, loaded back by transformers."""
  directory = tmp_path_factory.mktemp("byte_tokenizer")
  byte.save_pretrained(directory)
  return hf.load_tokenizer(directory)


def _random_texts(count, seed=0):
  """Random strings over every Unicode plane (surrogates excluded: they are not UTF-8 encodable)."""
  rng = np.random.default_rng(seed)
  points = [p for p in rng.integers(0, 0x110000, size=count * 12) if not 0xD800 <= p < 0xE000]
  return ["".join(map(chr, points[i::count])) for i in range(count)]


def test_ids_are_the_utf8_bytes_and_decode_round_trips(byte):
  assert (byte.pad_id, byte.eos_id, byte.eos_ids, byte.vocab_size, byte.name) == (0, 1, (1,), 264, "byte-v1")
  for text in TEXTS + _random_texts(50):
    ids = byte.encode(text)
    assert ids == [b + 2 for b in text.encode("utf-8")]  # the reference: Python's own UTF-8 encoder
    assert byte.decode(ids) == text
  assert byte.encode_batch(TEXTS) == [byte.encode(t) for t in TEXTS]


def test_decode_stops_at_eos_drops_padding_and_marks_what_is_not_text(byte):
  ab = byte.encode("ab")
  assert byte.decode([0, 0] + ab + [1] + byte.encode("cd")) == "ab"
  assert byte.decode(ab + [0] + byte.encode("é")) == "abé"  # padding inside a row is dropped
  cut = byte.encode("数")[:2]  # a model's sample may end inside a character
  assert byte.decode(cut + ab) == "\ufffdab"
  assert byte.decode(cut + ab) == bytes([i - 2 for i in cut + ab]).decode("utf-8", errors="replace")
  assert byte.decode(ab + [byte.vocab_size - 1] + ab) == "ab\ufffdab"  # an id past the bytes


def test_hugging_face_export_has_the_same_ids_and_text(byte, exported):
  assert len(exported) == byte.vocab_size
  assert (exported.pad_token_id, exported.eos_token_id) == (byte.pad_id, byte.eos_id)
  for text in TEXTS[:-1] + _random_texts(20, seed=1):
    ids = byte.encode(text)
    assert exported.encode(text, add_special_tokens=False) == ids
    assert exported.decode(ids) == text


@pytest.mark.parametrize("thinking,suffix", [(None, ""), (True, ""), (False, "<think>\n\n</think>\n\n")])
def test_chat_template_is_chatml_with_the_thinking_switch_like_the_export(byte, exported, thinking, suffix):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
  expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
              "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nand 3+3?<|im_end|>\n"
              "<|im_start|>assistant\n" + suffix)
  ours = byte.apply_chat_template(messages, enable_thinking=thinking)
  extra = {} if thinking is None else {"enable_thinking": thinking}
  assert ours == expected == exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                          **extra)


def test_gsm8k_text_needs_the_byte_tokenizer_not_the_char_one(byte):
  records = data.read_jsonl(ROOT / "assets" / "gsm8k_tiny" / "train.jsonl", "gsm8k")
  with pytest.raises(UserError, match=r"train\.jsonl:1: character 'T' at position 10 .* not in the char-v1"):
    data.check_lengths(records, data.load_tokenizer("char"), template="plain", prompt_len=512)
  assert data.check_lengths(records, byte, template="plain", prompt_len=128, response_len=160) is records


def test_gsm8k_smoke_config_runs_end_to_end(tmp_path):
  summary = runner.run_distill(config_files.load("gsm8k", "smoke"), tmp_path)
  assert summary["student after"]["num_problems"] == 8  # every record of assets/gsm8k_tiny/test.jsonl
  metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
  # The export carries the byte tokenizer: transformers reads the same ids back.
  tokenizer = hf.load_tokenizer(tmp_path / "student")
  assert tokenizer.encode("Tom has 12 apples.", add_special_tokens=False) == \
      data.ByteTokenizer().encode("Tom has 12 apples.")
  assert hf.read_config(tmp_path / "student").vocab_size == 264
