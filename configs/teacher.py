"""The built-in task's teacher: a small model fitted to the arithmetic data (how assets/arithmetic_teacher
was made).

Launch:
  python run.py --config configs/teacher.py --workdir /tmp/teacher
  cp -r /tmp/teacher/model assets/arithmetic_teacher
"""

from kldistill_jax.train import presets
from kldistill_jax.train.defaults import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.job = "pretrain"
  c.steps = 1000
  c.batch_size = 64
  c.checkpoint_every = 200
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 50
  # Twice the quickstart student's width.
  c.student.model.update(dict(presets.ARITHMETIC_STUDENT, hidden_size=128, intermediate_size=384,
                              head_dim=32))
  c.data.prompt_len = 12
  c.data.response_len = 36
  c.eval.max_new_tokens = 36
  return c
