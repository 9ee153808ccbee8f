"""A run's workdir: one live run at a time, writable before any compute, and the config it was started with.

    @workdir.owned                 # every job of run.py that writes a workdir
    def run_distill(config, workdir): ...

`owned` claims the workdir (refusing one a live run holds, or one it cannot write) and checks the config
against the run the workdir holds (refusing a rerun that would train something else), before any compute.

The lock is an `fcntl.flock` on `workdir/.lock`, held by process 0 for the run's life: the kernel drops it
when the process dies however it dies, so a lock left by a dead run is simply taken over (the file still
names the dead holder, which is logged). `config.json` records the resolved config of the run; a rerun
compares its own against it field by field (see `may_change`).
"""

import contextlib
import fcntl
import functools
import json
import os
import pathlib
import socket
import time

import jax
from absl import logging
from jax.experimental import multihost_utils

from kldistill_jax.errors import ConfigMismatchError, UserError, WorkdirInUseError

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"

# Fields that only observe or extend a run: changing them on a rerun is logged, not refused.
# remat changes what the backward pass recomputes, not its values: a resume may trade memory for compute.
OBSERVE_FIELDS = ("log_every", "checkpoint_every", "keep_checkpoints", "student.remat", "teacher.remat")
OBSERVE_SECTIONS = ("mesh.", "distributed.", "export.", "study.", "log.")
# Evaluation settings never reach the update, except through the curriculum's held-out entropy probe,
# which samples the eval split with these: with the curriculum on, only these may change.
EVAL_OUTPUT_ONLY = ("eval.max_new_tokens", "eval.temperature", "eval.samples_per_prompt", "eval.pass_k",
                    "eval.probe_every", "eval.probe_problems", "eval.truncated_is_wrong")


class Lock:
  """The held lock (process 0) or a stand-in (other processes); `release` frees it."""

  def __init__(self, handle=None):
    self._handle = handle

  def release(self):
    if self._handle is not None:
      self._handle.truncate(0)  # a clean exit leaves no holder's note: a note means the holder died
      self._handle.flush()
      fcntl.flock(self._handle, fcntl.LOCK_UN)
      self._handle.close()
      self._handle = None


def _holder(path: pathlib.Path) -> str:
  try:
    info = json.loads(path.read_text())
    return f"pid {info['pid']} on host {info['host']} (started {info['started']})"
  except (OSError, ValueError, KeyError):
    return "an unknown process"


def _check_writable(workdir: pathlib.Path):
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-test-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UserError(f"--workdir={workdir}: cannot write there ({e.strerror or e})") from e


def _take(workdir: pathlib.Path):
  _check_writable(workdir)
  path = workdir / LOCK_FILE
  handle = open(path, "a+")  # never truncated before the lock is ours: the holder's note stays readable
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.close()
    raise WorkdirInUseError(f"--workdir={workdir} is in use by a live run: {_holder(path)}; wait for it, "
                            "stop it, or pick another workdir") from None
  previous = path.read_text().strip()
  if previous:  # a run that died without releasing: its kernel lock went with it
    logging.warning("workdir %s: taking over the lock left by %s (no longer running)", workdir,
                    _holder(path))
  handle.seek(0)
  handle.truncate()
  handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
  handle.flush()
  return handle


def claim(workdir) -> Lock:
  """Locks `workdir` for this run (process 0 takes it; every process fails together if it cannot).

  Raises UserError when the workdir cannot be written, WorkdirInUseError when a live run holds it.
  """
  workdir = pathlib.Path(workdir)
  handle, error = None, None
  if jax.process_index() == 0:
    try:
      handle = _take(workdir)
    except UserError as e:
      error = e
  if jax.process_count() > 1:
    failed = multihost_utils.broadcast_one_to_all(int(error is not None))
    if failed and error is None:
      raise UserError(f"--workdir={workdir}: process 0 could not claim it (see its error)")
  if error is not None:
    raise error
  return Lock(handle)


@contextlib.contextmanager
def claimed(workdir):
  lock = claim(workdir)
  try:
    yield lock
  finally:
    lock.release()


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def resolved(config) -> dict:
  """The config as flat {"dotted.field": JSON value} (tuples become lists, as in the record)."""
  return _flat(json.loads(config.to_json_best_effort()))


def may_change(field: str, config) -> bool:
  """Whether `field` may differ on a rerun of the same workdir (it observes or extends the run)."""
  if field in OBSERVE_FIELDS or field.startswith(OBSERVE_SECTIONS):
    return True
  if field.startswith("eval."):
    curriculum = config.get("curriculum")
    return not (curriculum is not None and curriculum.enabled) or field in EVAL_OUTPUT_ONLY
  return False


def _describe(value) -> str:
  return "(absent)" if value is _ABSENT else json.dumps(value)


_ABSENT = object()


def check_config(workdir, config):
  """Records config in workdir/config.json, or compares it with the recorded one of an earlier run.

  Refuses (ConfigMismatchError naming every field) a change of what is trained; `steps` may grow (the
  learning-rate schedule's horizon grows with it). Allowed changes are logged and the record updated.
  """
  path = pathlib.Path(workdir) / CONFIG_FILE
  current = resolved(config)
  if path.is_file():
    try:
      recorded = json.loads(path.read_text())["config"]
    except (ValueError, KeyError) as e:
      raise UserError(f"{path}: unreadable run config record ({e}); it is how a rerun knows what this "
                      "workdir trained, so it is never replaced silently: restore it or use a new workdir") \
          from e
    refused, allowed = [], []
    for field in sorted(set(recorded) | set(current)):
      old, new = recorded.get(field, _ABSENT), current.get(field, _ABSENT)
      if old == new:
        continue
      line = f"{field}: {_describe(old)} -> {_describe(new)}"
      if field == "steps" and isinstance(old, int) and isinstance(new, int) and new > old:
        allowed.append(line + " (the learning-rate schedule's horizon grows with it)")
      elif may_change(field, config):
        allowed.append(line)
      else:
        refused.append(line)
    if refused:
      raise ConfigMismatchError(
          f"--workdir={path.parent} holds a run with a different config ({path}); these fields change what "
          f"is trained: {'; '.join(refused)}. Rerun with the recorded values to resume, or use a new workdir")
    for line in allowed:
      logging.warning("workdir %s: config changed since the last run: %s", path.parent, line)
  if jax.process_index() == 0:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"job": config.get("job"), "config": current}, indent=1) + "\n")
    os.replace(temporary, path)


def local_path(workdir) -> pathlib.Path:
  if not workdir:
    raise UserError("--workdir is required for training jobs")
  if "://" in str(workdir):
    raise UserError(f"--workdir={workdir}: URL workdirs are not supported (metrics.jsonl is appended line by "
                    "line, which object stores cannot do); mount the bucket (e.g. gcsfuse) or use a shared "
                    "filesystem and pass its path")
  return pathlib.Path(workdir)


def owned(job):
  """Decorates a job `(config, workdir) -> result`: the workdir is claimed (see `claim`) and the config
  checked against the run it holds (see `check_config`) before the job starts, released when it ends."""
  @functools.wraps(job)
  def run(config, workdir):
    path = local_path(workdir)
    with claimed(path):
      check_config(path, config)
      return job(config, path)
  return run
