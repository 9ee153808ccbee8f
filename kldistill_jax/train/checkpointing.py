"""Orbax checkpoints of the training state, the grain data iterator and a small JSON `meta` dict.

Each step directory holds up to three items: `state` (any pytree of arrays, uncompressed), `meta` (JSON)
and `data` (the grain iterator's position, only when one is given). Saves are asynchronous: the arrays are
copied to host, then written by a background thread while training goes on.

Nothing here ever deletes a checkpoint except orbax's `max_to_keep` retention. Restoring:
- a save that provably never finished (orbax's `<step>.orbax-checkpoint-tmp*` directory, or a step
  without its `commit_success.txt` marker) is moved aside to `<step>.incomplete` with a warning;
- a checkpoint whose tree (structure, shapes, dtypes) differs from the state the run builds is refused
  (CheckpointMismatchError naming the leaves) before any array is read;
- a committed checkpoint whose files are damaged (tensorstore reports out-of-range, data-loss or
  corrupt reads) is moved aside to `<step>.damaged` and the previous checkpoint is tried, reported in a
  few lines; with no earlier checkpoint that restores it is an error, never a restart from scratch;
- any other failure (I/O, memory) is retried a few times, then raised (CheckpointRestoreError).
"""

import contextlib
import logging
import re
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from kldistill_jax.errors import CheckpointMismatchError, CheckpointRestoreError
from kldistill_jax.errors import NotADirectoryUserError, UnreadableFileError

COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, before the final rename
_TMP_INFIX = ".orbax-checkpoint-tmp"
RESTORE_ATTEMPTS = 3  # transient I/O is retried this many times in all, 2**i seconds apart
# tensorstore / absl status codes that mean the bytes on disk are wrong, not that reading them failed now:
# a file shorter than its index says (OUT_OF_RANGE), corrupt bytes (DATA_LOSS), a file of a committed step
# gone (NOT_FOUND); corrupt bytes can also surface as INVALID_ARGUMENT / FAILED_PRECONDITION from the
# decoder of a stored file (which of the damaged arrays fails first varies), so those count only when
# tensorstore says it was reading, decoding or opening stored data. Anything else could be this process's
# fault: retried and raised, never a reason to set a checkpoint aside.
_DAMAGE_CODES = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND")
_DECODE_CODES = ("INVALID_ARGUMENT", "FAILED_PRECONDITION")
_STORED_DATA = re.compile(r'Error (reading|decoding|opening) "')
_MEMORY_CODES = ("RESOURCE_EXHAUSTED", "Out of memory", "OOM")
# Which config fields build which part of the training state, for mismatch errors.
_STATE_FIELDS = {"params": "the student model (student.path / student.model / student.param_dtype / student.lora)",
                 "opt_state": "the optimizer (optimizer.* fields, e.g. grad_clip, weight_decay, schedule)",
                 "step": "the code version", "rng": "the code version"}


def _check_directory(directory: epath.Path):
  """Fails early, naming the path, where orbax would fail late with an obscure error."""
  if not directory.exists():
    return
  if not directory.is_dir():
    raise NotADirectoryUserError(f"checkpoint directory {directory} exists and is not a directory")
  try:
    next(iter(directory.iterdir()), None)
  except OSError as e:
    raise UnreadableFileError(f"checkpoint directory {directory} is not readable: {e}") from e


def _check_same_step_everywhere(step):
  """Every process must resume from the same step (they read the same files, but fail independently)."""
  if jax.process_count() > 1:
    multihost_utils.assert_equal(np.int64(step), f"processes restored different checkpoint steps "
                                                 f"(this one: {step})")


def _move_aside(path: epath.Path, step, suffix: str) -> epath.Path:
  """Renames `path` to `<step>.<suffix>` (numbered when taken); returns the new path."""
  target = path.parent / f"{step}.{suffix}"
  n = 1
  while target.exists():
    n += 1
    target = path.parent / f"{step}.{suffix}-{n}"
  path.rename(target)
  return target


def _incomplete_saves(directory: epath.Path):
  """(step name, path) of saves that never committed: orbax tmp directories, steps without the marker."""
  found = []
  for path in sorted(directory.iterdir()) if directory.is_dir() else ():
    if _TMP_INFIX in path.name and path.name.split(".", 1)[0].isdigit():
      found.append((path.name.split(".", 1)[0], path))
    elif path.name.isdigit() and path.is_dir() and not (path / COMMIT_MARKER).exists():
      found.append((path.name, path))
  return found


