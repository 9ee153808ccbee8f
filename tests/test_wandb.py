"""Weights & Biases logging (`log.wandb_project`) in W&B's offline mode: the loop's scalars (those of
metrics.jsonl and TensorBoard) and the resolved config land in the run's own transaction log, read back here
record by record; the study report's plots and report.md too; with the project unset nothing imports wandb."""

import json
import pathlib
import struct
import sys

import grain
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import pytest

from kldistill_jax.models import sharding
from kldistill_jax.train import loop, metrics, tracking, workdir as workdir_lib
from kldistill_jax.train.defaults import base_config
from kldistill_jax.train.state import init_state

matplotlib.use("Agg")


def _config(project="", steps=3):
  c = base_config()
  c.steps, c.log_every, c.checkpoint_every = steps, 2, 100
  c.log.wandb_project = project
  return c


def _run_loop(config, workdir):
  """run_loop on a one-parameter state with a fake step: no model, so no compile; what it logs is known."""
  state = init_state({"w": jnp.zeros(2)}, optax.sgd(0.1), seed=0)
  dataset = grain.MapDataset.source([{"x": np.zeros(1, np.float32)}]).repeat(64).batch(8, drop_remainder=True)
  iterator = iter(dataset.to_iter_dataset())

  def one_step(state, step, data_batch, key, meta):
    del data_batch, key, meta
    return state, {"loss": 1.0 / (step + 1), "grad_norm": float(step), "num_tokens": 4.0}, set()

  mesh = sharding.make_mesh(jax.device_count(), 1, 1)
  return loop.run_loop(config, workdir, mesh=mesh, state=state, iterator=iterator, meta={}, one_step=one_step,
                       desc="test")


def _records(workdir):
  """The protobuf records of the offline W&B run in `workdir`: W&B's transaction log (a LevelDB-style log:
  a 7-byte file header, then 32 KiB blocks of chunks with a 7-byte header: crc32, length, type)."""
  import wandb  # pylint: disable=g-import-not-at-top
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  wandb.teardown()  # W&B's service process writes the log; stopping it flushes it (as a process exit does)
  [path] = pathlib.Path(workdir, "wandb").glob("offline-run-*/run-*.wandb")
  raw, block, position, parts = path.read_bytes(), 32768, 7, []
  assert raw[:4] == b":W&B"
  while position + 7 <= len(raw):
    left = block - position % block
    _, length, kind = struct.unpack("<IHB", raw[position:position + 7]) if left >= 7 else (0, 0, 0)
    if kind == 0:  # the zero padding at a block's end
      position += left
      continue
    parts.append(raw[position + 7:position + 7 + length])
    position += 7 + length
    if kind in (1, 4):  # FULL or LAST chunk: a record is complete
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b"".join(parts))
      parts = []
      yield record


def _history(records):
  return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
          for r in records if r.WhichOneof("record_type") == "history"]


def test_off_by_default_and_never_imported(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
  assert base_config().log.wandb_project == ""
  assert tracking.start(_config(), tmp_path) is None
  _run_loop(_config(), tmp_path)
  tracking.log_report(_config(), tmp_path, tmp_path / "report.md")
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3] and not (tmp_path / "wandb").exists()


def test_offline_run_has_the_loops_scalars_and_config_and_the_reports_plots(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = _config("kldistill-test")
  _run_loop(config, tmp_path / "run")
  records = list(_records(tmp_path / "run"))
  [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  assert (run.project, run.run_id, run.display_name) == ("kldistill-test", tracking.run_id(tmp_path / "run"),
                                                         str((tmp_path / "run").resolve()))
  logged_config = {u.key: json.loads(u.value_json) for u in run.config.update}
  expected = workdir_lib.resolved(config)
  assert {k: logged_config[k] for k in expected} == expected
  # Every record of metrics.jsonl (the TensorBoard scalars), at its step, with the same values.
  written = metrics.read_metrics(tmp_path / "run")
  assert [r["step"] for r in written] == [1, 2, 3]
  logged = [{k: v for k, v in row.items() if not k.startswith("_")} for row in _history(records)]
  assert logged == written

  # The study's report: plots as images, report.md as a file of the study's own run.
  study = tmp_path / "study"
  (study / "plots").mkdir(parents=True)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  for name in ("accuracy_vs_entropy", "curves"):
    plt.figure()
    plt.plot([0, 1])
    plt.savefig(study / "plots" / f"{name}.png")
    plt.close()
  (study / "report.md").write_text("# report\n")
  tracking.log_report(config, study, study / "report.md")
  rows = _history(list(_records(study)))
  images = {k.split("/")[1]: v for row in rows for k, v in row.items() if k.endswith("/_type")}
  assert images == {"accuracy_vs_entropy": "image-file", "curves": "image-file"}
  [saved] = pathlib.Path(study, "wandb").glob("offline-run-*/files/report.md")
  assert saved.read_text() == "# report\n"
