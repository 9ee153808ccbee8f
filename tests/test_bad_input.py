"""Bad input fails before compute with an error naming the field (file, line), and loses nothing written."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import config_files
from kldistill_jax.train import runner
from kldistill_jax.train.loop import NonFiniteLossError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEACHER = ROOT / "assets" / "arithmetic_teacher"


def tiny_config(**overrides):
  """configs/quickstart.py at test size (2 steps, 8 prompts, 2-term problems) with dotted overrides."""
  small = {"steps": 2, "batch_size": 8, "checkpoint_every": 1, "log_every": 1, "student.warmup_steps": 0,
           "data.difficulties": (2,), "eval.difficulties": (2,), "sampling.max_new_tokens": 12,
           "eval.max_new_tokens": 12, "eval.num_problems": 8, "eval.batch_size": 8}
  return config_files.load("quickstart", **{**small, **overrides})


@pytest.mark.parametrize("field,value,match", [
    ("teacher.path", "/nonexistent/teacher", r"teacher\.path='/nonexistent/teacher': checkpoint directory "
                                              "does not exist"),
    ("objective.lam", 0.5, r"objective\.lam=0\.5 is set but objective\.kl='reverse'"),
    ("mesh.data", 3, r"mesh\.data=3 x mesh\.fsdp=1 x mesh\.tensor=1 must multiply to the 8 devices"),
    ("batch_size", 12, r"batch_size=12 .* not divisible by the data-parallel size mesh\.data x mesh\.fsdp = 8"),
    ("vocab_size", 48, r"rows: teacher 40 vs student 48 vocabulary rows"),
    ("teacher_cache.enabled", True, r"teacher_cache\.enabled needs objective\.prefix='teacher'"),
])
def test_bad_field_is_named(tmp_path, field, value, match):
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    runner.run_distill(tiny_config(**{field: value}), tmp_path)
  assert not (tmp_path / "checkpoints").exists()  # failed before training started


def test_lam_outside_unit_interval(tmp_path):
  config = tiny_config(**{"objective.kl": "mixed", "objective.lam": 1.5, "objective.estimator": "exact"})
  with pytest.raises(ValueError, match=r"objective\.lam"):
    runner.run_distill(config, tmp_path)


def test_checkpoint_path_that_is_a_file(tmp_path):
  file = tmp_path / "not_a_dir"
  file.write_text("x")
  with pytest.raises(FileNotFoundError, match=r"student\.path=.*not_a_dir.*does not exist"):
    runner.run_distill(tiny_config(**{"student.path": str(file)}), tmp_path / "run")


def test_malformed_jsonl_names_file_and_line(tmp_path):
  train = tmp_path / "train.jsonl"
  good = json.dumps({"question": "What is 2+3?", "answer": "2+3=5\n#### 5"})
  train.write_text(good + "\n" + good + "\n{\"question\": \"oops\"\n")
  config = tiny_config(**{"data.source": "gsm8k", "data.train_path": str(train),
                          "data.eval_path": str(train)})
  with pytest.raises(ValueError, match=rf"{train}:3"):
    runner.run_distill(config, tmp_path / "run")


def _tokenizer_dir(path, words):
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", *words])}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                              eos_token="<eos>")
  fast.save_pretrained(path)
  shutil.copy(TEACHER / "config.json", path / "config.json")
  return path


def test_different_tokenizers_are_named(tmp_path):
  teacher = _tokenizer_dir(tmp_path / "teacher", ["a", "b", "c"])
  student = _tokenizer_dir(tmp_path / "student", ["a", "b", "d", "e"])
  config = tiny_config(**{"teacher.path": str(teacher), "student.path": str(student)})
  with pytest.raises(ValueError, match=r"vocabulary: the teacher's tokenizer \(.*, 5 tokens\) and the student's "
                                       r"tokenizer \(.*, 6 tokens\) map tokens to different ids"):
    runner.run_distill(config, tmp_path / "run")


def test_unknown_override_is_an_error():
  result = subprocess.run([sys.executable, "run.py", "--config", "configs/quickstart.py",
                           "--config.objective.lamda=0.2", "--workdir", "/tmp/never_created_kld"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "lamda" in result.stderr
  assert not pathlib.Path("/tmp/never_created_kld").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  """Two good steps (checkpoints 1, 2), then a teacher with NaN weights: step 3 stops the run, names the
  step and the metric, and checkpoints and metrics of steps 1-2 stay."""
  workdir, teacher = tmp_path / "run", tmp_path / "teacher"
  shutil.copytree(TEACHER, teacher)
  settings = {"objective.estimator": "exact", "objective.kl": "forward", "teacher.path": str(teacher)}
  runner.run_distill(tiny_config(**settings), workdir)
  # The same teacher directory, its weights now NaN (a config change would be refused by the workdir).
  weights = load_file(teacher / "model.safetensors")
  weights = {k: np.full_like(v, np.nan) if "norm" in k else v for k, v in weights.items()}
  save_file(weights, teacher / "model.safetensors")
  config = tiny_config(**settings, steps=4)
  with pytest.raises(NonFiniteLossError, match=r"step 3: metric 'loss' is nan.*last good checkpoint "
                                               r"\(step 2\)"):
    runner.run_distill(config, workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 2
  logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert logged == [1, 2, 3]  # step 3 is logged (with "nan"), nothing before it is lost