def _short(error: BaseException) -> str:
  """One line of an error: tensorstore appends kilobytes of JSON spec to its messages."""
  text = str(error).split("[tensorstore_spec=")[0].strip().splitlines()
  text = text[0] if text else ""
  return f"{type(error).__name__}: {text[:300]}"


def _kind(error: BaseException) -> str:
  """'damaged' (the files are wrong), 'memory', or 'transient' (worth retrying, then an error)."""
  text = str(error)
  if isinstance(error, MemoryError) or any(code in text for code in _MEMORY_CODES):
    return "memory"
  if any(re.search(rf"\b{code}\b", text) for code in _DAMAGE_CODES) or isinstance(error, (EOFError,)):
    return "damaged"
  if any(re.search(rf"\b{code}\b", text) for code in _DECODE_CODES) and _STORED_DATA.search(text):
    return "damaged"
  if "JSONDecodeError" in type(error).__name__ or "Expecting value" in text:
    return "damaged"
  return "transient"


class _OrbaxNoise(logging.Filter):
  """Drops orbax's and tensorstore's own error logs while we read a checkpoint that may be damaged: each
  failed read logs kilobytes of specs; we report the failure once, in a few lines, ourselves."""

  def filter(self, record):
    return "orbax" not in record.pathname and "tensorstore" not in record.pathname


@contextlib.contextmanager
def _quiet_reads():
  """While reading: orbax's error logs muted, and 'Exception ignored' reports of tensorstore callbacks that
  land on orbax's already closed event loop (noise after a failed read, not an error) swallowed."""
  noise = _OrbaxNoise()
  handlers = [h for name in ("", "absl") for h in logging.getLogger(name).handlers]
  for handler in handlers:
    handler.addFilter(noise)
  previous_hook = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  finally:
    for handler in handlers:
      handler.removeFilter(noise)
    sys.unraisablehook = previous_hook


def _flat_paths(tree) -> dict:
  return {".".join(str(k) for k in key): value for key, value in ocp.tree.to_flat_dict(tree).items()}


