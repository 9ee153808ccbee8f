"""`python run.py` as a user runs it: SIGKILL and resume, two `jax.distributed` processes, damaged checkpoints.

Every run is a subprocess with a tiny quickstart config, its own XLA_FLAGS device count and JAX_PLATFORMS=cpu
(this file's process has 8 simulated devices from conftest; the children must not inherit that).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from kldistill_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds per subprocess: a run takes 10-40 s here; this only stops a hang
TINY = ("--config.student.warmup_steps=0", "--config.batch_size=8", "--config.eval.num_problems=8",
        "--config.eval.batch_size=8", "--config.data.difficulties=(2,)", "--config.eval.difficulties=(2,)",
        "--config.sampling.max_new_tokens=12", "--config.eval.max_new_tokens=12", "--config.log_every=1",
        "--config.export.dtype=float32",  # the runs are compared through student/: the float32 masters
        "--verbosity=0")  # INFO logs: the "resumed from step N" line proves a rerun resumed
TIMING = ("step_time_s", "tokens_per_s")  # wall-clock metrics, the only ones allowed to differ
# Steps of the SIGKILL and damage tests: `steps` is part of the learning-rate schedule, hence of the
# compiled train step; one value lets both tests share compile_cache.
STEPS = 8


def _command(workdir, *overrides):
  return [sys.executable, "run.py", "--config", "configs/quickstart.py", "--workdir", str(workdir), *TINY,
          *overrides]


def _env(devices, cache=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if cache is not None:  # reruns of one program skip XLA compilation (most of a tiny run's time)
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


class _Process:
  """A run.py subprocess in its own session, output in files (a full pipe would block it)."""

  def __init__(self, command, env, logs, name):
    self.out_path, self.err_path = logs / f"{name}.out", logs / f"{name}.err"
    with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
      self.popen = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err,
                                    start_new_session=True)

  def kill(self):
    if self.popen.poll() is None:
      os.killpg(self.popen.pid, signal.SIGKILL)  # the whole group: no orphaned helper outlives the test
    self.popen.wait()

  def wait(self, deadline):
    try:
      return self.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"{self.err_path.stem} still running after {TIMEOUT} s:\n{self.stderr()[-3000:]}")

  def stdout(self):
    return self.out_path.read_text()

  def stderr(self):
    return self.err_path.read_text()


def _run(command, env, logs, name):
  """Runs to the end; fails the test on a non-zero exit, with the output's tail."""
  process = _Process(command, env, logs, name)
  try:
    rc = process.wait(time.monotonic() + TIMEOUT)
  finally:
    process.kill()
  assert rc == 0, f"{name} exited with {rc}:\n{process.stderr()[-4000:]}"
  return process


def _finished_steps(workdir):
  """Steps orbax has finalised: in-progress saves are `<step>.orbax-checkpoint-tmp*` until renamed."""
  directory = workdir / "checkpoints"
  names = [p.name for p in directory.iterdir()] if directory.is_dir() else []
  return sorted(int(name) for name in names if name.isdigit())


def _resumed_steps(stderr):
  found = re.findall(r"resumed from checkpoint step (\d+)", stderr)
  return [int(s) for s in found]


def _steps(workdir):
  return [record["step"] for record in read_metrics(workdir)]


def _without_timing(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _params(workdir):
  return load_file(str(workdir / "student" / "model.safetensors"))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_compilation_cache")


# A save every step for the SIGKILL test; the SIGTERM test passes a larger interval (it changes nothing
# the run computes: the config check lets it differ, and the reference run is shared).
INTERRUPTED = (f"--config.steps={STEPS}", "--config.keep_checkpoints=2")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, compile_cache):
  """A run of STEPS steps start to end: what an interrupted and resumed run must reproduce bit for bit."""
  tmp = tmp_path_factory.mktemp("uninterrupted")
  run = _run(_command(tmp / "a", *INTERRUPTED, "--config.checkpoint_every=1"), _env(1, compile_cache), tmp,
             "a")
  assert not _resumed_steps(run.stderr())
  return tmp / "a"


