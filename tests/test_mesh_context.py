"""Under an ambient mesh (`jax.set_mesh`) the model pins its activations and logits by logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from kldistill_jax import models, sampling
from kldistill_jax.models import sharding

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

CONFIG = models.qwen3(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)


def test_logits_are_pinned_and_equal_to_one_device():
  model = models.Transformer(CONFIG, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (8, 6), 0, CONFIG.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(6), (8, 6))
  expected, _ = model(tokens, positions)
  mesh = sharding.make_mesh(2, 2, 2)
  sharding.shard_model(model, mesh)
  forward = nnx.jit(lambda m, t, p: m(t, p)[0])
  with jax.set_mesh(mesh):
    logits = forward(model, tokens, positions)  # inputs NOT pre-sharded: the constraints place them
  assert logits.sharding.spec == P(("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_constrain_is_a_no_op_without_a_mesh():
  x = jnp.ones((4, 3))
  assert sharding.constrain(x, ("batch", None)) is x


def test_sampling_under_a_mesh_matches_one_device():
  model = models.Transformer(CONFIG, rngs=nnx.Rngs(2))
  prompts = jax.random.randint(jax.random.key(3), (8, 5), 1, CONFIG.vocab_size)
  mask = jnp.ones_like(prompts)
  kwargs = dict(rng=jax.random.key(4), max_new_tokens=6, temperature=1.0)
  expected = sampling.sample(model, prompts, mask, **kwargs)
  mesh = sharding.make_mesh(2, 2, 2)
  sharding.shard_model(model, mesh)
  with jax.set_mesh(mesh):
    out = sampling.sample(model, prompts, mask, **kwargs)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
