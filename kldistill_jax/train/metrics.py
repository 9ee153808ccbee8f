"""Training metrics as JSON lines (`workdir/metrics.jsonl`), TensorBoard scalars (`workdir/tensorboard`) and,
when asked for (`log.wandb_project`), the same scalars in Weights & Biases (`tracking`).

Each `write` appends one line `{"step": 7, "loss": 0.25, ...}`. JSON has no NaN or infinity, so non-finite
values are written as the strings "nan", "inf" and "-inf" (`read_metrics` turns them back into floats).
"""

import json
import math
import os
import pathlib
import tempfile
import time

from tensorboardX import SummaryWriter

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _json_value(value: float):
  return value if math.isfinite(value) else str(value)  # str(float): "nan", "inf", "-inf"


def _parse(line: str) -> dict:
  return {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in json.loads(line).items()}


def _complete_lines(path: pathlib.Path) -> list[str]:
  """The file's lines without a final one that a kill cut short (it lacks its newline)."""
  lines = path.read_text().splitlines(keepends=True)
  return [line for line in lines if line.endswith("\n")]


def read_metrics(workdir) -> list[dict]:
  """Every record of `workdir/metrics.jsonl`, in order; non-finite values come back as floats."""
  return [_parse(line) for line in _complete_lines(pathlib.Path(workdir) / "metrics.jsonl")]


SUPERSEDED = "metrics.superseded.jsonl"


def _drop_after(path: pathlib.Path, step: int):
  """Rewrites `path` without records past `step`, appending those to metrics.superseded.jsonl (a resumed
  run redoes those steps, but nothing written is lost). Atomic, so a kill now leaves the old or the new
  file; the file keeps its permissions."""
  lines = _complete_lines(path)
  keep = [line for line in lines if json.loads(line)["step"] <= step]
  dropped = [line for line in lines if json.loads(line)["step"] > step]
  if not dropped:
    return
  with open(path.parent / SUPERSEDED, "a") as f:
    f.writelines(dropped)
  with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, delete=False) as f:
    f.writelines(keep)
  os.chmod(f.name, path.stat().st_mode & 0o7777)  # NamedTemporaryFile makes 0600 files
  os.replace(f.name, path)


class MetricsWriter:
  """Writes scalar metrics of process 0; on other processes every method does nothing.

  resume_step: the restored checkpoint's step. Records after it (written by a run that died before its
  next checkpoint) are moved to metrics.superseded.jsonl and hidden in TensorBoard, so every step appears
  once in metrics.jsonl. tracker: a `tracking.WandbRun` that gets every record too (closed by `close`).
  """

  def __init__(self, workdir, *, process_index: int = 0, resume_step: int | None = None, tracker=None):
    self._active = process_index == 0
    self._tracker = tracker
    if not self._active:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "metrics.jsonl"
    if resume_step is not None and path.exists():
      _drop_after(path, resume_step)
    self._file = open(path, "a")
    # purge_step: TensorBoard hides the dead run's events from that step on. The suffix: tensorboardX names
    # event files by the second, and a second writer within that second would overwrite the first's file.
    purge_step = None if resume_step is None else resume_step + 1
    self._tensorboard = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge_step,
                                      filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, metrics: dict):
    """Records scalar `metrics` (floats, numpy or jax scalars) of `step`."""
    if not self._active:
      return
    if "step" in metrics:
      raise ValueError("'step' is the record's key; rename the metric")
    values = {name: float(value) for name, value in metrics.items()}
    record = {"step": int(step), **{name: _json_value(v) for name, v in values.items()}}
    self._file.write(json.dumps(record) + "\n")
    # Into the OS now: a SIGKILL then loses nothing already written (only a machine crash could).
    self._file.flush()
    for name, value in values.items():
      self._tensorboard.add_scalar(name, value, int(step))
    self._tensorboard.flush()
    if self._tracker is not None:
      self._tracker.log(step, values)

  def close(self):
    if not self._active:
      return
    self._file.close()
    self._tensorboard.close()
    if self._tracker is not None:
      self._tracker.finish()