def _assert_same_run(a, b, steps=STEPS):
  params_a, params_b = _params(a), _params(b)
  assert params_a.keys() == params_b.keys()
  for name in params_a:  # XLA on CPU is deterministic and step i's keys depend on i only: bit for bit
    assert params_a[name].dtype == params_b[name].dtype
    np.testing.assert_array_equal(params_a[name].view(np.uint8), params_b[name].view(np.uint8), err_msg=name)
  assert _steps(b) == list(range(1, steps + 1))  # each step once: records past the checkpoint were dropped
  assert _without_timing(read_metrics(a)) == _without_timing(read_metrics(b))
  results_a, results_b = (json.loads((w / "results.json").read_text()) for w in (a, b))
  assert results_a == results_b  # evaluation and the FLOP counters restored from the checkpoint's meta


def test_sigterm_saves_the_step_in_flight_and_resumes_exactly(tmp_path, compile_cache, uninterrupted):
  # No periodic checkpoint before the end: the only one on disk after SIGTERM is the preemption save.
  overrides = (*INTERRUPTED, f"--config.checkpoint_every={STEPS}")
  env, b = _env(1, compile_cache), tmp_path / "b"
  stopped = _Process(_command(b, *overrides), env, tmp_path, "b_sigterm")
  deadline = time.monotonic() + TIMEOUT
  try:
    while not ((b / "metrics.jsonl").is_file() and len(read_metrics(b)) >= 2):
      if stopped.popen.poll() is not None or time.monotonic() > deadline:
        pytest.fail(f"run B ended or hung before step 2:\n{stopped.stderr()[-3000:]}")
      time.sleep(0.02)
    os.killpg(stopped.popen.pid, signal.SIGTERM)
    rc = stopped.wait(deadline)
  finally:
    stopped.kill()
  assert rc == 128 + signal.SIGTERM, stopped.stderr()[-3000:]
  saved = _finished_steps(b)
  assert len(saved) == 1 and 2 <= saved[0] < STEPS, saved
  assert _steps(b) == list(range(1, saved[0] + 1))  # nothing lost: the step in flight was logged and saved
  assert f"checkpoint step {saved[0]} is on disk" in stopped.stderr()
  assert not (b / "student").exists()

  resumed = _run(_command(b, *overrides), env, tmp_path, "b_resumed")
  assert _resumed_steps(resumed.stderr()) == saved
  assert "teacher: evaluation reused" in resumed.stderr()  # a restart does not sample the teacher again
  _assert_same_run(uninterrupted, b)


def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path, compile_cache, uninterrupted):
  steps, kill_after = STEPS, 2  # a save every step; killed once step `kill_after` is on disk
  overrides = (*INTERRUPTED, "--config.checkpoint_every=1")
  env = _env(1, compile_cache)
  a, b = uninterrupted, tmp_path / "b"

  killed = _Process(_command(b, *overrides), env, tmp_path, "b_killed")
  deadline = time.monotonic() + TIMEOUT
  try:
    while not any(s >= kill_after for s in _finished_steps(b)):
      if killed.popen.poll() is not None:
        pytest.fail(f"run B exited ({killed.popen.returncode}) before step {kill_after} was saved:\n"
                    f"{killed.stderr()[-3000:]}")
      if time.monotonic() > deadline:
        pytest.fail(f"no checkpoint {kill_after} after {TIMEOUT} s:\n{killed.stderr()[-3000:]}")
      time.sleep(0.02)
    os.killpg(killed.popen.pid, signal.SIGKILL)
  finally:
    killed.kill()
  assert killed.popen.returncode == -signal.SIGKILL
  on_disk = _finished_steps(b)
  assert not (b / "student" / "model.safetensors").exists() and not (b / "results.json").exists()
  assert max(on_disk) < steps, f"killed too late: checkpoints {on_disk}"

  resumed = _run(_command(b, *overrides), env, tmp_path, "b_resumed")
  assert _resumed_steps(resumed.stderr()) == [max(on_disk)]
  assert "taking over the lock left by pid" in resumed.stderr()  # the killed run's lock died with it
  _assert_same_run(a, b)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_all(processes, deadline):
  """Waits for every process to exit 0; stops at the first failure, whose peer would wait on it forever."""
  while any(p.popen.poll() is None for p in processes):
    for p in processes:
      rc = p.popen.poll()
      assert rc in (None, 0), f"{p.err_path.stem} exited with {rc}:\n{p.stderr()[-4000:]}"
    if time.monotonic() > deadline:
      pytest.fail(f"still running after {TIMEOUT} s: "
                  f"{[p.err_path.stem for p in processes if p.popen.poll() is None]}")
    time.sleep(0.2)
  for p in processes:
    assert p.popen.returncode == 0, f"{p.err_path.stem} exited with {p.popen.returncode}:\n{p.stderr()[-4000:]}"


