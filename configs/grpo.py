"""GRPO with an accuracy-only reward from a (distilled) student: the RL stage after distillation.

  python run.py --config configs/grpo.py --config.student.path=/tmp/kld/student --workdir /tmp/kld_grpo
  python run.py --config configs/grpo.py:smoke --workdir /tmp/kld_grpo_smoke   # seconds: tests

student.path is the checkpoint to start from (any Hugging Face directory: the quickstart's export
workdir/student, a real model). Without it the inline quickstart student is fitted briefly to the data
first (workdir/student_init), so the config runs as is. Each step samples batch_size prompts x
grpo.group_size completions at sampling.temperature, rewards 1 for a correct final answer (the task's own
check, or math-verify for benchmark files), and takes one clipped-ratio update with group-normalised
advantages. Logs reward, rollout entropy, response length, clip fraction (metrics.jsonl / TensorBoard).
"""

from kldistill_jax.train import presets
from kldistill_jax.train.defaults import base_config


def _smoke(c):
  presets.smoke(c)
  c.batch_size = 8  # prompts (one per simulated test device); x group_size 4 = 32 rollouts per step
  c.grpo.group_size = 4
  c.grpo.updates_per_batch = 2
  c.grpo.kl_coef = 0.01
  return c


def get_config(arg=None):
  c = presets.arithmetic(base_config())
  c.job = "grpo"
  c.steps = 100
  c.batch_size = 16  # prompts per step; 16 x 8 = 128 rollouts
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "constant"
  c.grpo.group_size = 8
  return presets.apply_arg(c, arg, {"smoke": _smoke})
