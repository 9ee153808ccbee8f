"""A short quickstart-sized run through run.py: every stage, every artifact, and a student that gets closer
to the teacher (exact reverse KL on the student's own samples falls)."""

import json
import pathlib
import subprocess
import sys

from safetensors.numpy import load_file

from kldistill_jax.train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
METRICS = ("loss", "forward_kl", "reverse_kl", "student_entropy", "teacher_entropy", "response_length",
           "truncation_rate", "tokens_per_s", "step_time_s", "student_flops", "teacher_flops")


def test_quickstart_sized_run(tmp_path):
  result = subprocess.run(
      [sys.executable, "run.py", "--config", "configs/quickstart.py", "--workdir", str(tmp_path),
       "--config.steps=40", "--config.student.warmup_steps=40", "--config.log_every=5",
       "--config.eval.num_problems=64", "--config.batch_size=32"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "student after" in result.stdout and "teacher" in result.stdout

  results = json.loads((tmp_path / "results.json").read_text())
  assert results["teacher"]["accuracy"] > 0.8  # the shipped teacher solves the task
  assert results["teacher"]["num_problems"] == 64
  for stage in ("student_init", "."):
    assert (tmp_path / stage / "metrics.jsonl").is_file()
  assert list((tmp_path / "tensorboard").iterdir())
  student = load_file(tmp_path / "student" / "model.safetensors")
  assert "model.embed_tokens.weight" in student
  # the export is servable as is (export.dtype bfloat16, tokenizer, generation defaults: tests/test_export.py);
  # the warm-up stage's export, reloaded on resume, keeps the float32 masters
  assert str(student["model.embed_tokens.weight"].dtype) == "bfloat16"
  assert load_file(tmp_path / "student_init" / "model" / "model.safetensors")["model.norm.weight"].dtype == "float32"
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    assert (tmp_path / "student" / name).read_text() == (ROOT / "assets" / "arithmetic_teacher" / name).read_text()

  metrics = read_metrics(tmp_path)
  assert [m["step"] for m in metrics] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
  for name in METRICS:
    assert name in metrics[-1], name
  first, last = metrics[0], metrics[-1]
  assert last["reverse_kl"] < 0.8 * first["reverse_kl"], (first["reverse_kl"], last["reverse_kl"])
  assert last["student_flops"] > first["student_flops"] > 0 and last["teacher_flops"] > 0
