"""Orbax checkpoints of the training state, the grain data iterator and a small JSON `meta` dict.

Each step directory holds up to three items: `state` (any pytree of arrays, `StandardSave`), `meta` (JSON)
and `data` (the grain iterator's position, only when one is given). Restoring walks back from the newest
step past checkpoints that fail to load, so a run killed mid-write, or a damaged file, costs at most the
steps since the previous checkpoint.
"""

import logging

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath


def _check_directory(directory: epath.Path):
  """Fails early, naming the path, where orbax would fail late with an obscure error."""
  if not directory.exists():
    return
  if not directory.is_dir():
    raise NotADirectoryError(f"checkpoint directory {directory} exists and is not a directory")
  try:
    next(iter(directory.iterdir()), None)
  except OSError as e:
    raise PermissionError(f"checkpoint directory {directory} is not readable: {e}") from e


def _check_same_step_everywhere(step):
  """Every process must resume from the same step (they read the same files, but fail independently)."""
  if jax.process_count() > 1:
    multihost_utils.assert_equal(np.int64(step), f"processes restored different checkpoint steps "
                                                 f"(this one: {step})")


class Checkpointer:
  """Saves and restores `(step, state, meta, data iterator)`, keeping the newest `max_to_keep` steps."""

  def __init__(self, directory, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(directory)
    _check_directory(self.directory)
    # No `cleanup_tmp_directories`: only a save awaits its thread (a restore-only exit logs errors), and the
    # `<step>.orbax-checkpoint-tmp` directories a killed save leaves are never read, and replaced on re-save.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state, *, data_iterator=None, meta: dict | None = None, force: bool = False):
    """Starts saving `state` (and the iterator position, `meta`) as `step`; returns whether it saves.

    With async saves the arrays are copied to host before this returns, so the caller may donate or
    overwrite them at once; the files are written in the background (see `wait`).
    """
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if data_iterator is not None:
      # grain's handler records the iterator's position now, not when the background write finishes.
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore_latest(self, abstract_state, *, data_iterator=None):
    """`(step, state, meta)` of the newest checkpoint that restores, or None when none does.

    abstract_state: pytree of `jax.ShapeDtypeStruct` whose shardings say where restored arrays land.
    data_iterator: a fresh iterator of the same pipeline; its position is set in place.
    """
    self.wait()  # a save still in flight would otherwise be invisible or half-written
    failed = []
    for step in reversed(self.all_steps()):
      items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
      if data_iterator is not None:
        if not (self.directory / str(step) / "data").exists():
          raise ValueError(f"checkpoint {self.directory / str(step)} has no data iterator state; "
                           "restore without data_iterator")
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        logging.warning("checkpoint step %d in %s failed to restore (%s: %s); trying the previous one",
                        step, self.directory, type(e).__name__, e)
        failed.append(step)
        continue
      self._forget(failed)
      _check_same_step_everywhere(step)
      return step, restored["state"], restored["meta"]
    self._forget(failed)
    _check_same_step_everywhere(-1)
    return None

  def _forget(self, steps):
    """Deletes checkpoints that failed to restore: orbax refuses to save a step <= its latest, so a
    damaged newest step left in place would silently block the rerun from ever saving it again."""
    for step in steps:
      logging.warning("deleting the damaged checkpoint step %d in %s", step, self.directory)
      self._manager.delete(step)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def wait(self):
    """Blocks until every started save is on disk.

    Call it (or `close`) before the process exits: orbax does not, and an exit mid-save loses that step.
    """
    self._manager.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases orbax's background threads."""
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
