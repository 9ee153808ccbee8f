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

from kldistill_jax.errors import CheckpointMismatchError, CheckpointRestoreError
from kldistill_jax.train import checkpointing
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
  assert "step 2" in warning and str(tmp_path) in warning and "moved aside to 2.damaged" in warning
  assert ckpt.all_steps() == [1] and (tmp_path / "2.damaged" / "state").is_dir()
  ckpt.save(2, _state(2))  # the rerun can save that step again


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_none_only_when_there_is_no_checkpoint(tmp_path):
  ckpt = Checkpointer(tmp_path, async_save=False)
  assert ckpt.restore_latest(_abstract(_state(0))) is None and ckpt.latest_step() is None
  ckpt.save(1, {"x": jnp.ones(3)})
  for path in (tmp_path / "1" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"")
  # The only checkpoint is damaged: an error, never a silent restart from scratch, and it stays in place.
  with pytest.raises(CheckpointRestoreError, match="no checkpoint in .* restores: step 1"):
    ckpt.restore_latest({"x": jax.ShapeDtypeStruct((3,), jnp.float32)})
  assert ckpt.all_steps() == [1]


def test_sets_aside_saves_that_never_committed(tmp_path, caplog):
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, {"x": jnp.full(3, float(step))})
  (tmp_path / "2" / "commit_success.txt").unlink()  # a save cut before its commit marker
  (tmp_path / "3.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)  # what a SIGKILL mid-save leaves
  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    step, state, _ = ckpt.restore_latest({"x": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert step == 1 and np.asarray(state["x"]).tolist() == [1.0, 1.0, 1.0]
    ckpt.save(2, {"x": jnp.zeros(3)})
  # Moved aside with their files, never deleted; the rerun saved step 2 again.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "2.incomplete", "3.incomplete"]
  assert (tmp_path / "2.incomplete" / "state").is_dir() and (tmp_path / "3.incomplete" / "state").is_dir()
  warnings = " ".join(r.getMessage() for r in caplog.records)
  assert "step 2" in warnings and "step 3" in warnings and "never finished saving" in warnings


def _adam_state(clip):
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)) if clip else optax.adam(1e-3)
  return {"params": params, "opt_state": optimizer.init(params)}


def test_a_different_state_tree_is_refused_and_nothing_is_touched(tmp_path):
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, _adam_state(clip=True))
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  wanted = _abstract(_adam_state(clip=False))  # optimizer.grad_clip=0: the optimizer state changes shape
  with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointMismatchError) as error:
    ckpt.restore_latest(wanted)
  message = str(error.value)
  assert "opt_state.1.0.mu.w: in the checkpoint only" in message  # the chain's adam state, by its path
  assert "opt_state.0.mu.w: in the current state only" in message
  assert "optimizer.*" in message and "params" not in message.split("Config fields")[1]
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before

  wider = _abstract({"params": {"w": jnp.ones((3, 5)), "b": jnp.zeros(4, jnp.bfloat16)},
                     "opt_state": _adam_state(clip=True)["opt_state"]})
  with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointMismatchError) as error:
    ckpt.restore_latest(wider)
  assert "params.w: checkpoint float32[3, 4] vs current float32[3, 5]" in str(error.value)
  assert "params.b: checkpoint float32[4] vs current bfloat16[4]" in str(error.value)


def test_transient_read_errors_are_retried_then_raised(tmp_path, monkeypatch):
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, {"x": jnp.ones(3)})
  monkeypatch.setattr(checkpointing.time, "sleep", lambda seconds: None)
  abstract = {"x": jax.ShapeDtypeStruct((3,), jnp.float32)}
  ckpt = Checkpointer(tmp_path)
  real_restore, failures = ckpt._manager.restore, []

  def flaky(step, args):
    if len(failures) < checkpointing.RESTORE_ATTEMPTS - 1:
      failures.append(step)
      raise OSError(5, "Input/output error")
    return real_restore(step, args=args)
  monkeypatch.setattr(ckpt._manager, "restore", flaky)
  assert ckpt.restore_latest(abstract)[0] == 1 and len(failures) == checkpointing.RESTORE_ATTEMPTS - 1

  def broken(step, args):
    raise OSError(5, "Input/output error")
  monkeypatch.setattr(ckpt._manager, "restore", broken)
  with pytest.raises(CheckpointRestoreError, match="step 1 .*attempt 3 of 3.*Input/output error"):
    ckpt.restore_latest(abstract)

  def out_of_memory(step, args):
    raise ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes")
  monkeypatch.setattr(ckpt._manager, "restore", out_of_memory)
  with pytest.raises(CheckpointRestoreError, match="memory error, attempt 1 of 3"):
    ckpt.restore_latest(abstract)
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # nothing moved or deleted


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


@pytest.mark.parametrize("message,kind", [
    ('OUT_OF_RANGE: Error reading "params.w/.zarray" in OCDBT database at local file "x": byte range', "damaged"),
    ('DATA_LOSS: Error opening "zarr" driver: corrupt', "damaged"),
    ('INVALID_ARGUMENT: Error decoding "opt_state.1.0.mu.w/0.0": bad zstd frame', "damaged"),
    ("INVALID_ARGUMENT: Sharding of the requested array does not match the mesh", "transient"),
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes", "memory"),
    ("UNAVAILABLE: connection reset by peer", "transient"),
])
def test_only_stored_data_errors_count_as_damage(message, kind):
  """A checkpoint is set aside only when the bytes on disk are wrong; errors that may be this process's
  fault are retried and raised instead."""
  assert checkpointing._kind(ValueError(message)) == kind  # pylint: disable=protected-access
