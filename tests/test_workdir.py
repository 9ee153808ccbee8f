"""One run per workdir (lock), writable before compute, and a rerun that would train something else refused."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from config_files import load
from kldistill_jax.errors import ConfigMismatchError, UserError, WorkdirInUseError
from kldistill_jax.train import workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HOLD = """
import sys, time
from kldistill_jax.train import workdir
lock = workdir.claim(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def live_holder(tmp_path):
  """A separate process holding tmp_path/run's lock (as a live run would)."""
  process = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "run")], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert process.stdout.readline().strip() == "held"
  yield process
  process.kill()
  process.wait()


def test_a_live_run_holds_the_workdir_and_a_dead_one_does_not(tmp_path, live_holder, caplog):
  with pytest.raises(WorkdirInUseError, match=rf"in use by a live run: pid {live_holder.pid} on host"):
    workdir.claim(tmp_path / "run")
  live_holder.kill()  # dies without releasing: the kernel drops its flock, its note stays in the file
  live_holder.wait()
  with caplog.at_level(logging.WARNING):
    lock = workdir.claim(tmp_path / "run")
  assert f"taking over the lock left by pid {live_holder.pid}" in caplog.text
  assert json.loads((tmp_path / "run" / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()
  lock.release()
  caplog.clear()
  with caplog.at_level(logging.WARNING), workdir.claimed(tmp_path / "run"):  # a clean release leaves no note
    pass
  assert "taking over" not in caplog.text


def test_an_unwritable_workdir_is_refused(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError, match="cannot write there"):
    workdir.claim(tmp_path / "file" / "run")


def test_the_second_run_on_a_workdir_exits_2_with_one_line(tmp_path, live_holder):
  began = time.monotonic()
  result = subprocess.run([sys.executable, "run.py", "--config", "configs/quickstart.py:smoke", "--workdir",
                           str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and f"pid {live_holder.pid}" in errors[0], result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [workdir.LOCK_FILE]  # nothing computed
  print(f"refused in {time.monotonic() - began:.1f} s")


def test_config_record_refuses_what_changes_training_and_logs_the_rest(tmp_path, caplog):
  config = load("quickstart", "smoke")
  workdir.check_config(tmp_path, config)
  recorded = json.loads((tmp_path / workdir.CONFIG_FILE).read_text())
  assert recorded["job"] == "distill" and recorded["config"]["objective.kl"] == "reverse"

  hybrid = load("quickstart", "smoke", **{"objective.kl": "forward", "steps": 70,
                                          "optimizer.grad_clip": 0.0})
  with pytest.raises(ConfigMismatchError) as error:
    workdir.check_config(tmp_path, hybrid)
  message = str(error.value)
  assert 'objective.kl: "reverse" -> "forward"' in message and "optimizer.grad_clip: 1.0 -> 0.0" in message
  assert "steps" not in message  # growing the run is allowed
  assert json.loads((tmp_path / workdir.CONFIG_FILE).read_text()) == recorded  # the record is untouched

  with pytest.raises(ConfigMismatchError, match="steps: 2 -> 1"):
    workdir.check_config(tmp_path, load("quickstart", "smoke", steps=1))

  extended = load("quickstart", "smoke", **{"steps": 5, "log_every": 3, "eval.num_problems": 16,
                                            "mesh.data": 1})
  with caplog.at_level(logging.WARNING):
    workdir.check_config(tmp_path, extended)
  for line in ("steps: 2 -> 5", "log_every: 1 -> 3", "eval.num_problems: 8 -> 16", "mesh.data: -1 -> 1"):
    assert line in caplog.text
  assert json.loads((tmp_path / workdir.CONFIG_FILE).read_text())["config"]["steps"] == 5


def test_with_the_curriculum_on_its_held_out_set_is_part_of_training(tmp_path):
  overrides = {"curriculum.enabled": True, "objective.estimator": "exact"}
  workdir.check_config(tmp_path, load("quickstart", "smoke", **overrides))
  workdir.check_config(tmp_path, load("quickstart", "smoke", **overrides, **{"eval.pass_k": (1,)}))
  with pytest.raises(ConfigMismatchError, match="eval.num_problems: 8 -> 16"):
    workdir.check_config(tmp_path, load("quickstart", "smoke", **overrides, **{"eval.num_problems": 16}))
