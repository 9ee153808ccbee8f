"""Offline-RL-style distillation: teacher prefixes, reverse KL, sampled estimator (top-right cell).

The reverse KL(q || p_T) is optimised on sequences the TEACHER sampled: REINFORCE with the dense
per-token reward log p_T - log q, on the sampled tokens only, importance-weighted by q / p_behaviour
because the tokens were drawn by the teacher, not by q. `objective.clip` truncates those weights
(e.g. --config.objective.clip=2.0); `objective.discount` > 0 uses the reward-to-go instead of the
per-token reward. Like SFT, the trajectories are off-policy: with `--config.teacher_cache.enabled=True`
they are sampled once, with the teacher's log-probs, and the training steps need no teacher at all.

Launch (built-in arithmetic task, shipped teacher, the quickstart student; a few minutes on 2 CPU cores):
  python run.py --config configs/offline_rl.py --workdir /tmp/offline_rl
  python run.py --config configs/offline_rl.py:smoke --workdir /tmp/offline_rl_smoke   # seconds: tests
"""

from kldistill_jax.train import presets
from kldistill_jax.train.defaults import base_config


def get_config(arg=None):
  c = presets.objective(presets.arithmetic(base_config()), "offline_rl")
  # One sampled token per position is a noisy gradient: the exact cells' 5e-3 made accuracy worse here.
  c.optimizer.learning_rate = 1e-3
  return presets.apply_arg(c, arg, {"smoke": presets.smoke})
