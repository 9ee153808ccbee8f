"""`hf.save` exports that transformers loads and chats with as is: tokenizer files, generation_config.json, a
chosen dtype. The shipped teacher carries the files the code writes."""

import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import hf_models
from kldistill_jax import data, sampling
from kldistill_jax.data import arithmetic
from kldistill_jax.models import hf

TEACHER = pathlib.Path(__file__).resolve().parents[1] / "assets" / "arithmetic_teacher"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _task_texts(count=64):
  """Prompts + responses of the built-in task, every difficulty, and the "plain" template's words."""
  task = arithmetic.ArithmeticTask(count, difficulties=(2, 3, 4, 5, 9), split="test")
  return [r["prompt"] + r["response"] for r in (task[i] for i in range(count))] + ["Question: 1+2=?\nAnswer:\n"]


def test_char_tokenizer_export_round_trips(tmp_path):
  char = data.CharTokenizer()
  char.save_pretrained(tmp_path)
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ours = data.load_tokenizer(str(tmp_path))  # the HFTokenizer wrapper the runner would use
  assert len(auto) == ours.vocab_size == char.vocab_size
  assert (auto.eos_token_id, auto.pad_token_id, auto.bos_token_id) == (char.eos_id, char.pad_id, None)
  assert (ours.eos_ids, ours.pad_id, ours.bos_id) == (char.eos_ids, char.pad_id, char.bos_id)
  alphabet = data.tokenizers.CHAR_ALPHABET
  for text in _task_texts() + list(alphabet) + [alphabet, "  12 , 3.\n\n"]:
    ids = char.encode(text)
    assert auto(text)["input_ids"] == ids == ours.encode(text), text  # no special tokens added
    assert auto.decode(ids) == text == ours.decode(ids + [char.eos_id, 5])
  padded = [char.pad_id, char.pad_id] + char.encode("3+4=7") + [char.eos_id] + char.encode("99")
  assert ours.decode(padded) == char.decode(padded) == "3+4=7"
  assert not auto.chat_template  # the task has none; templates "raw"/"plain" need none


def test_shipped_teacher_ships_what_the_code_writes(tmp_path):
  data.CharTokenizer().save_pretrained(tmp_path)
  for name in TOKENIZER_FILES:
    assert json.loads((TEACHER / name).read_text()) == json.loads((tmp_path / name).read_text()), name
  tokenizer = hf.load_tokenizer(TEACHER)  # the README's API example
  assert tokenizer.eos_token_id == 1 and len(tokenizer) == hf.read_config(TEACHER).vocab_size
  generation = json.loads((TEACHER / hf.GENERATION_FILE).read_text())
  assert generation == {"eos_token_id": [1], "pad_token_id": 0, "max_new_tokens": 36, "do_sample": False}
  assert data.load_tokenizer(str(TEACHER)).eos_ids == tuple(generation["eos_token_id"])


