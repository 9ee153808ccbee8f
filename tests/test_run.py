"""run.py and the configs: every config loads, the identities job runs end to end and fails loudly."""

import pathlib
import subprocess
import sys

import pytest

import config_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def _run(*args):
  return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
  module = config_files.module(path)
  config = module.get_config()
  assert config.job and module.__doc__ and "python run.py --config" in module.__doc__


def test_identities_job_prints_both_sides():
  result = _run("--config", "configs/identities.py", "--config.mc.repeats=50")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "max|lhs|" in out and "max|rhs|" in out and "max|lhs-rhs|" in out
  for name in ("soft-target cross-entropy", "exact policy gradient", "discount 1", "frozen student prefixes",
               "mixing is linear", "fitted slope"):
    assert name in out, name
  assert "all identities hold" in out


def test_identities_job_fails_when_a_tolerance_is_missed():
  result = _run("--config", "configs/identities.py", "--config.mc.repeats=20", "--config.tolerance=1e-12")
  assert result.returncode == 1
  assert "FAILED" in result.stdout


def test_mistyped_override_is_an_error():
  result = _run("--config", "configs/identities.py", "--config.mc.repeatz=3")
  assert result.returncode != 0
  assert "repeatz" in result.stderr
