"""What a user sees from run.py: one `error:` line and exit 2 for their mistakes, --help and --show.

Every subprocess here fails or exits before any compute (seconds: the imports)."""

import pathlib
import subprocess
import sys

import ml_collections
import pytest

from kldistill_jax import cli, errors
from kldistill_jax.train.defaults import base_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
  return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _one_error_line(result):
  """The message of the single `error:` line on stderr (and no traceback), after exit code 2."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


def test_misspelled_override_is_one_line_naming_the_nearest_field(tmp_path):
  result = _run("--config", "configs/opd.py", "--config.objective.lamda=0.5", "--workdir", str(tmp_path / "w"))
  assert _one_error_line(result) == ("error: --config.objective.lamda: no field 'lamda' in objective "
                                     "(did you mean 'lam'?)")
  assert not (tmp_path / "w").exists()


def test_bad_value_of_a_known_field_is_one_line(tmp_path):
  result = _run("--config", "configs/opd.py", "--config.objective.kl=mixed", "--config.objective.lam=1.5",
                "--workdir", str(tmp_path / "w"))
  assert _one_error_line(result) == "error: objective.lam must be in [0.0, 1.0], got 1.5"


@pytest.mark.parametrize("args, message", [
    (("--config", "configs/opd.py:smok"), "unknown preset 'smok'; known: smoke"),
    (("--config", "configs/nope.py"), "--config=configs/nope.py: no such file"),
    (("--config", "configs/opd.py", "--config.steps=many"), "--config.steps=many"),
    (("--config", "configs/opd.py", "--config.student.path=/no/such/dir"), "checkpoint directory does not exist"),
], ids=["preset", "config_file", "value_type", "missing_checkpoint"])
def test_user_errors_are_one_line(tmp_path, args, message):
  assert message in _one_error_line(_run(*args, "--workdir", str(tmp_path / "w")))


def test_traceback_flag_shows_the_traceback(tmp_path):
  result = _run("--config", "configs/opd.py", "--config.objective.kl=mixed", "--config.objective.lam=1.5",
                "--workdir", str(tmp_path / "w"), "--traceback")
  assert result.returncode not in (0, 2)
  assert "Traceback" in result.stderr and "objective.lam must be in [0.0, 1.0]" in result.stderr


def test_help_lists_the_flags_and_every_config():
  result = _run("--help")
  assert result.returncode == 0, result.stderr[-3000:]
  for flag in ("--config", "--workdir", "--show", "--traceback"):
    assert flag in result.stdout
  for path in sorted((ROOT / "configs").glob("*.py")):
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith(path.name))
    assert cli.first_line(path.read_text().split('"""')[1]) in line


def test_show_prints_fields_with_meanings_defaults_and_presets(tmp_path):
  result = _run("--config", "configs/opd.py", "--show", "--config.objective.discount=0.5",
                "--workdir", str(tmp_path / "w"))
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "configs/opd.py: On-policy distillation" in out
  assert "  smoke  Seconds on CPU for tests" in out  # the preset table of configs/opd.py
  assert '    lam = None  # reverse-KL weight in [0, 1]; only with kl="mixed"' in out
  assert "    discount = 0.5  # reward-to-go discount of the sampled reverse estimator; default: 0.0" in out
  assert "  steps = 300  # optimizer updates of the distillation run; default: 100" in out
  assert not (tmp_path / "w").exists()  # nothing ran


def test_field_comments_follow_section_helpers():
  comments = cli.field_comments(cli.DEFAULTS)
  assert comments["objective.lam"].startswith("reverse-KL weight")
  assert comments["teacher.path"] == comments["student.path"]
  assert "Hugging Face checkpoint directory" in comments["student.path"]
  # a comment on the line above an assignment belongs to it
  assert comments["teacher_cache.top_k"].startswith("> 0: also store the teacher's top-k")


def test_every_default_field_has_a_meaning_or_is_self_explanatory():
  """--show is only as good as the comments of train/defaults.py: the sections' fields mostly have one."""
  comments = cli.field_comments(cli.DEFAULTS)

  def leaves(section, prefix=""):
    for name, value in section.items():
      if isinstance(value, ml_collections.ConfigDict):
        yield from leaves(value, f"{prefix}{name}.")
      else:
        yield f"{prefix}{name}"

  fields = [f for f in leaves(base_config()) if ".model." not in f]
  assert sum(f in comments for f in fields) / len(fields) > 0.7


def test_missing_field_names_the_section_and_the_nearest_names():
  config = base_config()
  assert cli.missing_field(config, "objective.lam") is None
  assert cli.missing_field(config, "optimizer.learning_rte") == (
      "no field 'learning_rte' in optimizer (did you mean 'learning_rate'?)")
  assert cli.missing_field(config, "steps.x") == "steps is a value, not a section"


def test_file_errors_are_user_errors_and_keep_their_os_kind():
  assert issubclass(errors.MissingFileError, FileNotFoundError) and issubclass(errors.MissingFileError, ValueError)
  assert issubclass(errors.UnreadableFileError, PermissionError)
  assert issubclass(errors.NotADirectoryUserError, NotADirectoryError)