def tree_differences(saved_metadata, abstract_state) -> list[str]:
  """Leaves that differ between a checkpoint's metadata tree and `abstract_state` (ShapeDtypeStructs),
  both named by their orbax paths ("opt_state.1.0.mu.w")."""
  saved = {k: v for k, v in _flat_paths(saved_metadata).items() if v is not None}
  wanted = {".".join(ocp.tree.str_keypath(path)): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  lines = []
  for path in sorted(set(saved) - set(wanted)):
    lines.append(f"{path}: in the checkpoint only")
  for path in sorted(set(wanted) - set(saved)):
    lines.append(f"{path}: in the current state only")
  for path in sorted(set(saved) & set(wanted)):
    a, b = saved[path], wanted[path]
    if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
      lines.append(f"{path}: checkpoint {np.dtype(a.dtype).name}{list(a.shape)} vs current "
                   f"{np.dtype(b.dtype).name}{list(b.shape)}")
  return lines


def _mismatch_message(directory, step, differences) -> str:
  roots = sorted({line.split(".", 1)[0].split(":", 1)[0] for line in differences})
  fields = "; ".join(f"{root} <- {_STATE_FIELDS[root]}" for root in roots if root in _STATE_FIELDS)
  shown = differences[:8] + ([f"... and {len(differences) - 8} more"] if len(differences) > 8 else [])
  return (f"checkpoint step {step} in {directory} does not match the state the current config builds "
          f"({len(differences)} leaves differ: {'; '.join(shown)}). Config fields behind them: {fields}. "
          "Nothing was changed on disk: rerun with the config that wrote it to resume, or use a new workdir")


class Checkpointer:
  """Saves and restores `(step, state, meta, data iterator)`, keeping the newest `max_to_keep` steps."""

  def __init__(self, directory, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(directory)
    _check_directory(self.directory)
    self._set_aside_incomplete()
    # No `cleanup_tmp_directories`: it deletes; `_set_aside_incomplete` keeps killed saves as *.incomplete.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save)
    # No zstd: float32 weights and optimizer moments shrink by ~8% and compressing them costs ~7x the write
    # time, on the host cores the input pipeline and XLA share (bench/checkpoint_save.py).
    handlers = {"state": ocp.PyTreeCheckpointHandler(use_compression=False),
                "meta": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def _set_aside_incomplete(self):
    if jax.process_index() == 0:
      for step, path in _incomplete_saves(self.directory):
        moved = _move_aside(path, step, "incomplete")
        logging.warning("checkpoint step %s in %s never finished saving (no %s); moved aside to %s",
                        step, self.directory, COMMIT_MARKER, moved.name)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("incomplete checkpoints set aside")

  def save(self, step: int, state, *, data_iterator=None, meta: dict | None = None, force: bool = False):
    """Starts saving `state` (and the iterator position, `meta`) as `step`; returns whether it saves.

    With async saves the arrays are copied to host before this returns, so the caller may donate or
    overwrite them at once; the files are written in the background (see `wait`).
    """
    items = {"state": ocp.args.PyTreeSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if data_iterator is not None:
      # grain's handler records the iterator's position now, not when the background write finishes.
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def _read(self, step, abstract_state, data_iterator):
    """One step's (state, meta), refusing a tree mismatch before reading any array."""
    with _quiet_reads():
      metadata = self._manager.item_metadata(step)
    saved_tree = getattr(metadata["state"], "tree", metadata["state"]) if "state" in metadata else None
    if saved_tree is not None:
      differences = tree_differences(saved_tree, abstract_state)
      if differences:
        raise CheckpointMismatchError(_mismatch_message(self.directory, step, differences))
    items = {"state": ocp.args.PyTreeRestore(abstract_state,
                                             restore_args=ocp.checkpoint_utils.construct_restore_args(
                                                 abstract_state)),
             "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      if not (self.directory / str(step) / "data").exists():
        raise CheckpointMismatchError(f"checkpoint {self.directory / str(step)} has no data iterator "
                                      "state; restore without data_iterator")
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    with _quiet_reads():
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def _read_with_retries(self, step, abstract_state, data_iterator):
    """((state, meta), None), or (None, error) when the step's files are damaged; raises otherwise."""
    for attempt in range(RESTORE_ATTEMPTS):
      try:
        return self._read(step, abstract_state, data_iterator), None
      except CheckpointMismatchError:
        raise
      except Exception as e:  # orbax/tensorstore raise many types
        kind = _kind(e)
        if kind == "damaged":
          return None, e
        if kind == "memory" or attempt + 1 == RESTORE_ATTEMPTS:
          raise CheckpointRestoreError(
              f"checkpoint step {step} in {self.directory} could not be read ({kind} error, attempt "
              f"{attempt + 1} of {RESTORE_ATTEMPTS}): {_short(e)}. Nothing was changed on disk; fix the "
              "cause and rerun to resume") from e
        logging.warning("checkpoint step %d in %s: read failed (%s); retrying in %d s", step,
                        self.directory, _short(e), 2 ** attempt)
        time.sleep(2 ** attempt)
    raise AssertionError("unreachable")

  def restore_latest(self, abstract_state, *, data_iterator=None):
    """`(step, state, meta)` of the newest checkpoint that restores, or None when there is none.

    abstract_state: pytree of `jax.ShapeDtypeStruct` whose shardings say where restored arrays land.
    data_iterator: a fresh iterator of the same pipeline; its position is set in place.
    """
    self.wait()  # a save still in flight would otherwise be invisible or half-written
    steps = self.all_steps()
    damaged = []
    for step in reversed(steps):
      restored, error = self._read_with_retries(step, abstract_state, data_iterator)
      if restored is None:
        damaged.append((step, error))
        continue
      self._set_aside_damaged(damaged)
      _check_same_step_everywhere(step)
      return (step, *restored)
    if damaged:
      raise CheckpointRestoreError(
          f"no checkpoint in {self.directory} restores: " + "; ".join(
              f"step {s}: {_short(e)}" for s, e in damaged) + ". Nothing was moved or deleted; move the "
          "checkpoints directory aside to start over")
    _check_same_step_everywhere(-1)
    return None

  def _set_aside_damaged(self, damaged):
    """Moves damaged checkpoints out of orbax's sight (it refuses to save a step <= its latest, so one left
    in place would block the rerun from saving that step again), keeping their files for inspection."""
    for step, error in damaged:
      if jax.process_index() == 0:
        moved = _move_aside(self.directory / str(step), step, "damaged")
        logging.warning("checkpoint step %d in %s failed to restore (%s); moved aside to %s, falling back "
                        "to the previous checkpoint", step, self.directory, _short(error), moved.name)
    if damaged:
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("damaged checkpoints set aside")
      self._manager.reload()

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
