"""Loading configs/*.py the way run.py does (by path) and applying dotted overrides, for the tests."""

import fcntl
import importlib.util
import os
import pathlib
import tempfile

from kldistill_jax.train import presets

ROOT = pathlib.Path(__file__).resolve().parents[1]


def module(path):
  """The config file at `path` (absolute, or a name under configs/) as a module."""
  path = pathlib.Path(path)
  if not path.is_absolute():
    path = ROOT / "configs" / f"{path}.py"
  spec = importlib.util.spec_from_file_location(path.stem, path)
  loaded = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(loaded)
  return loaded


def load(name, arg=None, **overrides):
  """configs/<name>.py's get_config(arg) with {"a.b": value} overrides applied."""
  return presets.with_overrides(module(name).get_config(arg), overrides.items())


SMOKE_STUDY_DIR = "KLD_STUDY_SMOKE_DIR"  # set by conftest.py for a whole test session, xdist workers included


def smoke_study() -> pathlib.Path:
  """The workdir of the `:smoke` study, run once per test session: tests/test_study.py and
  notebooks/tradeoffs.ipynb (whose kernel inherits the variable) share $KLD_STUDY_SMOKE_DIR/study. Whoever
  comes first runs it while the other waits on the lock, then finds it done (report.md is written last).
  Without the variable (a notebook run by hand): a fresh temporary directory."""
  from kldistill_jax.train import study  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(os.environ.get(SMOKE_STUDY_DIR) or tempfile.mkdtemp(prefix="study_smoke_"))
  directory.mkdir(parents=True, exist_ok=True)
  workdir = directory / "study"
  with open(directory / "smoke.lock", "w") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
    if not (workdir / "report.md").is_file():
      study.run_study(load("study", "smoke"), workdir)
  return workdir
