"""Stopping cleanly when the machine is going away: SIGTERM (a cloud VM's preemption notice) and Ctrl-C.

    with preemption.handling():          # jobs.run wraps every job in it
      ...
      preemption.raise_if_requested("before the teacher evaluation")   # between phases
      if preemption.agreed():            # in the training loop, after each step: save, then stop

A signal only sets a flag: the step in flight finishes, the loop saves a checkpoint of it, waits until it
is on disk and raises `Preempted`; `run.py` exits with 128 + the signal number. A second Ctrl-C stops at
once (KeyboardInterrupt). In a multi-process run every process must stop after the same step (each saves
its shards of one checkpoint), so `agreed()` is a tiny all-gather of the flags: one process's notice stops
them all.
"""

import contextlib
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from kldistill_jax.errors import Preempted

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: int | None = None


def _handle(signum, frame):
  del frame
  global _requested
  if _requested is not None and signum == signal.SIGINT:
    raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
  _requested = signum
  logging.warning("received %s: finishing the step in flight, then saving a checkpoint and stopping%s",
                  signal.Signals(signum).name,
                  " (Ctrl-C again stops at once, losing it)" if signum == signal.SIGINT else "")


@contextlib.contextmanager
def handling():
  """Installs the handlers for the duration (main thread only; elsewhere signals keep their handlers)."""
  global _requested
  _requested = None
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, _handle) for s in SIGNALS}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _requested = None


def agreed() -> int | None:
  """The signal any process received (the same answer on every process), or None."""
  local = np.int32(_requested or 0)
  if jax.process_count() == 1:
    return int(local) or None
  every = multihost_utils.process_allgather(local)
  return int(np.max(every)) or None


def raise_if_requested(where: str):
  """Between phases that save nothing themselves: stop now that everything before is stored."""
  signum = agreed()
  if signum:
    raise Preempted(f"stopped on {signal.Signals(signum).name} {where}; everything finished so far is "
                    "stored in the workdir: rerun the same command to continue", signum)
