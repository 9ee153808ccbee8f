"""MetricsWriter: valid JSON lines with non-finite values, TensorBoard scalars, process 0 only, resume."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kldistill_jax.train.metrics import MetricsWriter, read_metrics


def _strict_json(line):
  def reject(constant):
    raise ValueError(f"not JSON: {constant}")
  return json.loads(line, parse_constant=reject)


def _scalars(workdir, tag):
  events = EventAccumulator(str(workdir / "tensorboard"))
  events.Reload()
  return [(e.step, e.value) for e in events.Scalars(tag)]


def test_writes_json_lines_and_tensorboard(tmp_path):
  writer = MetricsWriter(tmp_path)
  writer.write(1, {"loss": 0.5, "lr": np.float32(1e-3), "kl": jnp.float32(2.0)})
  writer.write(2, {"loss": float("nan"), "lr": np.float64(np.inf), "kl": -np.inf})
  writer.close()

  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [_strict_json(line) for line in lines] == [
      {"step": 1, "loss": 0.5, "lr": float(np.float32(1e-3)), "kl": 2.0},
      {"step": 2, "loss": "nan", "lr": "inf", "kl": "-inf"}]
  records = read_metrics(tmp_path)
  assert math.isnan(records[1]["loss"]) and records[1]["lr"] == math.inf and records[1]["kl"] == -math.inf
  assert _scalars(tmp_path, "loss")[0] == (1, 0.5)
  assert _scalars(tmp_path, "kl") == [(1, 2.0), (2, -math.inf)]


def test_other_processes_write_nothing(tmp_path):
  writer = MetricsWriter(tmp_path / "run", process_index=1)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "run").exists()


def test_each_line_is_on_disk_before_close(tmp_path):
  writer = MetricsWriter(tmp_path)
  writer.write(1, {"loss": 1.0})
  assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
  writer.close()


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
  dead = MetricsWriter(tmp_path)
  for step in range(1, 6):
    dead.write(step, {"loss": float(step)})
  dead.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # the run was killed mid-line

  resumed = MetricsWriter(tmp_path, resume_step=3)
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
  for step in (4, 5, 6):
    resumed.write(step, {"loss": 10.0 * step})
  resumed.close()

  expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
  assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == expected
  assert _scalars(tmp_path, "loss") == expected
  # No temp file left; the dead run's records of steps 4-5 are kept aside, not lost (the cut line is not a
  # record), and the file keeps its mode.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "metrics.superseded.jsonl",
                                                        "tensorboard"]
  superseded = [json.loads(line) for line in (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in superseded] == [(4, 4.0), (5, 5.0)]


def test_resume_keeps_the_file_mode(tmp_path):
  writer = MetricsWriter(tmp_path)
  writer.write(1, {"loss": 1.0})
  writer.write(2, {"loss": 2.0})
  writer.close()
  os.chmod(tmp_path / "metrics.jsonl", 0o644)
  MetricsWriter(tmp_path, resume_step=1).close()  # drops step 2: the file is rewritten
  assert (tmp_path / "metrics.jsonl").stat().st_mode & 0o777 == 0o644


def test_step_is_not_a_metric_name(tmp_path):
  writer = MetricsWriter(tmp_path)
  with pytest.raises(ValueError, match="step"):
    writer.write(1, {"step": 1.0})
  writer.close()
