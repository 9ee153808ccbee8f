"""The teacher trajectory cache: rows are the teacher's own samples (checked by re-scoring them), a run on
the cache equals the online teacher-prefix run, the teacher costs nothing per step afterwards, a killed build
resumes to the same bytes, each process reads only its own shards, and changed settings are refused."""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kldistill_jax import data, sampling
from kldistill_jax.models import hf
from kldistill_jax.train import prefixes, runner, setup, trajectories
from test_bad_input import TEACHER, tiny_config
from test_resume_and_processes import TIMEOUT, _env, _free_port, _Process, _wait_all


def _offline_rl(**overrides):
  return tiny_config(**{"objective.prefix": "teacher", "objective.estimator": "sampled", "steps": 3,
                        "checkpoint_every": 3, "export.dtype": "float32", **overrides})  # compared exports


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  online, cached = tmp_path_factory.mktemp("online"), tmp_path_factory.mktemp("cached")
  runner.run_distill(_offline_rl(), online)
  runner.run_distill(_offline_rl(**{"teacher_cache.enabled": True}), cached)
  return online, cached


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_cache_rows_are_teacher_samples(runs):
  _, cached = runs
  rows = trajectories.TrajectorySource(cached / "trajectories")
  assert len(rows) == 3 * 8  # steps x batch_size
  batch = {k: np.stack([rows[i][k] for i in range(len(rows))]) for k in trajectories.KEYS}
  teacher = hf.load(TEACHER)
  logprobs, _ = sampling.score(teacher, jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"]))
  trained = batch["loss_mask"].astype(bool)
  assert trained.sum() > 0
  np.testing.assert_allclose(batch["teacher_logprobs"][trained], np.asarray(logprobs)[trained], atol=2e-5)
  # Sampling temperature 1, no truncation: the behaviour policy IS the teacher.
  np.testing.assert_allclose(batch["behavior_logprobs"][trained], batch["teacher_logprobs"][trained],
                             atol=2e-5)


def test_cached_run_equals_online_run(runs):
  online, cached = runs
  for a, b in zip(_metrics(online), _metrics(cached)):
    assert a["step"] == b["step"]
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4, atol=1e-6)
    assert a["response_length"] == b["response_length"]
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  a, b = load_file(online / "student" / "model.safetensors"), load_file(cached / "student" / "model.safetensors")
  for name in a:
    np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_teacher_flops_stop_growing_with_the_cache(runs):
  online, cached = runs
  online_flops = [m["teacher_flops"] for m in _metrics(online)]
  cached_flops = [m["teacher_flops"] for m in _metrics(cached)]
  assert online_flops[0] < online_flops[1] < online_flops[2]  # generation + scoring every step
  assert cached_flops[0] == cached_flops[-1] > 0  # only the one-off build
  info = json.loads((cached / "trajectories" / trajectories.INFO).read_text())
  assert cached_flops[0] == info["teacher_flops"]
  # The build sampled what the online run sampled (same prompts, keys and lengths): the same generation cost.
  generation = [m["teacher_generation_flops"] for m in (_metrics(online)[-1], _metrics(cached)[-1])]
  assert generation[0] == generation[1] > 0


# ----------------------------------------------------------------------------- sharded build, resume, reading

def _cache_config(**overrides):
  return _offline_rl(**{"teacher_cache.enabled": True, **overrides})


def _inputs(config):
  """What run_distill hands `trajectories.build`: teacher, training source, tokenizer, mesh."""
  mesh = setup.make_mesh(config)
  tokenizer = data.load_tokenizer(config.data.tokenizer)
  teacher = setup.load_model(config.teacher, "teacher", tokenizer.vocab_size, mesh, config.seed + 1)
  return teacher, setup.make_source(config, "train"), tokenizer, mesh


@pytest.fixture(scope="module")
def inputs():
  return _inputs(_cache_config())


def _build(inputs, config, path):
  teacher, source, tokenizer, mesh = inputs
  with jax.set_mesh(mesh):
    return trajectories.build(teacher, source, tokenizer, config, path, mesh=mesh)


def _files(path):
  return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


class _Killed(Exception):
  pass


def _counting_sampler(monkeypatch, kill_at=None):
  """Counts teacher sampling calls; call number `kill_at` (1-based) raises instead, like a kill."""
  calls = []
  real = prefixes.from_sampler

  def sampler(*args, **kwargs):
    calls.append(1)
    if len(calls) == kill_at:
      raise _Killed
    return real(*args, **kwargs)
  monkeypatch.setattr(prefixes, "from_sampler", sampler)
  return calls


