"""Stop strings: the sampler ends a row at the first generated token that completes a stop sequence (matched
on ids inside the jitted loop), keeps the stop tokens in the completion as it keeps EOS, and everything that
reads completions (evaluation, GRPO rewards, cached trajectories) counts such a row as finished."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from kldistill_jax import data, evaluation, models, sampling
from kldistill_jax.errors import UserError
from kldistill_jax.models import hf, sharding
from kldistill_jax.train import prefixes, rl
from test_bad_input import TEACHER

V = 61
CONFIG = models.qwen3(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8)
N = 12
PROMPT_MASK = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]],
                       np.int32)
PROMPTS = np.random.default_rng(0).integers(2, V, PROMPT_MASK.shape).astype(np.int32)
EOS = 1


@pytest.fixture(scope="module")
def model():
  return models.Transformer(CONFIG, rngs=nnx.Rngs(0))


def _sample(model, stops=()):
  return sampling.sample(model, PROMPTS, PROMPT_MASK, rng=jax.random.key(3), max_new_tokens=N,
                         temperature=1.0, eos_ids=(EOS,), stop_sequences=stops)


def _reference_end(completion, stops):
  """Index of the token that ends `completion` (its first EOS, or the first token that completes a stop
  sequence out of generated tokens only), or None: the definition, written out."""
  for i in range(len(completion)):
    generated = list(completion[:i + 1])
    if completion[i] == EOS or any(len(s) <= len(generated) and generated[-len(s):] == list(s) for s in stops):
      return i
  return None


def test_sampler_stops_at_the_first_stop_sequence_and_keeps_it(model):
  free = jax.device_get(_sample(model))
  p = PROMPTS.shape[1]
  gen = free.tokens[:, p:]
  # Stops drawn from the unstopped completions (so they occur), of lengths 1, 2 and 3, plus one that spans
  # a prompt's last token and its first generated token (never a match: only generated ids count).
  stops = ((int(gen[0, 4]),), tuple(int(t) for t in gen[1, 2:4]), tuple(int(t) for t in gen[2, 5:8]),
           (int(PROMPTS[3, -1]), int(gen[3, 0])))
  out = jax.device_get(_sample(model, stops))
  # The same keys draw the same tokens until a row ends, so the stopped run is the free one cut short.
  for row in range(len(PROMPTS)):
    end = _reference_end(gen[row], stops)
    length = N if end is None else end + 1
    assert out.lengths[row] == length and out.finished[row] == (end is not None)
    np.testing.assert_array_equal(out.tokens[row, p:p + length], gen[row, :length])
    np.testing.assert_array_equal(out.tokens[row, p + length:], 0)  # pad_id after the stop
    np.testing.assert_array_equal(out.completion_mask[row, p:], np.arange(N) < length)
    np.testing.assert_allclose(out.sampling_logprobs[row, p:p + length], free.sampling_logprobs[row, p:p + length],
                               rtol=1e-6)
  assert out.lengths[0] <= 5 and out.lengths[1] <= 4 and out.lengths[2] <= 8  # each stop fired by then
  np.testing.assert_array_equal(out.tokens[:, :p], PROMPTS)


def test_ends_with_stop_matches_the_definition():
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 4, (64, 7))
  mask = np.zeros((64, 7), np.int32)
  for row, (start, stop) in enumerate(rng.integers(0, 8, (64, 2))):
    mask[row, min(start, stop):max(start, stop)] = 1
  stops = ((2,), (0, 3), (1, 1, 2))
  got = np.asarray(sampling.ends_with_stop(tokens, mask, stops))
  expected = [any(len(s) <= m.sum() and list(t[m > 0][-len(s):]) == list(s) for s in stops) if m.any() else False
              for t, m in zip(tokens, mask)]
  np.testing.assert_array_equal(got, expected)
  assert not np.asarray(sampling.ends_with_stop(tokens, mask, ())).any()


def test_stop_strings_map_to_token_sequences_or_name_the_field():
  byte, char = data.ByteTokenizer(), data.CharTokenizer()
  assert data.stop_sequences(byte, ("</answer>", "#", "#")) == (tuple(b + 2 for b in b"</answer>"), (37,))
  assert data.stop_sequences(char, ("#",), "eval.stop") == (tuple(char.encode("#")),)
  with pytest.raises(UserError, match=r"eval\.stop: stop string '</answer>': character '<'"):
    data.stop_sequences(char, ("</answer>",), "eval.stop")
  with pytest.raises(UserError, match=r"sampling\.stop has an empty stop string"):
    data.stop_sequences(byte, ("",))
  with pytest.raises(UserError, match=r"sampling\.stop must be a tuple of strings, got '#'"):
    data.stop_sequences(byte, "#")


def test_evaluation_completions_end_at_the_stop_string_and_exports_carry_it(tmp_path):
  mesh = sharding.make_mesh(8, 1, 1)
  teacher, char = hf.load(TEACHER, mesh=mesh), data.CharTokenizer()
  records = data.ArithmeticTask(8, difficulties=(2, 3), split="test")
  stopped = evaluation.evaluate(teacher, records, char, check=data.is_correct, template="raw", prompt_len=12,
                                max_new_tokens=24, temperature=0.0, batch_size=8, rng=jax.random.key(0),
                                mesh=mesh, stop=("=",))
  # Unstopped, the shipped teacher answers "3+5=" with "3+5=8#8" or "5+3=8#8" (tests/test_evaluation.py):
  # the stop string ends it after its first "=", kept, and the row counts as finished.
  for _, text, _, ok in stopped["examples"]:
    assert len(text) == 4 and text[1] == "+" and text.endswith("=") and not ok  # no answer yet
  assert stopped["truncation_rate"] == 0.0 and stopped["mean_length"] == 4.0  # "a+b=": single-digit terms
  # Exports write eval.stop as generation_config.json's stop_strings, which transformers reads.
  transformers = pytest.importorskip("transformers")
  (tmp_path / hf.GENERATION_FILE).write_text(json.dumps(hf.generation_config(temperature=0.0,
                                                                             stop_strings=("=",))))
  assert transformers.GenerationConfig.from_pretrained(str(tmp_path)).stop_strings == ["="]


def test_stop_matching_agrees_with_transformers_stop_string_criteria():
  """sampling.ends_with_stop on data.stop_sequences against transformers' StopStringCriteria (which matches
  decoded token strings) on random byte-token rows: the same decision wherever the byte tokenizer applies."""
  torch = pytest.importorskip("torch")
  from transformers.generation.stopping_criteria import StopStringCriteria  # pylint: disable=g-import-not-at-top
  byte = data.ByteTokenizer()
  stops = ("</answer>", "\n\n", "é", "#### ")
  rng = np.random.default_rng(2)
  alphabet = ["</answer>", "</answe", "r>", "\n", "é", "e", "#", " ", "####", "x"]
  texts = ["".join(rng.choice(alphabet, size=rng.integers(1, 6))) for _ in range(200)]
  criteria = StopStringCriteria(tokenizer=byte.to_hf(), stop_strings=list(stops))
  rows = [byte.encode(text) for text in texts]
  width = max(map(len, rows)) + 3
  tokens = np.zeros((len(rows), width), np.int32)  # right-padded, with the row shifted by 0-2 columns
  mask = np.zeros_like(tokens)
  for i, ids in enumerate(rows):
    tokens[i, i % 3:i % 3 + len(ids)], mask[i, i % 3:i % 3 + len(ids)] = ids, 1
  ours = np.asarray(sampling.ends_with_stop(tokens, mask, data.stop_sequences(byte, stops)))
  for text, ids, stopped in zip(texts, rows, ours):
    assert stopped == bool(criteria(torch.tensor([ids]), None)[0]) == text.endswith(stops), text
  assert 20 < ours.sum() < 180  # both outcomes are exercised


def test_grpo_rewards_and_cached_statistics_count_a_stop_as_finished():
  char = data.CharTokenizer()
  records = [{"prompt": "3+5=", "answer": "8"}]
  completion = char.encode("3+5=8#8")  # no EOS: truncated unless "#8" is a stop
  tokens = np.array([[0] * 4 + completion + [0]])
  mask = np.array([[0] * 4 + [1] * len(completion) + [0]])
  args = dict(prompt_len=4, records=records, tokenizer=char, check=data.is_correct)
  assert rl.rewards_of(tokens, mask, np.array([0]), **args)[0] == 0.0
  stop = data.stop_sequences(char, ("#8",))
  assert rl.rewards_of(tokens, mask, np.array([0]), stop_sequences=stop, **args)[0] == 1.0
  batch = {"tokens": tokens, "loss_mask": mask}
  assert float(prefixes.cached_stats(batch, char.eos_ids)["truncation_rate"]) == 1.0
  assert float(prefixes.cached_stats(batch, char.eos_ids, stop)["truncation_rate"]) == 0.0