def test_two_processes_match_one_process_with_two_devices(tmp_path):
  overrides = ("--config.steps=4", "--config.checkpoint_every=2")
  single, multi = tmp_path / "single", tmp_path / "multi"
  address = f"127.0.0.1:{_free_port()}"
  dist = ("--config.distributed.mode=explicit", f"--config.distributed.coordinator_address={address}",
          "--config.distributed.num_processes=2")
  # All three at once: two cores, and each process compiles mostly on one thread.
  processes = [_Process(_command(single, *overrides), _env(2), tmp_path, "single")]
  processes += [_Process(_command(multi, *overrides, *dist, f"--config.distributed.process_id={i}"), _env(1),
                         tmp_path, f"process{i}") for i in (0, 1)]
  try:
    _wait_all(processes, time.monotonic() + TIMEOUT)
  finally:
    for p in processes:
      p.kill()
  single_run, process0, process1 = processes
  assert "process 0 of 2" in process0.stderr() and "process 1 of 2" in process1.stderr()

  params_single, params_multi = _params(single), _params(multi)
  assert params_single.keys() == params_multi.keys()
  worst_abs = worst_rel = 0.0
  for name in params_single:
    x, y = params_single[name].astype(np.float64), params_multi[name].astype(np.float64)
    worst_abs = max(worst_abs, float(np.abs(x - y).max()))
    worst_rel = max(worst_rel, float((np.abs(x - y) / np.maximum(np.abs(x), 1e-6)).max()))
    # Cross-process sums (gloo) may add in another order than in-process ones: float32 rounding only.
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5, err_msg=name)
  print(f"2 processes vs 1 process x 2 devices: max |diff| {worst_abs:.3g}, max relative {worst_rel:.3g}")

  # Process 0 alone writes metrics and results: one record per step, one TensorBoard event file.
  assert _steps(multi) == [1, 2, 3, 4]
  assert len(list((multi / "tensorboard").glob("events.*"))) == 1
  assert json.loads((multi / "results.json").read_text()).keys() == \
      json.loads((single / "results.json").read_text()).keys()
  assert "student after" in process0.stdout() and "student after" not in process1.stdout()
  for a, b in zip(read_metrics(single), read_metrics(multi)):
    for key in a:
      if key not in TIMING:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """A preemption notice reaches one host: every process finishes the same step, saves its shards of one
  checkpoint, and exits 128 + SIGTERM."""
  workdir, address = tmp_path / "multi", f"127.0.0.1:{_free_port()}"
  dist = ("--config.distributed.mode=explicit", f"--config.distributed.coordinator_address={address}",
          "--config.distributed.num_processes=2")
  overrides = ("--config.steps=40", "--config.checkpoint_every=40", *dist)
  processes = [_Process(_command(workdir, *overrides, f"--config.distributed.process_id={i}"), _env(1),
                        tmp_path, f"process{i}") for i in (0, 1)]
  deadline = time.monotonic() + TIMEOUT
  try:
    while not ((workdir / "metrics.jsonl").is_file() and len(read_metrics(workdir)) >= 2):
      if any(p.popen.poll() is not None for p in processes) or time.monotonic() > deadline:
        pytest.fail("a process ended or hung before step 2:\n" + "\n".join(p.stderr()[-2000:] for p in processes))
      time.sleep(0.05)
    os.kill(processes[1].popen.pid, signal.SIGTERM)  # process 1 only
    codes = [p.wait(deadline) for p in processes]
  finally:
    for p in processes:
      p.kill()
  assert codes == [128 + signal.SIGTERM] * 2, [p.stderr()[-2000:] for p in processes]
  saved = _finished_steps(workdir)
  assert len(saved) == 1 and saved[0] < 40, saved
  for p in processes:
    assert f"stopped on SIGTERM after step {saved[0]} of 40" in p.stderr()
  assert _steps(workdir) == list(range(1, saved[0] + 1))