def test_killed_build_resumes_to_the_same_bytes(runs, inputs, tmp_path, monkeypatch):
  _, cached = runs
  reference = _files(cached / "trajectories")  # run_distill's uninterrupted build: 3 batches of 8
  assert sorted(reference) == sorted([trajectories.INFO] + [
      f"process-00000/batch-{i:07d}/{name}" for i in range(3)
      for name in [f"{k}.npy" for k in trajectories.KEYS] + [trajectories.SHARD_INFO]])
  config, path = _cache_config(), tmp_path / "trajectories"

  calls = _counting_sampler(monkeypatch, kill_at=2)
  with pytest.raises(_Killed):
    _build(inputs, config, path)
  assert [p.name for p in sorted((path / "process-00000").iterdir())] == ["batch-0000000"]
  assert not json.loads((path / trajectories.INFO).read_text()).get("complete")
  with pytest.raises(ValueError, match="not finished"):
    trajectories.TrajectorySource(path)
  # Killed while writing batch 1: a partial temporary shard, never read, replaced on resume.
  partial = path / "process-00000" / ".batch-0000001.tmp"
  partial.mkdir()
  (partial / "tokens.npy").write_bytes(b"partial")

  calls = _counting_sampler(monkeypatch)
  flops = _build(inputs, config, path)
  assert len(calls) == 2  # batches 1 and 2 only: batch 0 was not sampled again
  assert _files(path) == reference  # bit for bit, the json's settings and teacher FLOPs included
  assert flops == json.loads(reference[trajectories.INFO])["teacher_flops"] > 0

  assert _build(inputs, config, path) == flops and len(calls) == 2  # finished: reused, nothing sampled


def test_each_process_reads_only_its_own_shards(runs, tmp_path, monkeypatch):
  """A cache laid out as a 2-process build writes it (process p: rows [4p, 4p + 4) of each global batch)."""
  _, cached = runs
  one = trajectories.TrajectorySource(cached / "trajectories")
  rows = {k: np.stack([one[i][k] for i in range(len(one))]).reshape(3, 8, -1) for k in trajectories.KEYS}
  info = json.loads((cached / "trajectories" / trajectories.INFO).read_text())
  path = tmp_path / "two_processes"
  for p in (0, 1):
    for i in range(3):
      trajectories._write_shard(trajectories.shard_dir(path, p, i),  # pylint: disable=protected-access
                                {k: v[i, 4 * p:4 * p + 4] for k, v in rows.items()}, 1)
  (path / trajectories.INFO).write_text(json.dumps({**info, "process_count": 2}))

  config = _cache_config()
  opened = []
  load = np.load
  monkeypatch.setattr(np, "load", lambda file, *a, **k: opened.append(str(file)) or load(file, *a, **k))
  for p in (0, 1):
    opened.clear()
    dataset = trajectories.make_dataset(path, batch_size=4, process_index=p, process_count=2)
    first_pass = [dataset[i] for i in range(3)]
    assert opened and all(f"/process-{p:05d}/" in f for f in opened)  # never another process's shards
    assert all(f.endswith(".npy") for f in opened)
    assert len(opened) == 3 * len(trajectories.KEYS)  # each shard's files once, however many rows
    # The rows process p trains on: its half of each global batch, on its own half of the prompts.
    prompts = data.make_dataset(setup.make_source(config, "train"), data.load_tokenizer(config.data.tokenizer),
                                template=config.data.template, prompt_len=config.data.prompt_len,
                                response_len=config.data.response_len, batch_size=4, seed=config.data.seed,
                                process_index=p, process_count=2)
    for i, batch in enumerate(first_pass):
      for k in trajectories.KEYS:
        np.testing.assert_array_equal(batch[k], rows[k][i, 4 * p:4 * p + 4])
      np.testing.assert_array_equal(batch["tokens"][:, :config.data.prompt_len], prompts[i]["prompt_tokens"])
    assert np.array_equal(dataset[3]["tokens"], first_pass[0]["tokens"])  # repeats: epoch 2 = epoch 1
  # Read as one process: every row, in the training order.
  whole = trajectories.TrajectorySource(path)
  np.testing.assert_array_equal(np.stack([whole[i]["tokens"] for i in range(24)]).reshape(3, 8, -1),
                                rows["tokens"])
  with pytest.raises(ValueError, match=r"batch_size=8 rows per process x 2 processes"):
    trajectories.make_dataset(path, batch_size=8, process_index=0, process_count=2)


