"""The embedded default: on-policy distillation of a small arithmetic teacher into a smaller student.

Launch (2 CPU cores, a few minutes):
  python run.py --config configs/quickstart.py --workdir /tmp/kld
The teacher is the checkpoint shipped in assets/arithmetic_teacher (made by configs/teacher.py); the
student is a smaller random model fitted briefly to the data (a weak "base model"), then distilled
on-policy: reverse KL at the student's own prefixes, summed over the whole vocabulary (estimator
"exact"; the single-sampled-token estimator of configs/opd.py is far noisier at this scale). Prints
accuracy before and after on held-out problems.
"""

import pathlib

from kldistill_jax.train.defaults import base_config

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"


def get_config(arg=None):
  del arg
  c = base_config()
  c.steps = 300
  c.batch_size = 64
  c.checkpoint_every = 50
  c.objective.prefix = "student"
  c.objective.kl = "reverse"
  c.objective.estimator = "exact"
  c.sampling.max_new_tokens = 36
  c.optimizer.learning_rate = 5e-3
  c.optimizer.warmup_steps = 10
  c.teacher.path = str(ASSETS / "arithmetic_teacher")
  c.student.model.update(dict(family="qwen3", hidden_size=64, intermediate_size=192, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                              rope_theta=10_000.0))
  c.student.warmup_steps = 150
  c.student.warmup_learning_rate = 3e-3
  c.data.prompt_len = 12
  c.data.response_len = 36
  c.eval.max_new_tokens = 36
  return c