DAMAGE = b"damaged checkpoint!"


@pytest.fixture(scope="module")
def damaged_rerun(tmp_path_factory, compile_cache):
  """A finished run whose newest checkpoint (STEPS) had its array files overwritten, rerun for 2 more steps."""
  tmp = tmp_path_factory.mktemp("damaged")
  workdir, env = tmp / "run", _env(1, compile_cache)
  overrides = ("--config.checkpoint_every=2", "--config.keep_checkpoints=3")
  _run(_command(workdir, f"--config.steps={STEPS}", *overrides), env, tmp, "first")
  assert _finished_steps(workdir) == [STEPS - 4, STEPS - 2, STEPS]
  # The tensorstore (OCDBT) data files: every array and the b-tree that indexes them.
  damaged = [p for p in (workdir / "checkpoints" / str(STEPS) / "state").rglob("*")
             if p.is_file() and p.parent.name == "d"]
  assert damaged
  for path in damaged:
    size = path.stat().st_size
    path.write_bytes((DAMAGE * (size // len(DAMAGE) + 1))[:size])
  rerun = _run(_command(workdir, f"--config.steps={STEPS + 2}", *overrides), env, tmp, "rerun")
  return workdir, rerun


def test_damaged_newest_checkpoint_falls_back_to_the_previous(damaged_rerun):
  workdir, rerun = damaged_rerun
  stderr = rerun.stderr()
  assert re.search(rf"checkpoint step {STEPS} in \S+ failed to restore", stderr), stderr[-4000:]
  assert _resumed_steps(stderr) == [STEPS - 2]
  # Reported in a few lines (no tensorstore spec dumps, no "Exception ignored" tracebacks); kept, not deleted.
  assert "tensorstore_spec" not in stderr and "Exception ignored" not in stderr, stderr[-4000:]
  about_checkpoints = [line for line in stderr.splitlines()
                       if re.match(r"[WE]\d{4} ", line) and "checkpoint" in line]
  assert len(about_checkpoints) == 2, "\n".join(about_checkpoints)  # the damaged step, then the resume
  assert (workdir / "checkpoints" / f"{STEPS}.damaged" / "state").is_dir()
  assert _steps(workdir) == list(range(1, STEPS + 3))  # the first run's last 2 records dropped, rerun once
  assert STEPS + 2 in _finished_steps(workdir) and (workdir / "student" / "model.safetensors").is_file()


def test_damaged_checkpoint_is_replaced_by_the_rerun(damaged_rerun):
  workdir, _ = damaged_rerun
  assert STEPS in _finished_steps(workdir)
  files = [p for p in (workdir / "checkpoints" / str(STEPS)).rglob("*") if p.is_file()]
  assert not any(DAMAGE in p.read_bytes() for p in files), f"step {STEPS} is still the damaged checkpoint"