@pytest.mark.parametrize("field,value,key,others", [
    ("teacher_cache.num_trajectories", 16, "num_trajectories", {}),
    ("sampling.temperature", 0.5, "temperature", {}),
    ("sampling.max_new_tokens", 8, "max_new_tokens", {}),
    ("data.seed", 7, "data_seed", {}),
    ("seed", 3, "seed", {}),
    ("batch_size", 16, "batch_size", {"teacher_cache.num_trajectories": 24}),  # the same number of rows
])
def test_reuse_with_other_settings_is_refused(runs, inputs, tmp_path, monkeypatch, field, value, key, others):
  """Both for a finished cache and for resuming a stopped build; nothing is deleted or sampled."""
  _, cached = runs
  finished = cached / "trajectories"
  before = _files(finished)
  stopped = tmp_path / "stopped"
  stopped.mkdir()
  (stopped / trajectories.INFO).write_text(
      json.dumps({k: v for k, v in json.loads(before[trajectories.INFO]).items()
                  if k not in ("complete", "teacher_flops")}))
  calls = _counting_sampler(monkeypatch)
  recorded = json.loads(before[trajectories.INFO])[key]
  for path in (finished, stopped):
    with pytest.raises(ValueError, match=rf"{field}={value} but the cache at {path} was built with "
                                         rf"{key}={recorded}"):
      _build(inputs, _cache_config(**{field: value, **others}), path)
  assert not calls and _files(finished) == before and sorted(_files(stopped)) == [trajectories.INFO]


# Each of two `jax.distributed` processes (one CPU device each) builds the cache of test_cache_config.
_PROCESS = """
import json, sys
import jax
address, process_id, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=process_id)
sys.path.insert(0, "tests")
import test_trajectories as t
config = t._cache_config()
print(json.dumps(t._build(t._inputs(config), config, path)))
"""


def _build_in_two_processes(path, logs, run):
  address = f"127.0.0.1:{_free_port()}"
  env = _env(1, logs / "compile_cache")  # the second run skips XLA compilation
  processes = [_Process([sys.executable, "-c", _PROCESS, address, str(i), str(path)], env, logs,
                        f"run{run}_process{i}") for i in (0, 1)]
  try:
    _wait_all(processes, time.monotonic() + TIMEOUT)
  finally:
    for p in processes:
      p.kill()
  return [json.loads(p.stdout().splitlines()[-1]) for p in processes]


def test_two_processes_write_their_own_rows_and_resume_together(runs, tmp_path):
  """Real processes: each writes only its half of every global batch (the rows the one-process build
  placed there), and a build the two left at different batches restarts at the earlier one."""
  _, cached = runs
  one = trajectories.TrajectorySource(cached / "trajectories")
  reference = json.loads((cached / "trajectories" / trajectories.INFO).read_text())
  path = tmp_path / "trajectories"
  assert _build_in_two_processes(path, tmp_path, 1) == [reference["teacher_flops"]] * 2
  assert json.loads((path / trajectories.INFO).read_text()) == {**reference, "process_count": 2}
  for p in (0, 1):
    assert [d.name for d in sorted((path / f"process-{p:05d}").iterdir())] == [
        f"batch-{i:07d}" for i in range(3)]
    for i in range(3):
      for k in trajectories.KEYS:
        rows = np.stack([one[8 * i + j][k] for j in range(4 * p, 4 * p + 4)])
        stored = np.load(trajectories.shard_dir(path, p, i) / f"{k}.npy")
        # Eight simulated devices there, two processes here: the same samples, float32 rounding aside.
        np.testing.assert_allclose(stored, rows, rtol=0, atol=1e-5, err_msg=f"process {p} batch {i} {k}")
        if k != "behavior_logprobs" and k != "teacher_logprobs":
          np.testing.assert_array_equal(stored, rows)

  # Stopped with process 0 at batch 2 and process 1 at batch 1 (shards are written in order).
  built = _files(path)
  incomplete = {k: v for k, v in reference.items() if k not in ("complete", "teacher_flops")}
  (path / trajectories.INFO).write_text(json.dumps({**incomplete, "process_count": 2}))
  for p, i in ((0, 2), (1, 1), (1, 2)):
    for file in trajectories.shard_dir(path, p, i).iterdir():
      file.unlink()
    trajectories.shard_dir(path, p, i).rmdir()
  assert _build_in_two_processes(path, tmp_path, 2) == [reference["teacher_flops"]] * 2
  assert _files(path) == built