def _our_greedy(model, tokenizer, prompts, max_new_tokens):
  ids = [tokenizer.encode(p) for p in prompts]
  width = max(map(len, ids))
  tokens = np.array([[tokenizer.pad_id] * (width - len(x)) + x for x in ids], np.int32)
  mask = np.array([[0] * (width - len(x)) + [1] * len(x) for x in ids], np.int32)
  out = sampling.sample(model, tokens, mask, rng=jax.random.key(0), max_new_tokens=max_new_tokens,
                        temperature=0.0, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
  return [tokenizer.decode(row) for row in np.asarray(out.tokens)[:, width:]]


def _transformers_greedy(directory, prompts):
  """What a user of the directory gets: AutoTokenizer + AutoModelForCausalLM, generation_config's defaults."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
  tokenizer.padding_side = "left"
  model = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
  batch = tokenizer(prompts, return_tensors="pt", padding=True)
  with torch.no_grad():
    out = model.generate(**batch)  # greedy, max_new_tokens, EOS and pad ids all from generation_config.json
  completions = out[:, batch["input_ids"].shape[1]:]
  return [tokenizer.decode(row, skip_special_tokens=True) for row in completions], model


def test_exported_teacher_generates_our_greedy_completions(tmp_path):
  """The trained teacher, exported with the char tokenizer: transformers' greedy completions of held-out
  problems equal ours character for character (and are mostly right, so this compares real answers)."""
  char = data.CharTokenizer()
  model = hf.load(TEACHER)
  hf.save(model, tmp_path, dtype="float32", tokenizer=char, generation=dict(temperature=0.0, max_new_tokens=36))
  assert set(TOKENIZER_FILES) | {hf.GENERATION_FILE, hf.CONFIG_FILE, hf.WEIGHTS_FILE} <= {
      p.name for p in tmp_path.iterdir()}
  task = arithmetic.ArithmeticTask(24, difficulties=(2, 3, 4, 5), split="test")
  records = [task[i] for i in range(24)]
  prompts = [r["prompt"] for r in records]
  theirs, torch_model = _transformers_greedy(tmp_path, prompts)
  assert torch_model.dtype == torch.float32
  assert theirs == _our_greedy(model, char, prompts, 36)
  assert sum(arithmetic.is_correct(t, r["answer"]) for t, r in zip(theirs, records)) >= 18


def test_bfloat16_export_is_our_weights_rounded(tmp_path):
  torch_model = hf_models.make_model("qwen3", tie_word_embeddings=False)
  model = hf.load(hf_models.save_model(torch_model, tmp_path / "source"))
  hf.save(model, tmp_path / "bf16", dtype="bfloat16", tokenizer=data.CharTokenizer())
  config = json.loads((tmp_path / "bf16" / hf.CONFIG_FILE).read_text())
  assert config["dtype"] == "bfloat16"
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
  assert loaded.dtype == torch.bfloat16  # the checkpoint's dtype, without asking
  theirs = {k: v.float().numpy() for k, v in loaded.state_dict().items()}
  ours = {k: v.float().numpy() for k, v in torch_model.state_dict().items()}
  assert theirs.keys() == ours.keys()
  for name, value in ours.items():
    np.testing.assert_array_equal(theirs[name], value.astype(ml_dtypes.bfloat16).astype(np.float32), name)
  again = hf.load(tmp_path / "bf16")  # our loader keeps the export's dtype too
  assert again.config.param_dtype == "bfloat16"
  for x in jax.tree.leaves(nnx.state(again, nnx.Param)):
    assert x.dtype == jax.numpy.bfloat16
  generation = json.loads((tmp_path / "bf16" / hf.GENERATION_FILE).read_text())
  assert generation == {"eos_token_id": [1], "pad_token_id": 0}  # no sampling settings given: loader's


def test_hf_tokenizer_export_keeps_chat_template_and_turn_eos(tmp_path):
  """A Hugging Face tokenizer (HFTokenizer) goes out with save_pretrained: its chat template and the
  generation_config EOS ids (e.g. Qwen's <|im_end|> next to the base EOS) survive the export."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  words = ["<pad>", "<eos>", "<end>", "hi", "there", "user", "assistant"]
  backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
  fast.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <end> {% endfor %}assistant"
  source = tmp_path / "source"
  fast.save_pretrained(str(source))
  (source / hf.GENERATION_FILE).write_text(json.dumps({"eos_token_id": [1, 2]}))
  tokenizer = data.HFTokenizer(source)
  torch_model = hf_models.make_model("llama")
  model = hf.load(hf_models.save_model(torch_model, tmp_path / "weights"))
  hf.save(model, tmp_path / "out", tokenizer=tokenizer, generation=dict(temperature=0.7, top_p=0.9))
  exported = data.HFTokenizer(tmp_path / "out")
  assert exported.name == tokenizer.name and exported.eos_ids == (1, 2)
  message = [{"role": "user", "content": "hi"}]
  assert exported.apply_chat_template(message) == tokenizer.apply_chat_template(message) == "user hi <end> assistant"
  generation = transformers.GenerationConfig.from_pretrained(str(tmp_path / "out"))
  assert (generation.eos_token_id, generation.pad_token_id, generation.do_sample) == ([1, 2], 0, True)
  assert (generation.temperature, generation.top_k, generation.top_p) == (0.7, 0, 0.9)
  assert json.loads((tmp_path / "out" / hf.CONFIG_FILE).read_text())["dtype"] == "float32"  # model's own


def test_generation_config_settings():
  assert hf.generation_config(eos_token_id=(3, 4), temperature=0.0) == {"eos_token_id": [3, 4], "do_sample": False}
  assert hf.generation_config(temperature=1.0, top_k=20) == dict(do_sample=True, temperature=1.0, top_k=20,
                                                                  top_p=1.0)
  with pytest.raises(ValueError, match="top_p"):
    hf.generation_config(temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="EOS"):
    hf.save(None, "/nonexistent", tokenizer=type("NoEos", (), {"eos_ids": (), "pad_id": 0})())



def test_readme_example_on_the_shipped_teacher_runs_as_written(capsys, monkeypatch):
  import re  # pylint: disable=g-import-not-at-top
  readme = (TEACHER.parents[1] / "README.md").read_text()
  [block] = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "assets/arithmetic_teacher" in b]
  monkeypatch.chdir(TEACHER.parents[1])
  exec(block, {})  # pylint: disable=exec-used
  right = ["2+3=5,5+5=10#10", "8+9=17#17"]  # the teacher's solutions (its format: partial sums, "#" answer)
  assert capsys.readouterr().out.strip() == f"{right} {right}"
