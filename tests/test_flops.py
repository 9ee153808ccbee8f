"""FLOP accounting: a hand count of a tiny model, and agreement with XLA's count of the real forward."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from kldistill_jax.models.config import qwen3
from kldistill_jax.models.transformer import Transformer
from kldistill_jax.train import flops
from kldistill_jax.train.flops import forward_flops, generation_flops, train_flops

TINY = qwen3(hidden_size=8, num_layers=1, num_heads=2, head_dim=4, num_kv_heads=1, intermediate_size=16,
             vocab_size=10)


def test_hand_count():
  q, k, v, o = 2 * 8 * 8, 2 * 8 * 4, 2 * 8 * 4, 2 * 8 * 8  # 128, 64, 64, 128
  mlp = 3 * 2 * 8 * 16  # gate, up, down: 768
  head = 2 * 8 * 10  # 160
  per_key = 2 * 2 * 4 + 2 * 2 * 4  # scores + values, 2 heads x head_dim 4: 32 per (query, key)
  dense = q + k + v + o + mlp + head  # 1312
  assert forward_flops(TINY, 2, 3) == 2 * 3 * (dense + 3 * per_key) == 8448
  assert forward_flops(TINY, 2, 3, context_len=7) == 2 * 3 * (dense + 7 * per_key)
  assert train_flops(TINY, 2, 3) == 3 * 8448
  # Prompt 3, 2 new tokens: the decode steps attend to 4 and 5 slots.
  decode = 2 * ((dense + 4 * per_key) + (dense + 5 * per_key))  # 2 * (1440 + 1472)
  assert generation_flops(TINY, 2, 3, 2) == 8448 + decode == 14272


def test_generation_is_prefill_plus_decode_steps():
  config = qwen3(hidden_size=64, num_layers=3, num_heads=4, head_dim=16, num_kv_heads=2,
                 intermediate_size=96, vocab_size=50)
  steps = sum(forward_flops(config, 3, 1, context_len=11 + i + 1) for i in range(9))
  assert generation_flops(config, 3, 11, 9) == forward_flops(config, 3, 11) + steps


def _xla_flops(config, batch, seq_len, cache_len=None):
  graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))

  def forward(state, tokens, positions):
    model = nnx.merge(graphdef, state)
    cache = None if cache_len is None else model.init_cache(batch, cache_len)
    return model(tokens, positions, cache)[0]

  tokens = jnp.zeros((batch, seq_len), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
  cost = jax.jit(forward).lower(state, tokens, positions).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]  # older jax: a list of one dict


# Matmul-dominated: XLA's extra elementwise FLOPs were 0.55% (full T x T) and 0.58% (cache) on jax 0.10.2;
# a toy 8-wide model is 33% over (elementwise work is no longer negligible).
WIDE = qwen3(hidden_size=256, num_layers=2, num_heads=4, head_dim=64, num_kv_heads=2, intermediate_size=1024,
             vocab_size=1024)


@pytest.mark.parametrize("cache_len", [None, 96])
def test_agrees_with_xla(cache_len):
  ours = forward_flops(WIDE, 2, 64, context_len=cache_len)
  assert 1.0 <= _xla_flops(WIDE, 2, 64, cache_len) / ours < 1.02


def test_phase_counters_add_up_to_the_sides():
  counts = flops.counters(teacher_generation=5)
  flops.accumulate(counts, student_generation=7, student_train=11, teacher_scoring=13)
  flops.accumulate(counts, student_train=2)
  assert counts == {"student_generation_flops": 7, "student_train_flops": 13, "teacher_generation_flops": 5,
                    "teacher_scoring_flops": 13, "student_flops": 20, "teacher_flops": 18}
  with pytest.raises(ValueError, match=r"unknown FLOP phase\(s\) \['teacher'\]"):
    flops.counters(teacher=1)
