"""Checkpointer: retention, bit-exact and sharded restores, grain iterator state, fallback past damage."""

import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kldistill_jax.train.checkpointing import Checkpointer


def _state(seed):
  """A training-state-like pytree: nnx params, optax state, a bf16 array, RNG key data, a 2-way-sharded array."""
  params = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(seed)), nnx.Param)
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2], axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(jnp.arange(8.0) + seed, jax.NamedSharding(mesh, jax.P("data")))
  return {
      "params": params,
      "opt": optax.adam(1e-3).init(params),
      "bf16": jax.random.normal(jax.random.key(seed), (5,), jnp.bfloat16),
      "rng": jax.random.key_data(jax.random.key(seed)),
      "sharded": sharded,
      "step": jnp.int32(seed),
  }


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.sharding == y.sharding
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8))


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4))


def test_keeps_newest_and_restores_exactly(tmp_path):
  ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
  data = _iterator()
  for step in (1, 2, 3):
    next(data)
    ckpt.save(step, _state(step), data_iterator=data, meta={"step": step, "curriculum": [0.5, 1]})
  ckpt.wait()
  expected_batches = [next(data) for _ in range(3)]
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2", "3"]
  ckpt.close()

  fresh = _iterator()
  step, state, meta = Checkpointer(tmp_path / "ckpt").restore_latest(_abstract(_state(0)), data_iterator=fresh)
  assert step == 3 and meta == {"step": 3, "curriculum": [0.5, 1]}
  _assert_bitwise_equal(state, _state(3))
  assert len(state["sharded"].sharding.device_set) == 2
  for expected in expected_batches:
    np.testing.assert_array_equal(next(fresh), expected)


# After a failed read, tensorstore callbacks land on orbax's already closed event loop: noise, not an error.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_falls_back_past_a_damaged_checkpoint(tmp_path, caplog):
  ckpt = Checkpointer(tmp_path, async_save=False)
  for step in (1, 2):
    ckpt.save(step, _state(step), meta={"step": step})
  for root, _, files in os.walk(tmp_path / "2" / "state"):
    for name in files:
      if os.sep + "d" in root:  # the array data files; the metadata stays intact
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(10)
  with caplog.at_level(logging.WARNING):
    step, state, meta = ckpt.restore_latest(_abstract(_state(0)))
  assert step == 1 and meta == {"step": 1}
  _assert_bitwise_equal(state, _state(1))
  warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert "step 2" in warning and str(tmp_path) in warning


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_none_when_nothing_restores(tmp_path):
  ckpt = Checkpointer(tmp_path, async_save=False)
  assert ckpt.restore_latest(_abstract(_state(0))) is None and ckpt.latest_step() is None
  ckpt.save(1, {"x": jnp.ones(3)})
  for path in (tmp_path / "1" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"")
  assert ckpt.restore_latest({"x": jax.ShapeDtypeStruct((3,), jnp.float32)}) is None


def test_ignores_a_save_killed_midway(tmp_path):
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, {"x": jnp.ones(3)})
  (tmp_path / "2.orbax-checkpoint-tmp" / "state").mkdir(parents=True)  # what a SIGKILL mid-save leaves
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    assert ckpt.restore_latest({"x": jax.ShapeDtypeStruct((3,), jnp.float32)})[0] == 1
    ckpt.save(2, {"x": jnp.zeros(3)})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_missing_iterator_state_is_an_error(tmp_path):
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, {"x": jnp.ones(3)})
  with pytest.raises(ValueError, match="no data iterator state"):
    ckpt.restore_latest({"x": jax.ShapeDtypeStruct((3,), jnp.float32)}, data_iterator=_iterator())


def test_bad_directory(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("")
  with pytest.raises(NotADirectoryError, match=str(path)):
    Checkpointer(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory")
def test_unreadable_directory(tmp_path):
  path = tmp_path / "locked"
  path.mkdir(mode=0)
  try:
    with pytest.raises(PermissionError, match=str(path)):
      Checkpointer(path)
  finally:
    path.chmod(0o700)
