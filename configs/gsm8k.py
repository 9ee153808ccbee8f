"""GSM8K-format JSONL with the built-in byte tokenizer and inline models: real text end to end on a fresh
machine, nothing to download (no tokenizer, no checkpoint).

Launch:
  python run.py --config configs/gsm8k.py:smoke --workdir /tmp/gsm8k_smoke   # seconds: tests
  python run.py --config configs/gsm8k.py --workdir /tmp/gsm8k                # fits the teacher first
  python run.py --config configs/gsm8k.py --workdir /tmp/gsm8k_full \
      --config.data.train_path=/data/gsm8k/train.jsonl --config.data.eval_path=/data/gsm8k/test.jsonl \
      --config.data.prompt_len=1024 --config.data.response_len=1024 --config.data.too_long=skip \
      --config.sampling.max_new_tokens=512 --config.eval.max_new_tokens=512

Data: assets/gsm8k_tiny/{train,test}.jsonl, 40 hand-written grade-school word problems in GSM8K's public
layout (`question`, `answer` with <<calculator>> annotations and a final '#### N'; 32 train, 8 test), or
the real files by path. data.tokenizer="byte": one token per UTF-8 byte, so lengths count bytes (the shipped
problems fit 128 / 160; real GSM8K needs about 1024 each). The teacher is an inline model fitted to the
reference solutions first (teacher.train_steps, cached in workdir/teacher), the student a smaller one,
distilled on-policy with the forward-heavy mixed KL (lam 0.25, exact). Answers are graded by extraction +
math-verify. At this size the models learn the format, not arithmetic word problems: the config shows the
pipeline runs on real text, it does not reproduce the paper's GSM8K numbers (those need Qwen3 checkpoints:
configs/qwen3_8b_to_0p6b.py).
"""

from kldistill_jax.train import presets
from kldistill_jax.train.defaults import base_config

GSM8K_TINY = presets.ASSETS / "gsm8k_tiny"
TEACHER = dict(family="qwen3", hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=32, tie_word_embeddings=True, rope_theta=10_000.0)
STUDENT = dict(TEACHER, hidden_size=64, intermediate_size=192, head_dim=16)
TINY = dict(TEACHER, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
            head_dim=16)


def smoke(c):
  """Seconds on CPU (tests): one tiny architecture for both models, 2 on-policy steps, 16-byte samples, a
  random teacher (no fitting stage) and evaluation sampling like training, so the sampler compiles once."""
  c.steps = 2
  c.batch_size = 8
  c.log_every = 1
  c.checkpoint_every = 2
  c.optimizer.warmup_steps = 1
  c.teacher.train_steps = 0
  c.teacher.model.update(TINY)
  c.student.model.update(TINY)
  c.sampling.max_new_tokens = 16
  c.eval.max_new_tokens = 16
  c.eval.temperature = c.sampling.temperature
  c.eval.batch_size = 8
  return c


def get_config(arg=None):
  c = base_config()
  c.steps = 200
  c.batch_size = 16
  c.checkpoint_every = 100
  c.optimizer.learning_rate = 1e-3
  c.objective.prefix = "student"
  c.objective.kl = "mixed"
  c.objective.lam = 0.25
  c.objective.estimator = "exact"
  c.sampling.max_new_tokens = 160
  c.teacher.model.update(TEACHER)
  c.teacher.train_steps = 300
  c.student.model.update(STUDENT)
  c.data.source = "gsm8k"
  c.data.train_path = str(GSM8K_TINY / "train.jsonl")
  c.data.eval_path = str(GSM8K_TINY / "test.jsonl")
  c.data.tokenizer = "byte"
  c.data.template = "plain"
  c.data.prompt_len = 128
  c.data.response_len = 160
  c.eval.max_new_tokens = 160
  c.eval.batch_size = 8
  return presets.apply_arg(c, arg, {"smoke": smoke})
