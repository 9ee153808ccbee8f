"""The runner on file data: GSM8K-format JSONL, a Hugging Face tokenizer with a chat template, and an inline
teacher fitted to the data first (teacher.train_steps > 0, cached in workdir/teacher)."""

import json

from kldistill_jax.models import hf
from kldistill_jax.train import runner
from test_bad_input import tiny_config
from test_data import DATA, _build_hf_tokenizer

TINY = dict(family="qwen3", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
            head_dim=16, tie_word_embeddings=True, rope_theta=10_000.0)


def test_gsm8k_chat_run_with_a_fitted_teacher(tmp_path):
  texts = (DATA / "gsm8k_sample.jsonl").read_text().splitlines()
  tokenizer_dir = _build_hf_tokenizer(tmp_path / "tokenizer", texts)
  config = tiny_config(**{
      "data.source": "gsm8k", "data.train_path": str(DATA / "gsm8k_sample.jsonl"),
      "data.eval_path": str(DATA / "gsm8k_sample.jsonl"), "data.tokenizer": str(tokenizer_dir),
      "data.template": "chat", "data.prompt_len": 128, "data.response_len": 128,
      "teacher.path": "", "teacher.train_steps": 3, "objective.kl": "forward",
      "objective.estimator": "exact", "eval.num_problems": 6})
  config.teacher.model.update(TINY)
  config.student.model.update(TINY)
  summary = runner.run_distill(config, tmp_path / "run")

  assert summary["teacher"]["num_problems"] == 6  # every JSONL record, none dropped or double counted
  fitted = tmp_path / "run" / "teacher" / "model"
  assert hf.read_config(fitted).vocab_size == 300  # the tokenizer's vocabulary
  teacher_metrics = (tmp_path / "run" / "teacher" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in teacher_metrics] == [1, 2, 3]
  # A rerun reuses the fitted teacher (no new teacher steps) and resumes the finished distillation.
  runner.run_distill(config, tmp_path / "run")
  assert (tmp_path / "run" / "teacher" / "metrics.jsonl").read_text().splitlines() == teacher_metrics
