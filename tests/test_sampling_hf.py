"""Greedy `sampling.sample` equals transformers `generate(do_sample=False)` token for token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from kldistill_jax import sampling
from kldistill_jax.models import hf

NEW_TOKENS = 16


def _prompts(vocab_size):
  """Left-padded prompts of lengths 7, 4 and 1 (transformers generates after left padding)."""
  rng = np.random.default_rng(1)
  lengths = (7, 4, 1)
  tokens = np.zeros((3, 7), np.int64)
  mask = np.zeros((3, 7), np.int64)
  for row, length in enumerate(lengths):
    tokens[row, 7 - length:] = rng.integers(1, vocab_size, length)
    mask[row, 7 - length:] = 1
  return tokens, mask


def _hf_generate(model, tokens, mask, **kwargs):
  with torch.no_grad():
    out = model.generate(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask), do_sample=False,
                         max_new_tokens=NEW_TOKENS, pad_token_id=0, **kwargs)
  return out[:, tokens.shape[1]:].numpy()


@pytest.mark.parametrize("family,overrides", [("qwen3", {}), ("qwen2", {"tie_word_embeddings": True}),
                                              ("llama", {"rope_theta": 5000.0})])
def test_greedy_matches_transformers_generate(tmp_path, family, overrides):
  torch_model = hf_models.make_model(family, **overrides)
  ours = hf.load(hf_models.save_model(torch_model, tmp_path))
  tokens, mask = _prompts(torch_model.config.vocab_size)
  expected = _hf_generate(torch_model, tokens, mask, eos_token_id=None)
  out = sampling.sample(ours, jnp.asarray(tokens), jnp.asarray(mask), rng=jax.random.key(0),
                        max_new_tokens=NEW_TOKENS, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out.tokens[:, 7:]), expected)
  assert np.all(np.asarray(out.lengths) == NEW_TOKENS)


def test_greedy_with_eos_matches_transformers_generate(tmp_path):
  torch_model = hf_models.make_model("qwen3", seed=3)
  ours = hf.load(hf_models.save_model(torch_model, tmp_path))
  tokens, mask = _prompts(torch_model.config.vocab_size)
  free_run = _hf_generate(torch_model, tokens, mask, eos_token_id=None)
  eos = int(free_run[0, 3])  # a token row 0 emits at step 3, so at least that row stops early
  expected = _hf_generate(torch_model, tokens, mask, eos_token_id=eos)
  out = sampling.sample(ours, jnp.asarray(tokens), jnp.asarray(mask), rng=jax.random.key(0),
                        max_new_tokens=NEW_TOKENS, temperature=0.0, eos_ids=(eos,), pad_id=0)
  ours_tokens = np.asarray(out.tokens[:, 7:])
  # transformers stops when every row is done, so its output may be shorter; beyond it ours is padding.
  np.testing.assert_array_equal(ours_tokens[:, :expected.shape[1]], expected)
  assert np.all(ours_tokens[:, expected.shape[1]:] == 0)
  first_eos = [list(row).index(eos) + 1 if eos in row else NEW_TOKENS for row in expected]
  np.testing.assert_array_equal(np.asarray(out.lengths), first_eos)
  assert bool(out.finished[0])
